"""The decode graphs on the CPU: the static buffers (one batch copied in, padding rows inert),
DecodeGraphs run eagerly from explicit dependencies and a DecodeBatch (against HF greedy and the
engine), and the KV arena the runner hands on to its graphs."""

from __future__ import annotations

from pathlib import Path

import torch

from engine import LLM, Request, SamplingParams
from engine.models.llama import AttentionMetadata
from engine.request import Sequence
from engine.runner import decode_batch
from graphs.decode_graphs import DecodeBatch, DecodeGraphs, StaticBuffers


def _seq(i: int, prompt: int, out: list[int], blocks: list[int], temperature: float) -> Sequence:
    s = Sequence(seq_id=i, prompt_ids=list(range(100, 100 + prompt)), seed=7 + i,
                 sampling=SamplingParams(max_tokens=50, temperature=temperature, top_k=5, top_p=0.5),
                 stop_token_ids=frozenset())
    s.output_ids = list(out)
    s.block_table = list(blocks)
    return s


def _batch(seqs: list[Sequence]) -> DecodeBatch:
    return decode_batch(seqs, [-1] * len(seqs))


def test_copy_from_writes_rows_and_padding() -> None:
    bufs = StaticBuffers.allocate(8, 6, torch.device("cpu"))
    staging = bufs.staging()
    # a first, larger batch leaves values behind in rows that the second call pads
    big = [_seq(i, 20, [1, 2], [9, 8], 0.0) for i in range(6)]
    bufs.copy_from(_batch(big), 16, 8, staging)
    seqs = [_seq(0, 5, [], [3], 0.0), _seq(1, 17, [42, 43], [4, 7], 0.7), _seq(2, 32, [5], [1, 2, 6], 1.0)]
    bufs.copy_from(_batch(seqs), 16, 4, staging)
    assert bufs.input_ids[:4].tolist() == [104, 43, 5, 0]
    assert bufs.positions[:4].tolist() == [4, 18, 32, 0]
    assert bufs.seq_lens[:4].tolist() == [5, 19, 33, 0]
    # slot = block_table[pos // 16] * 16 + pos % 16
    assert bufs.slot_mapping[:4].tolist() == [3 * 16 + 4, 7 * 16 + 2, 6 * 16 + 0, -1]
    assert bufs.temperature[:4].tolist() == [0.0, 0.699999988079071, 1.0, 0.0]
    assert bufs.top_k[:4].tolist() == [5, 5, 5, 0]
    assert bufs.top_p[:4].tolist() == [0.5, 0.5, 0.5, 1.0]
    assert bufs.seeds[:4].tolist() == [7, 8, 9, 0]
    assert bufs.steps[:4].tolist() == [0, 2, 1, 0]
    assert bufs.penalty_slot[:4].tolist() == [-1] * 4
    assert bufs.block_tables[:4].tolist() == [[3, 0, 0, 0, 0, 0], [4, 7, 0, 0, 0, 0], [1, 2, 6, 0, 0, 0], [0] * 6]
    assert bufs.seq_lens.dtype == torch.int32 and bufs.top_p.dtype == torch.float32


def test_fresh_buffers_are_padding() -> None:
    bufs = StaticBuffers.allocate(4, 3, torch.device("cpu"))
    assert bufs.slot_mapping.tolist() == [-1] * 4 and bufs.seq_lens.tolist() == [0] * 4
    assert bufs.top_p.tolist() == [1.0] * 4 and bufs.block_tables.tolist() == [[0] * 3] * 4


PROMPTS = ["Count the birds in the tree", "Hello", "What colour is the sky on a clear summer day?"]
REPETITION = [1.0, 1.3, 1.0]  # the middle row uses the penalty state (slot 0)
STEPS = 8


def _prefill_greedy(model, ops, arena: torch.Tensor, prompts: list[list[int]], tables: list[list[int]],
                    counts: torch.Tensor, prompt_mask: torch.Tensor, slots: list[int]) -> list[int]:
    """The model's own prefill forward into `arena` (no runner); each row's first token, greedy
    after the penalties (repetition only), counted in the penalty state."""
    bs = arena.shape[3]
    cu = [0]
    for p in prompts:
        cu.append(cu[-1] + len(p))
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        is_prefill=True,
        slot_mapping=torch.tensor([t[i // bs] * bs + i % bs for p, t in zip(prompts, tables) for i in range(len(p))]),
        seq_lens=torch.tensor([len(p) for p in prompts], dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32), max_seqlen_q=max(len(p) for p in prompts))
    ids = torch.tensor([t for p in prompts for t in p])
    positions = torch.tensor([i for p in prompts for i in range(len(p))])
    hidden = model(ops, ids, positions, meta, arena)
    logits = model.compute_logits(ops, hidden[torch.tensor([c - 1 for c in cu[1:]])])
    n = len(prompts)
    slot_rows = torch.tensor(slots)
    logits = ops.apply_penalties(logits, counts, prompt_mask, slot_rows, torch.zeros(n), torch.zeros(n),
                                 torch.tensor(REPETITION))
    first = logits.argmax(-1)
    ops.record_tokens(counts, slot_rows, first)
    return first.tolist()


@torch.inference_mode()
def test_decode_graphs_run_eagerly_from_explicit_deps(llama_llm: LLM, tiny_llama: Path) -> None:
    """DecodeGraphs built from the model, the ops, an arena and penalty tensors of our own (no
    runner, no Sequence), one multi-step run over a DecodeBatch: HF's greedy tokens, and the
    engine's (the runner turning its sequences into a DecodeBatch)."""
    from transformers import LlamaForCausalLM

    runner = llama_llm.runner
    model, ops, bs = runner.model, runner.ops, runner.block_size
    vocab = runner.cfg.text.vocab_size
    prompts = [llama_llm.make_sequence(p, SamplingParams()).prompt_ids for p in PROMPTS]
    tables = [[11, 2, 7], [5, 0, 9], [3, 8, 1]]  # scattered blocks: the steps must follow the tables
    assert all(len(p) + STEPS + 1 <= len(t) * bs for p, t in zip(prompts, tables))
    arena = torch.zeros(12, *runner.kv_arena.shape[1:], dtype=runner.kv_arena.dtype)
    counts = torch.zeros(2, vocab, dtype=torch.int32)
    prompt_mask = torch.zeros(2, vocab, dtype=torch.bool)
    prompt_mask[0, prompts[1]] = True
    slots = [-1, 0, -1]
    first = _prefill_greedy(model, ops, arena, prompts, tables, counts, prompt_mask, slots)

    graphs = DecodeGraphs(model=model, ops=ops, kv_arena=arena, block_size=bs, penalty_counts=counts,
                          penalty_prompt_mask=prompt_mask, device=torch.device("cpu"), max_batch=4,
                          max_blocks_per_seq=4, max_steps=STEPS)
    assert not hasattr(graphs, "runner")
    n = len(prompts)
    batch = DecodeBatch(input_ids=first, positions=[len(p) for p in prompts], block_tables=tables,
                        temperature=[0.0] * n, top_k=[0] * n, top_p=[1.0] * n, seeds=[0] * n, steps=[1] * n,
                        presence=[0.0] * n, frequency=[0.0] * n, repetition=list(REPETITION), penalty_slot=slots)
    seen: list[tuple[tuple[int, ...], list[int]]] = []
    tokens, logits = graphs.run(batch, STEPS, lambda lg, tk: seen.append((tuple(lg.shape), tk.tolist())))
    assert len(tokens) == STEPS and all(len(step) == n for step in tokens)
    assert seen == [((n, vocab), step) for step in tokens] and logits.shape == (n, vocab)
    greedy = logits.argmax(-1).tolist()  # the raw logits of the last step: rows without penalties took their argmax
    assert [tokens[-1][i] for i in (0, 2)] == [greedy[i] for i in (0, 2)]
    ours = [[f] + [step[i] for step in tokens] for i, f in enumerate(first)]

    hf = LlamaForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    for prompt, rep, got in zip(prompts, REPETITION, ours):
        ids = torch.tensor([prompt])
        ref = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS + 1,
                          min_new_tokens=STEPS + 1, do_sample=False, repetition_penalty=rep, pad_token_id=0)
        assert got == ref[0, len(prompt):].tolist(), prompt
    outs = llama_llm.generate([Request(p, sampling=SamplingParams(max_tokens=STEPS + 1, ignore_eos=True,
                                                                  repetition_penalty=r))
                               for p, r in zip(PROMPTS, REPETITION)])
    assert [o.token_ids for o in outs] == ours
