"""Benchmarks of the rmsnorm_rope family at LLaVA-1.5-7B shapes (bf16), against plain torch.

    python -m kernels.rmsnorm_rope.bench      # prints the table; measures copy bandwidth itself

Each case is timed as a CUDA graph of many calls cycling through enough input sets to exceed L2
(fresh random data per set), replayed >= 20 times; the median replay time / calls is reported.
Bytes are the minimum moved: every input read once, every output written once.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kernels import reference as ref
from kernels import rmsnorm_rope as ops

L2_BYTES = 50 * 2**20
DTYPE = torch.bfloat16
HIDDEN, HEADS, HEAD_DIM = 4096, 32, 128  # Llama-2-7B text tower
VISION_TOKENS, VISION_HIDDEN = 577 * 8, 1024  # CLIP ViT-L/336, 8 images


def num_sets(bytes_per_call: int) -> int:
    """Input sets to rotate through so one pass moves at least 2x L2 (capped for tiny calls)."""
    return max(1, min(256, math.ceil(2 * L2_BYTES / bytes_per_call)))


def time_ms(fn: Callable[[int], object], sets: int, repeats: int = 25) -> float:
    """Median milliseconds per call of fn(set_index), from CUDA-graph replays of >= 16 calls."""
    calls = max(sets, 16)
    for i in range(min(calls, 3)):  # warm-up (and lazy init) outside the capture
        fn(i % sets)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i % sets)
    graph.replay()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    return statistics.median(times)


def row(case: str, ms: float, nbytes: int, ceilings: dict, peer_ms: float, peer: str) -> dict:
    achieved = nbytes / (ms * 1e-3) / 1e9
    ceiling = ceilings["copy_GBps"]
    return {
        "case": case,
        "ms": ms,
        "achieved": achieved,
        "unit": "GB/s",
        "ceiling": ceiling,
        "pct": 100.0 * achieved / ceiling,
        "peer_ms": peer_ms,
        "peer": peer,
    }


def randn(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device="cuda").to(DTYPE)


def bench_rms_norm(tokens: int, ceilings: dict, gen: torch.Generator) -> list[dict]:
    weight = randn(HIDDEN, gen=gen)
    eps = 1e-5
    one = tokens * HIDDEN * 2
    rows = []

    sets = num_sets(2 * one)
    xs = [randn(tokens, HIDDEN, gen=gen) for _ in range(sets)]
    ms = time_ms(lambda i: ops.rms_norm(xs[i], weight, eps), sets)
    peer_ms = time_ms(lambda i: ref.rms_norm(xs[i], weight, eps), sets)
    rows.append(row(f"rms_norm T={tokens} H={HIDDEN}", ms, 2 * one + HIDDEN * 2, ceilings, peer_ms, "torch eager"))

    sets = num_sets(4 * one)
    xs = [randn(tokens, HIDDEN, gen=gen) for _ in range(sets)]
    residuals = [randn(tokens, HIDDEN, gen=gen) for _ in range(sets)]
    ms = time_ms(lambda i: ops.add_rms_norm(xs[i], residuals[i], weight, eps), sets)
    peer_ms = time_ms(lambda i: ref.add_rms_norm(xs[i], residuals[i], weight, eps), sets)
    case = f"add_rms_norm T={tokens} H={HIDDEN}"
    rows.append(row(case, ms, 4 * one + HIDDEN * 2, ceilings, peer_ms, "torch eager"))
    return rows


def bench_layer_norm(ceilings: dict, gen: torch.Generator) -> dict:
    tokens, hidden = VISION_TOKENS, VISION_HIDDEN
    weight, bias = randn(hidden, gen=gen), randn(hidden, gen=gen)
    nbytes = 2 * tokens * hidden * 2 + 2 * hidden * 2
    sets = num_sets(nbytes)
    xs = [randn(tokens, hidden, gen=gen) for _ in range(sets)]
    ms = time_ms(lambda i: ops.layer_norm(xs[i], weight, bias, 1e-5), sets)
    peer_ms = time_ms(lambda i: F.layer_norm(xs[i], (hidden,), weight, bias, 1e-5), sets)
    return row(f"layer_norm T={tokens} H={hidden}", ms, nbytes, ceilings, peer_ms, "F.layer_norm bf16")


def torch_rope_and_cache_write(q, k, v, positions, cos_sin, kv_arena, layer, slot_mapping) -> torch.Tensor:
    """The reference without its -1 filtering (a host sync), so it can be graph-captured; every slot is valid."""
    q_rot = ref.apply_rope(q, positions, cos_sin)
    block_size = kv_arena.shape[3]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    kv_arena[blocks, layer, 0, offsets] = ref.apply_rope(k, positions, cos_sin)
    kv_arena[blocks, layer, 1, offsets] = v
    return q_rot


def bench_rope(tokens: int, ceilings: dict, gen: torch.Generator) -> dict:
    heads = 3 * HEADS  # q | k | v, MHA
    block_size = 16
    nbytes = tokens * (heads * HEAD_DIM * 2 + HEADS * HEAD_DIM * 2 + 2 * HEADS * HEAD_DIM * 2 + 16 + HEAD_DIM * 4)
    sets = num_sets(nbytes)
    blocks_per_set = math.ceil(tokens / block_size)
    num_blocks = sets * blocks_per_set
    kv_arena = randn(num_blocks, 1, 2, block_size, HEADS, HEAD_DIM, gen=gen)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM))
    cos_sin = ref.rope_cos_sin(inv_freq, 4096).cuda()
    inputs = []
    for s in range(sets):
        qkv = randn(tokens, heads * HEAD_DIM, gen=gen)
        q, k, v = (t.view(tokens, HEADS, HEAD_DIM) for t in qkv.split(HEADS * HEAD_DIM, dim=-1))
        positions = torch.randperm(4096, generator=gen, device="cuda")[:tokens]
        first = s * blocks_per_set * block_size  # this set's own slots, out of order
        slots = first + torch.randperm(blocks_per_set * block_size, generator=gen, device="cuda")[:tokens]
        inputs.append((q, k, v, positions, slots))

    def kernel(i: int) -> torch.Tensor:
        q, k, v, positions, slots = inputs[i]
        return ops.rope_and_cache_write(q, k, v, positions, cos_sin, kv_arena, 0, slots)

    def peer(i: int) -> torch.Tensor:
        q, k, v, positions, slots = inputs[i]
        return torch_rope_and_cache_write(q, k, v, positions, cos_sin, kv_arena, 0, slots)

    ms, peer_ms = time_ms(kernel, sets), time_ms(peer, sets)
    case = f"rope_and_cache_write T={tokens} {HEADS}x{HEAD_DIM}"
    return row(case, ms, nbytes, ceilings, peer_ms, "torch eager")


def run(ceilings: dict) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for tokens in (1, 32, 640, 4096):
        rows += bench_rms_norm(tokens, ceilings, gen)
    rows.append(bench_layer_norm(ceilings, gen))
    for tokens in (32, 640):
        rows.append(bench_rope(tokens, ceilings, gen))
    return rows


def copy_bandwidth_GBps(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy rate (read + write bytes), median of 20."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(23):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return 2 * nbytes / (statistics.median(times[3:]) * 1e-3) / 1e9


def main() -> None:
    ceilings = {"copy_GBps": copy_bandwidth_GBps()}
    print(f"copy bandwidth {ceilings['copy_GBps']:.0f} GB/s")
    print(f"{'case':44s} {'ms':>9s} {'GB/s':>8s} {'% copy':>7s} {'peer ms':>9s}  peer")
    for r in run(ceilings):
        print(f"{r['case']:44s} {r['ms']:9.4f} {r['achieved']:8.0f} {r['pct']:6.1f}% {r['peer_ms']:9.4f}  {r['peer']}")


if __name__ == "__main__":
    main()
