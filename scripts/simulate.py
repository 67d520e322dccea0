"""The engine simulated (engine/simulator/): predicted TTFT, TPOT, SLO attainment and goodput of a
placement from a measured cost model, with bench_serve.py's workload, seeds and summaries.

    python scripts/simulate.py --costs costs.json --mode epd --placement "E:0,0 P:0 D:0" --rates 1,2,4 \\
        --num-requests 100 --images-per-request 2 --image-size 1920x1080 --max-tokens 10
    python scripts/simulate.py --costs costs.json --phases "requests=100,rate=8,images=2;requests=100,rate=8,images=0"
    python scripts/simulate.py --costs costs.json --search --gpus 4 --images-per-request 2   # placements ranked
    python scripts/simulate.py --costs costs.json --mode epd --placement "E:0,0 P:0 D:0" --compare runs/epd.jsonl

Rates run in turn as bench_serve.py runs them (the i-th with seed + i); --phases is one run of
phases back to back. --search ranks every placement of the three modes on --gpus GPUs by goodput
per GPU (the highest rate with attainment >= --attainment-target, every phase at that rate).
--compare simulates the requests of a bench_serve.py records file (their send times, images and
tokens) and prints predicted vs measured TTFT p50 / p90 and attainment per rate; with
--repeated-images the file is one bench_serve.py run against one server (the same images at every
rate, after --warmup-requests, so cached after their first sending: engine/simulator/compare.py).
The cost model's "calibration" section, if any, applies (scripts/fit_simulator.py fits it). --out writes a
summary in bench_serve.py's layout (plot_serve.py reads it), --records the predicted records.
Placements: engine/placement.py's for epd and pd; "A:0,1" (one aggregated instance per entry).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.cli import ArgumentParser, CLIError, positive_int, run_main  # noqa: E402
from engine.simulator.compare import compare, format_rows  # noqa: E402
from engine.simulator.cost_model import CostModel  # noqa: E402
from engine.simulator.events import ProcessorSharing, Unshared  # noqa: E402
from engine.simulator.metrics import goodput_by_attainment, goodput_by_p99  # noqa: E402
from engine.simulator.search import SearchSettings, search  # noqa: E402
from engine.simulator.sim import DEFAULT_PLACEMENTS, MODES, SimConfig, parse_devices, simulate  # noqa: E402
from engine.simulator.workload import Phase, parse_phases, phase_dict, with_rate  # noqa: E402
from scripts import plot_serve  # noqa: E402
from scripts.bench_serve import format_table, parse_rates, parse_size, strict_json, write_summary  # noqa: E402

SHARING = {"processor": ProcessorSharing, "none": Unshared}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--costs", required=True, help="cost model JSON (the profiler's output)")
    p.add_argument("--mode", choices=MODES, default="epd", help="the engine's mode")
    p.add_argument("--placement", help='instances and their GPUs (default: "E:0,0 P:0 D:0", "P:0 D:0" or "A:0")')
    p.add_argument("--rates", help="request rates (req/s) in turn; inf = all at once (default: 1,2,4)")
    p.add_argument("--num-requests", type=int, default=100, help="requests per rate")
    p.add_argument("--images-per-request", type=int, default=1, help="images per request")
    p.add_argument("--image-size", default="336x336", help="image resolution WxH")
    p.add_argument("--max-tokens", type=int, default=10, help="output tokens per request")
    p.add_argument("--prompt-tokens", type=int, default=22, help="text tokens per prompt (besides image tokens)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the inter-arrival times")
    p.add_argument("--seed", type=int, default=0, help="seeds the arrivals (as bench_serve.py)")
    p.add_argument("--phases", help="one run of phases instead of --rates (bench_serve.py's --phases syntax)")
    p.add_argument("--slo-ttft", type=float, default=1.4, help="TTFT SLO in seconds")
    p.add_argument("--slo-tpot", type=float, default=0.04, help="TPOT SLO in seconds")
    p.add_argument("--attainment-target", type=float, default=0.9, help="goodput: attainment at least this")
    p.add_argument("--max-num-seqs", type=int, default=SimConfig.max_num_seqs, help="engine setting")
    p.add_argument("--max-num-batched-tokens", type=int, default=SimConfig.max_num_batched_tokens,
                   help="engine setting")
    p.add_argument("--max-images-per-batch", type=int, default=SimConfig.max_images_per_batch, help="engine setting")
    p.add_argument("--image-workers", type=int, default=SimConfig.image_workers,
                   help="aggregated: image preprocessing threads")
    p.add_argument("--sharing", choices=sorted(SHARING), default="processor",
                   help="instances on one GPU: processor sharing, or none (each as if alone)")
    p.add_argument("--search", action="store_true", help="rank every placement on --gpus GPUs by goodput per GPU")
    p.add_argument("--gpus", type=int, help="GPUs for --search")
    p.add_argument("--compare", help="a bench_serve.py records JSONL: predicted vs measured per rate")
    p.add_argument("--repeated-images", action="store_true",
                   help="--compare: one bench_serve.py run on one server (request i's images at every rate: "
                        "encoded once, then cached)")
    p.add_argument("--warmup-requests", type=int, default=1,
                   help="--repeated-images: bench_serve.py's warm-up requests before the first rate")
    p.add_argument("--label", help="name of the run in the summary (default: sim-<mode>)")
    p.add_argument("--records", help="write the predicted per-request records (JSON lines) here")
    p.add_argument("--out", help="write the summary JSON here")
    return p


def check_args(args: argparse.Namespace) -> None:
    for flag in ("num_requests", "max_tokens", "max_num_seqs", "max_num_batched_tokens", "image_workers", "gpus"):
        positive_int(f"--{flag.replace('_', '-')}", getattr(args, flag))
    for flag in ("images_per_request", "prompt_tokens", "max_images_per_batch", "warmup_requests"):
        if getattr(args, flag) < 0:
            raise CLIError(f"--{flag.replace('_', '-')} = {getattr(args, flag)}; must be >= 0")
    for flag in ("slo_ttft", "slo_tpot", "burstiness"):
        if not 0 < getattr(args, flag) < float("inf"):
            raise CLIError(f"--{flag.replace('_', '-')} = {getattr(args, flag)}; must be a positive number")
    if not 0 < args.attainment_target <= 1:
        raise CLIError(f"--attainment-target = {args.attainment_target}; must be in (0, 1]")
    if args.search and args.compare:
        raise CLIError("--search and --compare are separate runs; pick one")
    if args.search != (args.gpus is not None):
        raise CLIError("--search needs --gpus N (and --gpus is for --search)")
    if args.phases and args.rates:
        raise CLIError("--phases sets each phase's rate; drop --rates")
    if args.search and args.placement:
        raise CLIError("--search tries every placement; drop --placement")


def workload(args: argparse.Namespace) -> list[Phase]:
    """The phases to run: --phases, or one phase of the flags (its rate set per run)."""
    if args.phases:
        try:
            return parse_phases(args.phases)
        except ValueError as e:
            raise CLIError(f"--phases: {e}") from None
    return [Phase(args.num_requests, 1.0, args.images_per_request, parse_size(args.image_size), args.prompt_tokens,
                  args.max_tokens, args.burstiness)]


def run_rates(args: argparse.Namespace, costs: CostModel, config: SimConfig, phases: list[Phase]) -> dict:
    """Each rate in turn (or the one --phases run); printed as bench_serve.py prints, summarized."""
    settings = dict(config=config, slo_ttft=args.slo_ttft, slo_tpot=args.slo_tpot, sharing=SHARING[args.sharing])
    runs = ([(phases, args.seed)] if args.phases else
            [(with_rate(phases, rate), args.seed + i) for i, rate in enumerate(parse_rates(args.rates or "1,2,4"))])
    per_rate, records, overall = [], [], None
    for run_phases, seed in runs:
        result = simulate(costs, args.mode, args.placement, run_phases, seed=seed, phased=bool(args.phases),
                          **settings)
        records += result.records
        if args.phases:
            per_rate, overall = result.per_phase, result.summary
            summaries = [*result.per_phase, overall]
        else:
            per_rate.append(result.summary)
            summaries = [result.summary]
        for summary in summaries:
            print(format_table(summary), flush=True)
    label = args.label or f"sim-{args.mode}"
    if args.records:
        Path(args.records).parent.mkdir(parents=True, exist_ok=True)
        with open(args.records, "w") as f:
            for rec in records:
                f.write(json.dumps(strict_json({"label": label, **rec}), allow_nan=False) + "\n")
    goodput = {"by_attainment": goodput_by_attainment(per_rate, args.attainment_target),
               "by_p99": goodput_by_p99(per_rate, args.slo_ttft, args.slo_tpot)}
    fmt = lambda r: "none" if r is None else f"{r:g} req/s"
    print(f"predicted goodput: {fmt(goodput['by_attainment'])} (>= {args.attainment_target:.0%} attain TTFT < "
          f"{args.slo_ttft:g} s and TPOT < {args.slo_tpot:g} s); P99 definition: {fmt(goodput['by_p99'])}")
    return {"label": label, "simulated": True, "mode": args.mode,
            "placement": args.placement or DEFAULT_PLACEMENTS[args.mode],
            "costs": str(Path(args.costs).resolve()), "config": config.__dict__, "sharing": args.sharing,
            "phases": [phase_dict(p) for p in phases] if args.phases else None, "seed": args.seed,
            "num_requests": args.num_requests, "images_per_request": args.images_per_request,
            "image_size": list(parse_size(args.image_size)), "max_tokens": args.max_tokens,
            "slo": {"ttft_s": args.slo_ttft, "tpot_s": args.slo_tpot, "attainment_target": args.attainment_target},
            "records_file": str(Path(args.records).resolve()) if args.records else None,
            "rates": per_rate, "overall": overall, "goodput": goodput}


def run_search(args: argparse.Namespace, costs: CostModel, config: SimConfig, phases: list[Phase]) -> dict:
    settings = SearchSettings(slo_ttft=args.slo_ttft, slo_tpot=args.slo_tpot, target=args.attainment_target,
                              seed=args.seed)
    rows = search(costs, args.gpus, phases, config, settings)
    print(f"{'rank':>4} {'mode':<11} {'placement':<40} {'goodput':>9} {'per GPU':>9}")
    for i, r in enumerate(rows, 1):
        print(f"{i:>4} {r['mode']:<11} {r['placement']:<40} {r['goodput']:>9.2f} {r['goodput_per_gpu']:>9.2f}")
    return {"search": rows, "gpus": args.gpus, "phases": [phase_dict(p) for p in phases],
            "slo": {"ttft_s": args.slo_ttft, "tpot_s": args.slo_tpot, "attainment_target": args.attainment_target}}


def read_records(path: str) -> list[dict]:
    """plot_serve.py's reader, and the fields a comparison needs checked."""
    records = plot_serve.read_records(Path(path))
    for n, rec in enumerate(records, 1):
        missing = [k for k in ("scheduled_s", "request_id", "max_tokens") if k not in rec]
        if missing:
            raise CLIError(f"{path}: record {n} has no {missing[0]!r}; not a bench_serve.py record")
    if not records:
        raise CLIError(f"{path}: no records")
    return records


def run_compare(args: argparse.Namespace, costs: CostModel, config: SimConfig, phases: list[Phase]) -> dict:
    rows = compare(costs, args.mode, args.placement, read_records(args.compare), [p.image_size for p in phases],
                   args.prompt_tokens, config, args.slo_ttft, args.slo_tpot, args.repeated_images,
                   args.warmup_requests)
    print(format_rows(rows))
    return {"compare": rows, "records_file": str(Path(args.compare).resolve()), "mode": args.mode,
            "placement": args.placement or DEFAULT_PLACEMENTS[args.mode]}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    if not args.search:
        try:
            parse_devices(args.mode, args.placement)
        except ValueError as e:
            raise CLIError(f"--placement: {e}") from None
    costs = CostModel.load(args.costs)
    config = SimConfig(args.max_num_seqs, args.max_num_batched_tokens, args.max_images_per_batch, args.image_workers)
    phases = workload(args)
    run = run_search if args.search else run_compare if args.compare else run_rates
    result = run(args, costs, config, phases)
    if args.out:
        write_summary(args.out, result)
        print(f"summary: {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
