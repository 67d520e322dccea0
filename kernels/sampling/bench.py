"""Benchmark the sampler at LLaVA-1.5-7B's vocabulary against the torch reference (sort-based).

    python -m kernels.sampling.bench     # prints the table, measuring the copy ceiling itself

Bytes are the minimum moved (logits read once); the kernel makes several passes over a row
(1 for greedy, ~7 for top-p), mostly from L1/L2.
"""

from __future__ import annotations

import torch

from kernels import reference
from kernels import sampling as ks
from kernels.bench_utils import copy_bandwidth_GBps, num_sets, print_table, require_cuda, row, time_isolated_ms


def run(ceilings: dict) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    vocab, rows = 32064, []
    for mode in ["greedy", "top_p=0.9"]:
        for batch in [1, 32, 256]:
            nbytes = batch * vocab * 4
            sets = []
            for _ in range(num_sets(nbytes)):
                logits = torch.randn((batch, vocab), device="cuda", generator=gen) * 3
                temperature = torch.full((batch,), 0.0 if mode == "greedy" else 1.0, device="cuda")
                top_k = torch.zeros(batch, dtype=torch.int64, device="cuda")
                top_p = torch.full((batch,), 1.0 if mode == "greedy" else 0.9, device="cuda")
                seeds = torch.randint(0, 2**62, (batch,), device="cuda", generator=gen)
                steps = torch.randint(0, 1000, (batch,), device="cuda", generator=gen)
                sets.append((logits, temperature, top_k, top_p, seeds, steps))
            ms = time_isolated_ms([lambda a=a: ks.sample(*a) for a in sets])
            peer_ms = time_isolated_ms([lambda a=a: reference.sample(*a) for a in sets])
            rows.append(row(f"sample {mode} B={batch} V={vocab}", ms, nbytes, ceilings, peer_ms, "torch"))
    return rows


if __name__ == "__main__":
    require_cuda()
    print_table(run({"copy_GBps": copy_bandwidth_GBps()}))
