"""Static vs dynamic EPD on the seed's offline case (issue 15): N requests with one image each at
once, the first `--short` with `--short-tokens` output tokens and the rest with `--long-tokens`;
the same placement without and with `dynamic` (engine/allocator.py). Reports the makespan, output
tokens/s, TTFT / TPOT p50 and p90, and every switch the allocator made with its reason.

    python scripts/bench_dynamic.py --model /tmp/llava-7b                                # one GPU
    python scripts/bench_dynamic.py --model /tmp/llava-7b --placement "E:0,1 P:2 D:3"    # four GPUs
    python scripts/bench_dynamic.py --model tiny --backend torch --placement "E:cpu,cpu P:cpu D:cpu"
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine import SamplingParams  # noqa: E402
from engine.allocator import AllocatorPolicy  # noqa: E402
from engine.epd import EPDEngine  # noqa: E402
from scripts.bench_epd import requests  # noqa: E402


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def run(args, dynamic: bool) -> dict:
    device = "cuda:0" if args.backend == "cuda" else "cpu"
    policy = AllocatorPolicy(slo_ttft_s=args.slo_ttft, slo_tpot_s=args.slo_tpot, max_num_seqs=args.max_num_seqs,
                             interval_s=args.interval, min_cooldown_s=args.cooldown, min_dwell_s=args.dwell)
    reqs = requests(args.requests, 1, (args.image_size, args.image_size), "jpeg", seed=3)
    sps = [SamplingParams(max_tokens=args.short_tokens if i < args.short else args.long_tokens, ignore_eos=True)
           for i in range(args.requests)]
    with EPDEngine(args.model, placement=args.placement, backend=args.backend, device=device,
                   dtype="bfloat16" if args.backend == "cuda" else "float32", max_num_seqs=args.max_num_seqs,
                   dynamic=policy if dynamic else False, progress=False) as epd:
        epd.generate(requests(2, 1, (args.image_size, args.image_size), "jpeg", seed=9), SamplingParams(max_tokens=4))
        start = time.perf_counter()
        seqs = [epd.add_request(r, sp) for r, sp in zip(reqs, sps)]
        outputs, deadline = {}, time.monotonic() + args.timeout
        while len(outputs) < len(seqs) and time.monotonic() < deadline:
            for ev in epd.step(timeout_s=0.05):
                if ev.output is not None or ev.error:
                    outputs[ev.index] = ev
        makespan = time.perf_counter() - start
        status = epd.status()
    done = [ev.output for ev in outputs.values() if ev.output is not None]
    tokens = sum(len(o.token_ids) for o in done)
    tpots = [(o.e2e_s - o.ttft_s) / (len(o.token_ids) - 1) for o in done if len(o.token_ids) > 1]
    return {"label": "dynamic" if dynamic else "static", "finished": len(done), "failed": len(seqs) - len(done),
            "makespan_s": makespan, "tokens_per_s": tokens / makespan,
            "ttft_p50": pct([o.ttft_s for o in done], 0.5), "ttft_p90": pct([o.ttft_s for o in done], 0.9),
            "tpot_p50": statistics.median(tpots) if tpots else float("nan"), "tpot_p90": pct(tpots, 0.9),
            "decisions": status.get("allocator", {}).get("decisions", []),
            "placement_after": sorted(n for n, alive in status["stages_alive"].items() if alive)}


def main(argv: list[str] | None = None) -> None:
    from engine.cli import ArgumentParser, positive_int

    p = ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, help="LLaVA checkpoint dir")
    p.add_argument("--placement", default="E:0,0 P:0 D:0", help="the placement both runs start from")
    p.add_argument("--backend", default="cuda", choices=["cuda", "torch"], help="torch: on the CPU (tiny models)")
    p.add_argument("--requests", type=int, default=100, help="requests sent at once")
    p.add_argument("--short", type=int, default=10, help="the first requests, with --short-tokens")
    p.add_argument("--short-tokens", type=int, default=50, help="output tokens of the short requests")
    p.add_argument("--long-tokens", type=int, default=500, help="output tokens of the others")
    p.add_argument("--image-size", type=int, default=336, help="square JPEG side")
    p.add_argument("--max-num-seqs", type=int, default=64, help="requests a decode instance runs at once")
    p.add_argument("--slo-ttft", type=float, default=1.4, help="TTFT SLO (s) the allocator steers to")
    p.add_argument("--slo-tpot", type=float, default=0.04, help="TPOT SLO (s) the allocator steers to")
    p.add_argument("--interval", type=float, default=1.0, help="allocator evaluation interval (s)")
    p.add_argument("--cooldown", type=float, default=5.0, help="allocator minimum cooldown (s)")
    p.add_argument("--dwell", type=float, default=10.0, help="allocator minimum dwell (s)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per run at most")
    p.add_argument("--only", choices=["static", "dynamic"], help="one of the two runs")
    args = p.parse_args(argv)
    for flag in ("requests", "short_tokens", "long_tokens", "image_size", "max_num_seqs"):
        positive_int(f"--{flag.replace('_', '-')}", getattr(args, flag))
    if not 0 <= args.short <= args.requests:
        p.error(f"--short = {args.short}; must be in [0, --requests]")
    rows = [run(args, dynamic) for dynamic in (False, True) if args.only in (None, "dynamic" if dynamic else "static")]
    print(f"{args.requests} requests at once on {args.placement!r}: {args.short} x {args.short_tokens} tokens, "
          f"{args.requests - args.short} x {args.long_tokens}")
    print("| run | finished | makespan s | tokens/s | TTFT p50 / p90 s | TPOT p50 / p90 ms | stages after |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['finished']}/{r['finished'] + r['failed']} | {r['makespan_s']:.2f} | "
              f"{r['tokens_per_s']:.0f} | {r['ttft_p50']:.2f} / {r['ttft_p90']:.2f} | "
              f"{1e3 * r['tpot_p50']:.1f} / {1e3 * r['tpot_p90']:.1f} | {' '.join(r['placement_after'])} |")
    for r in rows:
        for d in r["decisions"]:
            print(f"{r['label']}: t={d['t_s']:.1f}s {d['stage']} -> {d['to']}: {d['reason']}"
                  + (f"; refused: {d['refused']}" if "refused" in d else "")
                  + (f"; serves as {d['new_stage']} after {d['seconds']:.2f} s (drain {d.get('drain_s', 0):.2f} s)"
                     if "new_stage" in d else ""))
    sys.exit(0 if all(r["failed"] == 0 for r in rows) else 1)


if __name__ == "__main__":
    from engine.cli import run_main

    sys.exit(run_main(main))
