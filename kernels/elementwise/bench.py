"""Benchmark the elementwise kernels at LLaVA-1.5-7B shapes against plain torch (kernels.reference).

    python -m kernels.elementwise.bench     # prints the table, measuring the copy ceiling itself
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

import torch

from kernels import elementwise as ew
from kernels import reference

L2_BYTES = 50 * 2**20
MAX_SETS = 64
SLEEP_CYCLES = 2_000_000  # ~1 ms: longer than the host needs to enqueue one call of any op here


def time_ms(fn: Callable[..., object], arg_sets: list[tuple], reps: int = 50, warmup: int = 5) -> float:
    """Median ms of fn over reps launches, rotating through arg_sets (fresh inputs, L2 not reused).

    A GPU sleep before each timed launch lets the host enqueue it ahead, so the events measure
    device time rather than Python and launch overhead."""
    for i in range(warmup):
        fn(*arg_sets[i % len(arg_sets)])
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        torch.cuda._sleep(SLEEP_CYCLES)
        starts[i].record()
        fn(*arg_sets[i % len(arg_sets)])
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def num_sets(bytes_per_call: int) -> int:
    """Enough input sets that rotating through them streams at least 2x L2 (capped)."""
    return 1 if bytes_per_call >= L2_BYTES else min(MAX_SETS, math.ceil(2 * L2_BYTES / bytes_per_call))


def row(case: str, ms: float, nbytes: int, ceilings: dict, peer_ms: float, peer: str) -> dict:
    gbps = nbytes / ms / 1e6
    ceiling = ceilings["copy_GBps"]
    return {"case": case, "ms": ms, "achieved": gbps, "unit": "GB/s", "ceiling": ceiling,
            "pct": 100 * gbps / ceiling, "peer_ms": peer_ms, "peer": peer}


def randn(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device="cuda").to(dtype)


def run(ceilings: dict) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    dtype, rows = torch.bfloat16, []

    inter = 11008
    for tokens in [1, 32, 640]:
        nbytes = tokens * 3 * inter * 2
        sets = [(randn((tokens, 2 * inter), dtype, gen),) for _ in range(num_sets(nbytes))]
        rows.append(row(f"silu_and_mul T={tokens} I={inter}", time_ms(ew.silu_and_mul, sets), nbytes, ceilings,
                        time_ms(reference.silu_and_mul, sets), "torch"))

    shape = (577 * 8, 4096)
    nbytes = 2 * math.prod(shape) * 2
    sets = [(randn(shape, dtype, gen),) for _ in range(num_sets(nbytes))]
    for name in ["gelu", "quick_gelu"]:
        rows.append(row(f"{name} {shape[0]}x{shape[1]}", time_ms(getattr(ew, name), sets), nbytes, ceilings,
                        time_ms(getattr(reference, name), sets), "torch"))

    tokens, hidden, vocab, images = 640, 4096, 32064, 576
    weight = randn((vocab, hidden), dtype, gen)
    nbytes = 2 * tokens * hidden * 2 + 2 * tokens * 8
    sets = []
    for _ in range(num_sets(nbytes)):
        ids = torch.randint(0, vocab, (tokens,), device="cuda", generator=gen)
        index = torch.full((tokens,), -1, dtype=torch.int64, device="cuda")
        index[10 : 10 + images] = torch.randperm(images, device="cuda", generator=gen)
        sets.append((ids, weight, index, randn((images, hidden), dtype, gen)))
    rows.append(row(f"embed_tokens T={tokens} H={hidden} ({images} image rows)", time_ms(ew.embed_tokens, sets),
                    nbytes, ceilings, time_ms(reference.embed_tokens, sets), "torch"))
    return rows


def copy_bandwidth_GBps() -> float:
    """Device-to-device copy of 1 GiB, bytes read + written."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), [()], reps=20)
    return 2 * src.numel() / ms / 1e6


def print_table(rows: list[dict]) -> None:
    print(f"{'case':<48} {'ms':>9} {'achieved':>14} {'% ceil':>7} {'peer ms':>9} {'speedup':>8}")
    for r in rows:
        print(f"{r['case']:<48} {r['ms']:9.4f} {r['achieved']:9.1f} {r['unit']:<4} {r['pct']:7.1f} "
              f"{r['peer_ms']:9.4f} {r['peer_ms'] / r['ms']:7.2f}x")


if __name__ == "__main__":
    print_table(run({"copy_GBps": copy_bandwidth_GBps()}))
