"""Benchmark the sampler and the penalties at LLaVA-1.5-7B's vocabulary against the torch reference.

    python -m epd_kernels.sampling.bench     # prints the table, measuring the copy ceiling itself

Sampler bytes are the minimum moved (logits read once); the kernel makes several passes over a
row (1 for greedy, ~7 for top-p), mostly from L1/L2. Penalties are timed inside a CUDA graph, as
decode runs them: "no slots" is the cost a batch without penalties pays (out of place: the rows are
copied; in place: they are skipped), "all slots" reads logits, counts and prompt mask per row.
"""

from __future__ import annotations

import torch

from epd_kernels import _epd_C, reference
from epd_kernels import sampling as ks
from epd_kernels.bench_utils import (
    copy_bandwidth_GBps,
    num_sets,
    print_table,
    require_cuda,
    row,
    time_graph_ms,
    time_isolated_ms,
)


def run(ceilings: dict) -> list[dict]:
    return run_sample(ceilings) + run_penalties(ceilings)


def run_penalties(ceilings: dict) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(1)
    vocab, rows = 32064, []
    for mode in ["no slots", "no slots, in place", "all slots"]:
        for batch in [1, 32, 256]:
            slots_total = batch + 16
            counts = torch.randint(0, 3, (slots_total, vocab), device="cuda", generator=gen, dtype=torch.int32)
            mask = torch.rand((slots_total, vocab), device="cuda", generator=gen) < 0.02
            # bytes moved: logits in and out, plus counts and mask rows with slots; in place, the slots only
            nbytes = {"no slots": 8, "no slots, in place": 0, "all slots": 13}[mode] * batch * vocab + batch * 8
            sets = []
            for _ in range(num_sets(max(nbytes, 1 << 20))):
                logits = torch.randn((batch, vocab), device="cuda", generator=gen) * 3
                slots = (torch.full((batch,), -1, device="cuda") if mode.startswith("no")
                         else torch.randperm(slots_total, device="cuda", generator=gen)[:batch])
                params = [torch.rand(batch, device="cuda", generator=gen) + 0.5 for _ in range(3)]
                sets.append((logits, counts, mask, slots, *params))
            if mode.endswith("in place"):
                fns = [lambda a=a: _epd_C.apply_penalties(a[0], *a) for a in sets]
            else:
                fns = [lambda a=a: ks.apply_penalties(*a) for a in sets]
            ms = time_graph_ms(fns)
            peer_ms = time_isolated_ms([lambda a=a: reference.apply_penalties(*a) for a in sets])
            rows.append(row(f"apply_penalties {mode} B={batch} V={vocab}", ms, nbytes, ceilings, peer_ms, "torch"))
    return rows


def run_sample(ceilings: dict) -> list[dict]:
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
