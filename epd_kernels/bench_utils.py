"""Shared helpers of the kernel benchmarks (kernels/*/bench.py, scripts/bench_kernels.py): input-set
rotation past L2, two timing methods, the ceilings they are measured against and the row/table format.

Both timers take one closure per rotated input set and return the median milliseconds of one call:
time_isolated_ms times single launches (device time of one call, host overhead hidden);
time_graph_ms times back-to-back calls replayed from a CUDA graph (as decode runs).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

import torch

L2_BYTES = 50 * 2**20
SLEEP_CYCLES = 2_000_000  # ~1 ms: longer than the host needs to enqueue one call of any benchmarked op


def require_cuda() -> None:
    """Exit with a clear message where there is no GPU to benchmark on."""
    if not torch.cuda.is_available():
        raise SystemExit("the kernel benchmarks need a CUDA GPU and the built extension epd_kernels._epd_C")


def num_sets(bytes_per_call: int, cap: int = 64) -> int:
    """Input sets to rotate through so one pass moves at least 2x L2 (1 if one call moves L2; capped)."""
    return 1 if bytes_per_call >= L2_BYTES else min(cap, math.ceil(2 * L2_BYTES / bytes_per_call))


def time_isolated_ms(fns: list[Callable[[], object]], reps: int = 50, warmup: int = 5) -> float:
    """Median ms of one call over reps launches, cycling through fns (one per rotated input set).

    A GPU sleep before each timed launch lets the host enqueue it ahead, so the events around it
    measure device time rather than Python and launch overhead."""
    for i in range(warmup):
        fns[i % len(fns)]()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        torch.cuda._sleep(SLEEP_CYCLES)
        starts[i].record()
        fns[i % len(fns)]()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def time_graph_ms(fns: list[Callable[[], object]], repeats: int = 25, min_calls: int = 16) -> float:
    """Median ms of one call from repeats replays of a CUDA graph of max(len(fns), min_calls) calls
    cycling through fns (one per rotated input set), so launch gaps amortise as under decode's graphs."""
    calls = max(len(fns), min_calls)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns:  # warm up (allocator, lazy init) outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def copy_bandwidth_GBps(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy rate of nbytes, counting bytes read + written; median of 20."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    return 2 * nbytes / time_isolated_ms([lambda: dst.copy_(src)], reps=20) / 1e6


def gemm_tflops(n: int = 8192) -> float:
    """cuBLAS bf16 [n, n] @ [n, n] rate; median of 20."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    return 2 * n**3 / time_isolated_ms([lambda: a @ b], reps=20) / 1e9


def row(case: str, ms: float, nbytes: int, ceilings: dict, peer_ms: float, peer: str) -> dict:
    """A bandwidth-bound case's row: nbytes moved in ms, against the copy ceiling."""
    gbps = nbytes / ms / 1e6
    ceiling = ceilings["copy_GBps"]
    return {"case": case, "ms": ms, "achieved": gbps, "unit": "GB/s", "ceiling": ceiling,
            "pct": 100 * gbps / ceiling, "peer_ms": peer_ms, "peer": peer}


def randn(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device="cuda").to(dtype)


def print_table(rows: list[dict]) -> None:
    print(f"{'case':<48} {'ms':>9} {'achieved':>14} {'% ceil':>7} {'peer ms':>9} {'speedup':>8}")
    for r in rows:
        print(f"{r['case']:<48} {r['ms']:9.4f} {r['achieved']:9.1f} {r['unit']:<4} {r['pct']:7.1f} "
              f"{r['peer_ms']:9.4f} {r['peer_ms'] / r['ms']:7.2f}x")
