"""Presence / frequency / repetition penalties: the reference op against a per-token loop, the
runner's penalty state, the engine against HF generate and against a step-by-step reference, and
on a GPU the decode graphs against eager decode."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import LLM, Request, SamplingParams
from engine.penalties import PenaltyState
from engine.request import Sequence, Status
from engine.runner import decode_batch
from epd_kernels import reference
from graphs.decode_graphs import StaticBuffers

PROMPTS = ["Count the birds in the tree", "Hello", "What colour is the sky on a clear summer day?"]


def _seq(prompt: list[int], output: list[int], **sampling) -> Sequence:
    s = Sequence(seq_id=0, prompt_ids=list(prompt), sampling=SamplingParams(**sampling), seed=0,
                 stop_token_ids=frozenset())
    s.output_ids = list(output)
    return s


def _penalize_one(logits: list[float], prompt: list[int], output: list[int], presence: float, frequency: float,
                  repetition: float) -> torch.Tensor:
    """The semantics token by token, from the id lists (fp32 scalars, the reference's operation order)."""
    out = []
    for token, x in enumerate(logits):
        x = torch.tensor(x, dtype=torch.float32)
        count = output.count(token)
        if token in prompt or count:
            x = x / repetition if x > 0 else x * repetition
        x = x - torch.tensor(frequency, dtype=torch.float32) * count
        x = x - torch.tensor(presence, dtype=torch.float32) * (count > 0)
        out.append(x)
    return torch.stack(out)


def test_reference_matches_per_token_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    vocab = 40
    state = PenaltyState(6, vocab, torch.device("cpu"))
    # duplicates in prompts and outputs, a token in both, one with no output yet, one row without penalties
    cases = [([1, 1, 2, 3, 39], [3, 3, 3, 5, 0], 0.5, 0.25, 1.3), ([7, 8], [], -1.0, 0.0, 0.7),
             ([0, 2, 4], [4, 4, 9, 9, 9, 9], 1.5, -0.5, 1.0), ([10], [11, 10], 0.0, 2.0, 2.5),
             ([5, 6], [6], 0.0, 0.0, 1.0)]
    seqs = [_seq(p, o, presence_penalty=pr, frequency_penalty=f, repetition_penalty=r) for p, o, pr, f, r in cases]
    slots = state.slots_for(seqs)
    assert slots[-1] == -1 and len(set(slots[:-1])) == 4 and min(slots[:-1]) >= 0
    logits = torch.randn(len(cases), vocab, generator=gen) * 3
    logits[:, :4] = torch.tensor([0.0, -0.0, -2.5, 2.5])  # zero, signed zero, negative and positive seen logits
    got = reference.apply_penalties(
        logits, state.counts, state.prompt_mask, torch.tensor(slots),
        torch.tensor([c[2] for c in cases]), torch.tensor([c[3] for c in cases]), torch.tensor([c[4] for c in cases]),
    )
    for row, (prompt, output, presence, frequency, repetition) in enumerate(cases):
        want = _penalize_one(logits[row].tolist(), prompt, output, presence, frequency, repetition)
        if slots[row] < 0:
            want = logits[row]
        assert torch.equal(got[row], want), f"row {row}: {(got[row] - want).abs().max()}"
    assert not torch.equal(got[0], logits[0])
    # no row with penalties: the logits come back as they are
    none = torch.full((len(cases),), -1)
    assert reference.apply_penalties(logits, state.counts, state.prompt_mask, none, *[torch.zeros(len(cases))] * 3) \
        is logits


def test_record_tokens_counts_and_skips() -> None:
    counts = torch.zeros(3, 10, dtype=torch.int32)
    slots = torch.tensor([0, 2, -1, 0, 5, 1])
    tokens = torch.tensor([4, 9, 4, 4, 1, 10])  # slot 0 twice on one token; slot 5 and token 10 out of range
    reference.record_tokens(counts, slots, tokens)
    want = torch.zeros(3, 10, dtype=torch.int32)
    want[0, 4], want[2, 9] = 2, 1
    assert torch.equal(counts, want)


def test_state_is_rebuilt_from_ids_when_slots_run_out() -> None:
    state = PenaltyState(2, 16, torch.device("cpu"))
    a, b, c = (_seq([1, 2], [3, 3, 4], repetition_penalty=1.2) for _ in range(3))
    a.status, b.status, c.status = Status.WAITING, Status.RUNNING, Status.RUNNING  # a: preempted
    state.slots_for([a, b])
    before = state.counts[a.penalty_slot].clone()
    assert before[3] == 2 and before[4] == 1 and state.prompt_mask[a.penalty_slot, [1, 2]].all()
    slot_c = state.slots_for([c])[0]  # full: taken back from the preempted one, not the running one
    assert a.penalty_slot == -1 and b.penalty_slot >= 0 and slot_c != b.penalty_slot
    a.output_ids.append(7)
    state.slots_for([a, c])  # a rebuilds (from b's slot: b is outside this batch), c keeps its slot
    assert state.holds(a) and state.holds(c) and not state.holds(b) and c.penalty_slot == slot_c
    assert state.counts[a.penalty_slot].tolist() == (before + torch.eye(16, dtype=torch.int32)[7]).tolist()
    copy = _seq([1], [], presence_penalty=1.0)
    copy.penalty_slot = c.penalty_slot  # a copied Sequence naming c's slot does not share it
    state.slots_for([copy, c])
    assert copy.penalty_slot != c.penalty_slot and state.holds(c)
    with pytest.raises(RuntimeError, match="penalty state full"):
        state.slots_for([_seq([1], [], presence_penalty=1.0) for _ in range(3)])
    state.release(c)
    assert c.penalty_slot == -1 and None in state.owners
    state.release(c)  # a second release is a no-op


def test_static_buffers_carry_penalty_rows() -> None:
    bufs = StaticBuffers.allocate(4, 2, torch.device("cpu"))
    seqs = [_seq([1, 2], [3], presence_penalty=0.5, frequency_penalty=-1.0, repetition_penalty=1.25),
            _seq([4], [], temperature=0.5)]
    seqs[0].penalty_slot = 3
    for s in seqs:
        s.block_table = [0]
    bufs.copy_from(decode_batch(seqs, [s.penalty_slot for s in seqs]), 16, 4, bufs.staging())
    assert bufs.presence.tolist() == [0.5, 0.0, 0.0, 0.0] and bufs.frequency.tolist() == [-1.0, 0.0, 0.0, 0.0]
    assert bufs.repetition.tolist() == [1.25, 1.0, 1.0, 1.0] and bufs.penalty_slot.tolist() == [3, -1, -1, -1]


# ----------------------------------------------------------------------------- the engine


@pytest.fixture(scope="module")
def hf_llama(tiny_llama: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()


def _hf_logits(hf, prompt: list[int], output: list[int]) -> torch.Tensor:
    """HF's raw logits [len(output), V] at the positions that predicted each output token."""
    with torch.inference_mode():
        logits = hf(input_ids=torch.tensor([prompt + output])).logits[0].float()
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(output)]


def test_repetition_penalty_matches_hf_greedy(llama_llm: LLM, hf_llama) -> None:
    sp = SamplingParams(max_tokens=24, ignore_eos=True, repetition_penalty=1.3)
    outs = llama_llm.generate(PROMPTS, sp)
    plain = llama_llm.generate(PROMPTS, SamplingParams(max_tokens=24, ignore_eos=True))
    assert any(o.token_ids != p.token_ids for o, p in zip(outs, plain)), "the penalty changed nothing"
    for prompt, out in zip(PROMPTS, outs):
        ids = torch.tensor([llama_llm.make_sequence(prompt, sp).prompt_ids])
        with torch.inference_mode():
            ref = hf_llama.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                    min_new_tokens=24, do_sample=False, repetition_penalty=1.3, pad_token_id=0)
        assert out.token_ids == ref[0, ids.shape[1]:].tolist(), prompt
    assert llama_llm.runner.penalties.owners.count(None) == llama_llm.runner.penalties.num_slots  # all released


def test_presence_and_frequency_follow_the_reference(llama_llm: LLM, hf_llama) -> None:
    """Each engine token equals the reference draw from HF's logits at that position, penalized by
    the counts of the tokens before it: greedy rows and seeded sampled rows."""
    params = [SamplingParams(max_tokens=20, ignore_eos=True, presence_penalty=1.5, frequency_penalty=0.7),
              SamplingParams(max_tokens=20, ignore_eos=True, frequency_penalty=2.0, repetition_penalty=1.1),
              SamplingParams(max_tokens=20, ignore_eos=True, presence_penalty=-0.5, frequency_penalty=1.0,
                             temperature=0.8, top_k=40, seed=11)]
    outs = llama_llm.generate([Request(p, sampling=sp) for p, sp in zip(PROMPTS, params)])
    plain = llama_llm.generate([Request(p, sampling=SamplingParams(max_tokens=20, ignore_eos=True)) for p in PROMPTS])
    assert outs[0].token_ids != plain[0].token_ids and outs[1].token_ids != plain[1].token_ids
    for prompt, sp, out in zip(PROMPTS, params, outs):
        prompt_ids = llama_llm.make_sequence(prompt, sp).prompt_ids
        logits = _hf_logits(hf_llama, prompt_ids, out.token_ids)
        state = PenaltyState(1, logits.shape[1], torch.device("cpu"))
        for step, token in enumerate(out.token_ids):
            seq = _seq(prompt_ids, out.token_ids[:step], presence_penalty=sp.presence_penalty,
                       frequency_penalty=sp.frequency_penalty, repetition_penalty=sp.repetition_penalty)
            state.init(seq)
            row = reference.apply_penalties(logits[step : step + 1], state.counts, state.prompt_mask,
                                            torch.tensor([0]), torch.tensor([sp.presence_penalty]),
                                            torch.tensor([sp.frequency_penalty]), torch.tensor([sp.repetition_penalty]))
            want = reference.sample(row, torch.tensor([sp.temperature]), torch.tensor([sp.top_k]),
                                    torch.tensor([sp.top_p]), torch.tensor([sp.seed or 0]), torch.tensor([step]))
            assert token == want.item(), f"{prompt!r} step {step}"


def test_plain_rows_unchanged_beside_penalty_rows(llama_llm: LLM) -> None:
    plain_sp = SamplingParams(max_tokens=16, ignore_eos=True)
    sampled_sp = SamplingParams(max_tokens=16, ignore_eos=True, temperature=0.9, seed=5)
    alone = llama_llm.generate([Request(PROMPTS[0], sampling=plain_sp), Request(PROMPTS[2], sampling=sampled_sp)])
    heavy = SamplingParams(max_tokens=16, ignore_eos=True, presence_penalty=2.0, frequency_penalty=2.0,
                           repetition_penalty=3.0)
    mixed = llama_llm.generate([Request(PROMPTS[1], sampling=heavy), Request(PROMPTS[0], sampling=plain_sp),
                                Request(PROMPTS[1], sampling=heavy), Request(PROMPTS[2], sampling=sampled_sp)])
    assert mixed[1].token_ids == alone[0].token_ids and mixed[3].token_ids == alone[1].token_ids
    assert mixed[0].token_ids == mixed[2].token_ids  # two rows with the same state are independent slots


def test_multi_step_decode_with_penalties_equals_single_step(llama_llm: LLM) -> None:
    params = [SamplingParams(max_tokens=21, ignore_eos=True, presence_penalty=1.0, frequency_penalty=0.5),
              SamplingParams(max_tokens=21, ignore_eos=True),
              SamplingParams(max_tokens=21, ignore_eos=True, repetition_penalty=1.5, temperature=0.7, seed=3)]
    requests = [Request(p, sampling=sp) for p, sp in zip(PROMPTS, params)]
    single = llama_llm.generate(requests)
    engine = llama_llm.engine
    engine.multi_step = 8
    try:
        multi = llama_llm.generate(requests)
    finally:
        engine.multi_step = 1
    assert [o.token_ids for o in multi] == [o.token_ids for o in single]


def test_preempted_sequence_keeps_its_penalty_state(tiny_llama: Path, llama_llm: LLM) -> None:
    sp = SamplingParams(max_tokens=40, ignore_eos=True, frequency_penalty=0.8, repetition_penalty=1.2)
    reference_out = llama_llm.generate(PROMPTS, sp)
    small = LLM(tiny_llama, backend="torch", device="cpu", kv_cache_tokens=160, block_size=16)
    outs = small.generate(PROMPTS, sp)
    assert small.engine.num_preemptions > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in reference_out]
    assert small.runner.penalties.owners.count(None) == small.runner.penalties.num_slots


def test_epd_style_arrival_builds_state_from_ids(llama_llm: LLM) -> None:
    """A decode stage's sequence arrives with its first token and no slot: decode builds the state
    from prompt_ids + output_ids, so its tokens equal the aggregated engine's."""
    sp = SamplingParams(max_tokens=8, ignore_eos=True, presence_penalty=1.2, repetition_penalty=1.4)
    want = llama_llm.generate(PROMPTS[0], sp)[0].token_ids
    runner, engine = llama_llm.runner, llama_llm.engine
    seq = llama_llm.make_sequence(PROMPTS[0], sp)
    seq.block_table = engine.kv_blocks.allocate(2)
    try:
        first = runner.prefill([seq]).token_ids[0]
        runner.release(seq)  # the prefill stage's slot stays there
        seq.output_ids.append(first)
        for _ in range(7):
            seq.output_ids.append(runner.decode([seq])[0][0][0])
        assert seq.output_ids == want
    finally:
        engine.finish(seq)


def test_pd_stages_match_aggregated_with_penalties(tiny_llava: Path, llava_llm: LLM) -> None:
    """Prefill and decode in their own processes: decode rebuilds each arrival's state from its
    prompt and first token (prefill's slots are taken back once its sequences are handed off)."""
    from engine.epd import EPDEngine

    params = [SamplingParams(max_tokens=10, ignore_eos=True, presence_penalty=1.5, frequency_penalty=0.5),
              SamplingParams(max_tokens=10, ignore_eos=True, repetition_penalty=1.4, temperature=0.9, seed=2),
              SamplingParams(max_tokens=10, ignore_eos=True)]
    requests = [Request(p, sampling=sp) for p, sp in zip(PROMPTS, params)]
    want = [o.token_ids for o in llava_llm.generate(requests)]
    assert want[0] != llava_llm.generate(PROMPTS[0], params[2])[0].token_ids, "the penalties changed nothing"
    with EPDEngine(tiny_llava, placement="P:cpu D:cpu", mode="pd", backend="torch", device="cpu") as pd:
        assert [o.token_ids for o in pd.generate(requests)] == want
        assert [o.token_ids for o in pd.generate(requests)] == want  # again, on reused slots


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small GQA Llama with head_dim 64 (the attention kernels' smallest, so decode is captured), bf16."""
    import transformers as hf

    from scripts.make_tiny_model import _init_non_flat, _start_dir

    out, tok = _start_dir(tmp_path_factory.mktemp("models") / "small-llama", None)
    cfg = hf.LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1376, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = hf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        _init_non_flat(model, 0, embed_std=0.3, head_gain=3.0, residual_gain=3.0)
    model.to(torch.bfloat16).save_pretrained(str(out))
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_decode_with_penalties_equals_eager(small_llama: Path) -> None:
    try:
        from epd_kernels import _epd_C  # noqa: F401
    except ImportError:
        pytest.skip("epd_kernels._epd_C is not built")
    params = [SamplingParams(max_tokens=24, ignore_eos=True, presence_penalty=1.0, frequency_penalty=0.5),
              SamplingParams(max_tokens=24, ignore_eos=True),
              SamplingParams(max_tokens=24, ignore_eos=True, repetition_penalty=1.5, temperature=0.7, seed=3,
                             logprobs=True, top_logprobs=3)]
    requests = [Request(p, sampling=sp) for p, sp in zip(PROMPTS, params)]

    def run(**kw) -> list:
        llm = LLM(small_llama, backend="cuda", device="cuda", dtype="bfloat16", kv_cache_tokens=4096, max_num_seqs=8,
                  **kw)
        graphs = llm.runner.decode_graphs
        graphs.wait_for_capture()
        assert len(graphs.graphs) == (0 if kw.get("cuda_graphs") is False else len(graphs.buckets))
        outs = llm.generate(requests)
        assert llm.runner.penalties.owners.count(None) == llm.runner.penalties.num_slots
        return [(o.token_ids, [(r.token_id, round(r.logprob, 3)) for r in o.outputs[0].logprobs or []]) for o in outs]

    eager = run(cuda_graphs=False)
    plain = run(cuda_graphs=False)
    assert eager == plain, "eager decode is not deterministic"
    assert run() == eager  # 3 rows in the bucket of 4: the padded row has no penalty slot
    assert run(multi_step=8) == eager
