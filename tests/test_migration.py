"""Prefill in one process, KV blocks migrated through a shared arena, decode in another:
greedy output equals the aggregated engine's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import LLM, Request, SamplingParams
from engine.request import Sequence, Status, append_step
from ipc.arena import SharedArena
from ipc.migration import block_runs, pull_blocks

PROMPTS = ["Count the birds in the tree", "Hello", "What colour is the sky?"]
SP = SamplingParams(max_tokens=10, ignore_eos=True)


def _prefill_stage(model: str, prompts: list[str]) -> dict:
    """Child process: prefill into an arena it owns and exports; return handle + block ids."""
    from engine.block_manager import BlockManager
    from engine.config import EngineConfig, ModelConfig
    from engine.input_processor import InputProcessor
    from engine.runner import ModelRunner, kv_block_shape, load_weights, mm_arena_shape

    cfg = ModelConfig.from_dir(model)
    config = EngineConfig(model, backend="torch", device="cpu").for_model(cfg)
    shape = (config.num_kv_blocks(), *kv_block_shape(config, cfg))
    arena = SharedArena.create(shape, config.torch_dtype, "cpu", "kv-prefill")
    # the runner is given the exported arena: it writes K/V straight into it
    runner = ModelRunner(config, cfg, load_weights(config, cfg, "lm"), arena.tensor,
                         torch.empty(mm_arena_shape(config, cfg, 0), dtype=config.torch_dtype))
    blocks = BlockManager(runner.num_kv_blocks)
    inputs = InputProcessor(config, cfg, runner.num_kv_blocks, 0)
    results = []
    for prompt in prompts:
        seq = inputs.make_sequence(Request(prompt), SP)[0]
        seq.block_table = blocks.allocate(-(-seq.num_tokens // runner.block_size))
        first = runner.prefill([seq]).token_ids[0]
        results.append({"prompt_ids": seq.prompt_ids, "first": first, "blocks": seq.block_table,
                        "seed": seq.seed})
    arena.owner = False  # the parent outlives us and removes the file
    return {"handle": arena.handle, "results": results}


def test_prefill_then_migrate_then_decode(tiny_llama: Path) -> None:
    import multiprocess as mp

    reference = LLM(tiny_llama, backend="torch", device="cpu").generate(PROMPTS, SP)
    with mp.get_context("spawn").Pool(1) as pool:
        out = pool.apply(_prefill_stage, (str(tiny_llama), PROMPTS))
    src = SharedArena.open(out["handle"])
    src.owner = True  # clean up the file when done
    decode = LLM(tiny_llama, backend="torch", device="cpu")
    seqs = []
    for r in out["results"]:
        seq = Sequence(seq_id=len(seqs), prompt_ids=r["prompt_ids"], sampling=SP, seed=r["seed"],
                       stop_token_ids=frozenset())
        seq.append_tokens([r["first"]])
        seq.block_table = decode.engine.kv_blocks.allocate(len(r["blocks"]))
        pull_blocks(src.tensor, r["blocks"], decode.runner.kv_arena, seq.block_table)
        seq.num_cached, seq.status = len(seq.prompt_ids), Status.RUNNING
        decode.engine.decode.add(seq)
        seqs.append(seq)
    src.close()
    while any(s.status is not Status.FINISHED for s in seqs):
        for kept in append_step(decode.engine.step()):
            if kept.finish_reason:  # max_tokens (SP ignores eos; no stop tokens here)
                decode.engine.finish(kept.seq)
    assert [s.output_ids for s in seqs] == [o.token_ids for o in reference]
    assert decode.engine.kv_blocks.num_free == decode.runner.num_kv_blocks


def test_pull_blocks_runs_and_checks() -> None:
    assert block_runs([4, 5, 6, 0, 2, 3], [1, 2, 3, 4, 6, 8]) == [(4, 1, 3), (0, 4, 1), (2, 6, 1), (3, 8, 1)]
    a = torch.randn(9, 2, 2, 4, 1, 8)
    b = torch.zeros(9, 2, 2, 4, 1, 8)
    src, dst = [4, 5, 6, 0, 2, 3], [1, 2, 3, 4, 6, 8]
    assert pull_blocks(a, src, b, dst) == 6 * a[0].numel() * 4
    assert all(torch.equal(b[d], a[s]) for s, d in zip(src, dst))
    assert not b[[0, 5, 7]].any()  # nothing else written
    with pytest.raises(ValueError, match="2 source blocks but 1"):
        pull_blocks(a, [0, 1], b, [0])
    with pytest.raises(ValueError, match="block shapes differ"):
        pull_blocks(a, [0], torch.zeros(2, 2, 2, 4, 1, 4), [0])
    with pytest.raises(ValueError, match=r"destination blocks \[9\] outside the arena's 9 blocks"):
        pull_blocks(a, [0], b, [9])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_copy_blocks_on_gpu_matches_cpu_runs() -> None:
    pytest.importorskip("epd_kernels._epd_C")
    from epd_kernels import _epd_C

    g = torch.Generator().manual_seed(1)
    a = torch.randn(13, 3, 2, 16, 2, 8, generator=g).to(torch.bfloat16)
    src, dst = [7, 8, 9, 0, 12, 3], [2, 3, 4, 11, 0, 5]
    b_cpu = torch.zeros(12, 3, 2, 16, 2, 8, dtype=torch.bfloat16)
    pull_blocks(a, src, b_cpu, dst)
    b = torch.full_like(b_cpu, float("nan"), device="cuda")
    b[[1, 6, 7, 8, 9, 10]] = 0
    assert _epd_C.copy_blocks(b, dst, a.cuda(), src) == 4  # runs: 7-9, 0, 12, 3
    assert torch.equal(b.cpu(), b_cpu)
    with pytest.raises(RuntimeError, match="destination block 12 outside the arena's 12 blocks"):
        _epd_C.copy_blocks(b, [12], a.cuda(), [0])
    if torch.cuda.device_count() > 1:  # a peer copy
        c = torch.zeros(12, 3, 2, 16, 2, 8, dtype=torch.bfloat16, device="cuda:1")
        pull_blocks(a.cuda(), src, c, dst)
        assert torch.equal(c.cpu(), b_cpu)
