"""Benchmark the small-batch GEMV kernels at LLaVA-1.5-7B decode shapes against cuBLAS (F.linear).

    python -m epd_kernels.gemv.bench     # prints the table, measuring the copy ceiling itself

Bytes are the minimum moved: the weight, x and out, each once. gate_up_silu's peer is what the cuda
backend ran before it: F.linear (cuBLAS) then the silu_and_mul kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from epd_kernels import elementwise as ew
from epd_kernels import gemv
from epd_kernels.bench_utils import (
    copy_bandwidth_GBps,
    num_sets,
    print_table,
    randn,
    require_cuda,
    row,
    time_isolated_ms,
)

HIDDEN, INTER, VOCAB = 4096, 11008, 32064
# (name, N, K): the rows of w and its columns; gate_up is the fused [2I, K] weight.
SHAPES = [("qkv", 3 * HIDDEN, HIDDEN), ("o_proj", HIDDEN, HIDDEN), ("gate_up", 2 * INTER, HIDDEN),
          ("down", HIDDEN, INTER), ("lm_head", VOCAB, HIDDEN)]


def _peer_gate_up_silu(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return ew.silu_and_mul(F.linear(x, w))


def run(ceilings: dict) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    dtype, rows = torch.bfloat16, []
    for name, n, k in SHAPES:
        w_bytes = n * k * 2
        # Fresh weights per set until the rotation streams past L2; x is small and stays hot anyway.
        weights = [randn((n, k), dtype, gen) * k**-0.5 for _ in range(num_sets(w_bytes))]
        for m in [1, 8]:
            sets = [(randn((m, k), dtype, gen), w) for w in weights]
            nbytes = w_bytes + m * k * 2 + m * n * 2
            ms = time_isolated_ms([lambda a=a: gemv.linear(*a) for a in sets])
            peer_ms = time_isolated_ms([lambda a=a: F.linear(*a) for a in sets])
            rows.append(row(f"linear {name} M={m} N={n} K={k}", ms, nbytes, ceilings, peer_ms, "cuBLAS"))
            if name == "gate_up":
                nbytes = w_bytes + m * k * 2 + m * (n // 2) * 2
                ms = time_isolated_ms([lambda a=a: gemv.gate_up_silu(*a) for a in sets])
                peer_ms = time_isolated_ms([lambda a=a: _peer_gate_up_silu(*a) for a in sets])
                rows.append(row(f"gate_up_silu M={m} I={n // 2} K={k}", ms, nbytes, ceilings, peer_ms,
                                "cuBLAS+silu_and_mul"))
        del weights
    return rows


if __name__ == "__main__":
    require_cuda()
    print_table(run({"copy_GBps": copy_bandwidth_GBps()}))
