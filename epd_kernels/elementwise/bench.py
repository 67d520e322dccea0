"""Benchmark the elementwise kernels at LLaVA-1.5-7B shapes against plain torch (epd_kernels.reference).

    python -m epd_kernels.elementwise.bench     # prints the table, measuring the copy ceiling itself
"""

from __future__ import annotations

import math

import torch

from epd_kernels import elementwise as ew
from epd_kernels import reference
from epd_kernels.bench_utils import (
    copy_bandwidth_GBps,
    num_sets,
    print_table,
    randn,
    require_cuda,
    row,
    time_isolated_ms,
)


def run(ceilings: dict) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    dtype, rows = torch.bfloat16, []

    inter = 11008
    for tokens in [1, 32, 640]:
        nbytes = tokens * 3 * inter * 2
        sets = [(randn((tokens, 2 * inter), dtype, gen),) for _ in range(num_sets(nbytes))]
        ms = time_isolated_ms([lambda a=a: ew.silu_and_mul(*a) for a in sets])
        peer_ms = time_isolated_ms([lambda a=a: reference.silu_and_mul(*a) for a in sets])
        rows.append(row(f"silu_and_mul T={tokens} I={inter}", ms, nbytes, ceilings, peer_ms, "torch"))

    shape = (577 * 8, 4096)
    nbytes = 2 * math.prod(shape) * 2
    sets = [(randn(shape, dtype, gen),) for _ in range(num_sets(nbytes))]
    for name in ["gelu", "quick_gelu"]:
        ours, peer = getattr(ew, name), getattr(reference, name)
        ms = time_isolated_ms([lambda a=a, f=ours: f(*a) for a in sets])
        peer_ms = time_isolated_ms([lambda a=a, f=peer: f(*a) for a in sets])
        rows.append(row(f"{name} {shape[0]}x{shape[1]}", ms, nbytes, ceilings, peer_ms, "torch"))

    tokens, hidden, vocab, images = 640, 4096, 32064, 576
    weight = randn((vocab, hidden), dtype, gen)
    nbytes = 2 * tokens * hidden * 2 + 2 * tokens * 8
    sets = []
    for _ in range(num_sets(nbytes)):
        ids = torch.randint(0, vocab, (tokens,), device="cuda", generator=gen)
        index = torch.full((tokens,), -1, dtype=torch.int64, device="cuda")
        index[10 : 10 + images] = torch.randperm(images, device="cuda", generator=gen)
        sets.append((ids, weight, index, randn((images, hidden), dtype, gen)))
    ms = time_isolated_ms([lambda a=a: ew.embed_tokens(*a) for a in sets])
    peer_ms = time_isolated_ms([lambda a=a: reference.embed_tokens(*a) for a in sets])
    rows.append(row(f"embed_tokens T={tokens} H={hidden} ({images} image rows)", ms, nbytes, ceilings, peer_ms,
                    "torch"))
    return rows


if __name__ == "__main__":
    require_cuda()
    print_table(run({"copy_GBps": copy_bandwidth_GBps()}))
