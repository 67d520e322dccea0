"""Where a decode step's time goes: per-kernel device time inside the CUDA graphs, and the time
the GPU sits between kernels, for one batch size (default: batch 1 at context 640, 8 steps per call).

    python scripts/profile_decode.py --model /tmp/llava-7b [--batch 1,8] [--context 640]

Per batch size: the median ms per step timed without the profiler, then a profile of 3 calls:
kernels grouped by name (ours keep their template arguments), the idle time between kernels, and
one layer's kernels in launch order with the gap before each.
"""

from __future__ import annotations

import re
import statistics
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine import LLM  # noqa: E402
from scripts.bench_decode import prefilled_sequences, timed_decode  # noqa: E402


def short_name(name: str) -> str:
    """Kernel name without namespaces and parameter list; our kernels keep their template
    arguments (they tell the GEMV variants apart), others lose them."""
    name = re.sub(r"\(.*", "", name.replace("(anonymous namespace)", "")).removeprefix("void ")
    if name.startswith("epd::"):
        name = name.replace("epd::::", "").replace("epd::", "").replace("__nv_bfloat16", "bf16")
        return name.replace("false", "0").replace("true", "1")[:70]
    depth, out = 0, []
    for ch in name:
        depth += ch == "<"
        if depth == 0:
            out.append(ch)
        depth -= ch == ">"
    base = "".join(out).split("::")[-1].strip()
    return base[:60] or name[:60]


def busy_time(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def profile_once(llm: LLM, batch: int, context: int, steps: int, calls: int) -> None:
    seqs = prefilled_sequences(llm, batch, context, (calls + 3) * steps)
    times = [timed_decode(llm, seqs, steps) / steps for _ in range(calls)]
    ms = 1e3 * statistics.median(times[1:])
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            timed_decode(llm, seqs, steps)
        torch.cuda.synchronize()
    for s in seqs:
        llm.engine.kv_blocks.free(s.block_table)

    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if not kernels:
        print("the profiler recorded no kernels (CUPTI did not trace the graph's nodes)")
        return
    n_steps = 3 * steps
    groups: dict[str, list[float]] = {}
    for e in kernels:
        groups.setdefault(short_name(e.name), []).append(e.time_range.elapsed_us())
    intervals = [(e.time_range.start, e.time_range.end) for e in kernels]
    span = max(e for _, e in intervals) - min(s for s, _ in intervals)
    busy = busy_time(intervals)
    summed = sum(sum(v) for v in groups.values())
    print(f"timed: {ms:.3f} ms/step; profiled {n_steps} steps: span {span / n_steps / 1e3:.3f} ms/step, "
          f"kernels busy {busy / n_steps / 1e3:.3f}, idle {(span - busy) / n_steps / 1e3:.3f}, "
          f"sum of kernel durations {summed / n_steps / 1e3:.3f}, {len(kernels) / n_steps:.0f} kernels/step")
    seq = sorted(kernels, key=lambda e: e.time_range.start)
    mid = len(seq) // 2
    print("one layer in the middle of a step (start order): kernel, duration us, start - previous end us")
    for prev, e in zip(seq[mid - 1 : mid + 11], seq[mid : mid + 12]):
        gap = e.time_range.start - prev.time_range.end
        print(f"  {short_name(e.name)}: {e.time_range.elapsed_us():.2f}, {gap:+.2f}")
    print("| kernel | per step | us each (median) | us/step | % of span |")
    print("|---|---|---|---|---|")
    for name, durs in sorted(groups.items(), key=lambda kv: -sum(kv[1])):
        per_step = sum(durs) / n_steps
        print(f"| {name} | {len(durs) / n_steps:.1f} | {statistics.median(durs):.2f} | {per_step:.1f} | "
              f"{100 * per_step * n_steps / span:.1f}% |")


def main(argv: list[str] | None = None) -> None:
    from engine.cli import ArgumentParser, int_list, positive_int, require_cuda_backend

    p = ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, help="checkpoint dir (e.g. from scripts/make_random_model.py)")
    p.add_argument("--batch", default="1", help="batch sizes, comma-separated")
    p.add_argument("--context", type=int, default=640, help="tokens of context per sequence")
    p.add_argument("--steps", type=int, default=8, help="decode steps per call (one graph replay each)")
    p.add_argument("--calls", type=int, default=12, help="timed calls per batch size")
    args = p.parse_args(argv)
    batches = int_list("--batch", args.batch)
    positive_int("--context", args.context)
    positive_int("--steps", args.steps, 64)
    positive_int("--calls", args.calls)
    require_cuda_backend("the decode profile")
    llm = LLM(args.model, backend="cuda", dtype="bfloat16", device="cuda", max_num_seqs=max(8, *batches),
              max_num_batched_tokens=8 * args.context, multi_step=args.steps)
    for b in batches:
        print(f"\n## batch {b}, context {args.context}, {args.steps} steps per call", flush=True)
        profile_once(llm, b, args.context, args.steps, args.calls)


if __name__ == "__main__":
    from engine.cli import run_main

    sys.exit(run_main(main))
