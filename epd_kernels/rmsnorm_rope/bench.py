"""Benchmarks of the rmsnorm_rope family at LLaVA-1.5-7B shapes (bf16), against plain torch.

    python -m epd_kernels.rmsnorm_rope.bench      # prints the table; measures copy bandwidth itself

Each case is timed as a CUDA graph of many calls cycling through enough input sets to exceed L2
(fresh random data per set), replayed >= 20 times; the median replay time / calls is reported.
Bytes are the minimum moved: every input read once, every output written once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from epd_kernels import reference as ref
from epd_kernels import rmsnorm_rope as ops
from epd_kernels.bench_utils import copy_bandwidth_GBps, num_sets, print_table, randn, require_cuda, row, time_graph_ms

DTYPE = torch.bfloat16
HIDDEN, HEADS, HEAD_DIM = 4096, 32, 128  # Llama-2-7B text tower
VISION_TOKENS, VISION_HIDDEN = 577 * 8, 1024  # CLIP ViT-L/336, 8 images


def bench_rms_norm(tokens: int, ceilings: dict, gen: torch.Generator) -> list[dict]:
    weight = randn((HIDDEN,), DTYPE, gen)
    eps = 1e-5
    one = tokens * HIDDEN * 2
    rows = []

    xs = [randn((tokens, HIDDEN), DTYPE, gen) for _ in range(num_sets(2 * one, cap=256))]
    ms = time_graph_ms([lambda x=x: ops.rms_norm(x, weight, eps) for x in xs])
    peer_ms = time_graph_ms([lambda x=x: ref.rms_norm(x, weight, eps) for x in xs])
    rows.append(row(f"rms_norm T={tokens} H={HIDDEN}", ms, 2 * one + HIDDEN * 2, ceilings, peer_ms, "torch eager"))

    sets = num_sets(4 * one, cap=256)
    xs = [randn((tokens, HIDDEN), DTYPE, gen) for _ in range(sets)]
    residuals = [randn((tokens, HIDDEN), DTYPE, gen) for _ in range(sets)]
    ms = time_graph_ms([lambda x=x, r=r: ops.add_rms_norm(x, r, weight, eps) for x, r in zip(xs, residuals)])
    peer_ms = time_graph_ms([lambda x=x, r=r: ref.add_rms_norm(x, r, weight, eps) for x, r in zip(xs, residuals)])
    case = f"add_rms_norm T={tokens} H={HIDDEN}"
    rows.append(row(case, ms, 4 * one + HIDDEN * 2, ceilings, peer_ms, "torch eager"))
    return rows


def bench_layer_norm(ceilings: dict, gen: torch.Generator) -> dict:
    tokens, hidden = VISION_TOKENS, VISION_HIDDEN
    weight, bias = randn((hidden,), DTYPE, gen), randn((hidden,), DTYPE, gen)
    nbytes = 2 * tokens * hidden * 2 + 2 * hidden * 2
    xs = [randn((tokens, hidden), DTYPE, gen) for _ in range(num_sets(nbytes, cap=256))]
    ms = time_graph_ms([lambda x=x: ops.layer_norm(x, weight, bias, 1e-5) for x in xs])
    peer_ms = time_graph_ms([lambda x=x: F.layer_norm(x, (hidden,), weight, bias, 1e-5) for x in xs])
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
    sets = num_sets(nbytes, cap=256)
    blocks_per_set = math.ceil(tokens / block_size)
    num_blocks = sets * blocks_per_set
    kv_arena = randn((num_blocks, 1, 2, block_size, HEADS, HEAD_DIM), DTYPE, gen)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM))
    cos_sin = ref.rope_cos_sin(inv_freq, 4096).cuda()
    inputs = []
    for s in range(sets):
        qkv = randn((tokens, heads * HEAD_DIM), DTYPE, gen)
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

    ms = time_graph_ms([lambda i=i: kernel(i) for i in range(sets)])
    peer_ms = time_graph_ms([lambda i=i: peer(i) for i in range(sets)])
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


if __name__ == "__main__":
    require_cuda()
    print_table(run({"copy_GBps": copy_bandwidth_GBps()}))
