"""Fit the simulator's calibration (engine/simulator/cost_model.py: request_overhead_s,
encode_batch_overhead_s, colocation_factor) on measured bench_serve.py runs, and check it on others.

    python scripts/fit_simulator.py --costs costs.json --records fit.jsonl --out calibrated.json \\
        --check other.jsonl --image-size 1920x1080 --placement "E:0,0 P:0 D:0"
    python scripts/fit_simulator.py --costs calibrated.json --check other.jsonl   # check a calibration as is

The fit minimizes the mean, over the runs (rates) of --records, of |TTFT p50 error| and |TTFT p90
error| in percent of the measured value and |attainment difference| in percentage points
(engine/simulator/compare.py's simulation of the same requests). Coordinate search:
colocation_factor and encode_batch_overhead_s in turn over a grid (each point one simulation of
the file), then the grids halved around the best, until nothing improves; request_overhead_s is
solved at every point without simulating again: a constant delay of every dispatch shifts the
whole run, so it adds exactly itself to every predicted TTFT (p50, p90 and each request's SLO
test are shifted, and scanned over a fine grid). The calibrated cost model is the input with its
"calibration" section set (and how it was fitted); it prints the fit table and, with --check, the
same on the other file: per rate predicted / measured and the errors, and how many rates have all
three within +-10 (percent for TTFT p50 / p90, points for attainment).

bench_serve.py --same-images sends the same images at every rate of a run to one server (after a
warm-up request), so they are cached after their first sending; the simulation does the same
(compare.py's repeated_images) unless --fresh-images, for bench_serve.py's default runs (new
images at every rate). A rate listed twice in --rates is two runs, simulated each on its own and
pooled (compare.py), so that one server start can measure each rate at two times.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from bisect import bisect_left
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.cli import ArgumentParser, CLIError, run_main  # noqa: E402
from engine.simulator.compare import compare, rows_of, simulate_runs  # noqa: E402
from engine.simulator.cost_model import Calibration, CostModel  # noqa: E402
from engine.simulator.metrics import meets_slo  # noqa: E402
from engine.simulator.sim import SimConfig, parse_devices  # noqa: E402
from engine.simulator.workload import parse_size  # noqa: E402

WITHIN = 10.0  # percent (TTFT p50 / p90) and points (attainment): a rate "within" has all three inside
# coarse grids of the simulated parameters (refined around the best, halving the step)
GRIDS = {
    "colocation_factor": (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5, 2.0, 3.0),
    "encode_batch_overhead_s": (0.0, 0.0025, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.0175, 0.02, 0.025, 0.03, 0.04),
}
REQUEST_OVERHEAD_MAX_S, REQUEST_OVERHEAD_STEP_S = 0.15, 0.0002  # its scan (no simulation per value)


class Problem:
    """One records file to fit: the simulation settings, the measured runs, the objective."""

    def __init__(self, costs: CostModel, records: list[dict], mode: str = "epd", placement: str | None = None,
                 sizes: list[tuple[int, int]] | None = None, prompt_tokens: int = 22,
                 config: SimConfig | None = None, slo_ttft: float = 1.4, slo_tpot: float = 0.04,
                 repeated_images: bool = True, warmup: int = 1) -> None:
        self.costs, self.records, self.mode, self.placement = costs, records, mode, placement
        self.sizes, self.prompt_tokens, self.config = sizes or [(336, 336)], prompt_tokens, config
        self.slo_ttft, self.slo_tpot = slo_ttft, slo_tpot
        self.repeated_images, self.warmup = repeated_images, warmup
        self.simulations = 0
        self.d_grid = [k * REQUEST_OVERHEAD_STEP_S
                       for k in range(int(round(REQUEST_OVERHEAD_MAX_S / REQUEST_OVERHEAD_STEP_S)) + 1)]

    def runs(self, costs: CostModel) -> list[tuple[object, list[dict], list[dict]]]:
        self.simulations += 1
        return simulate_runs(costs, self.mode, self.placement, self.records, self.sizes, self.prompt_tokens,
                             self.config, self.repeated_images, self.warmup)

    def rows(self, costs: CostModel) -> list[dict]:
        """compare's rows with `costs` as they are (its calibration included)."""
        return compare(costs, self.mode, self.placement, self.records, self.sizes, self.prompt_tokens, self.config,
                       self.slo_ttft, self.slo_tpot, self.repeated_images, self.warmup)

    def best_shift(self, costs: CostModel) -> tuple[float, float]:
        """Simulate with request_overhead_s = 0 and return (the best request_overhead_s, its
        objective): a delay d of every dispatch shifts the run, so request i's TTFT becomes
        TTFT_i + d; each d of a fine grid is scored on the one simulation."""
        runs = self.runs(costs.calibrated(request_overhead_s=0.0))
        rows = rows_of(runs, self.slo_ttft, self.slo_tpot)
        terms = []  # per run: predicted p50 / p90, sorted TTFTs of the SLO candidates, requests, measured ones
        for row, (_, _, predicted) in zip(rows, runs):
            p, m = row["predicted"], row["measured"]
            # at shift d a predicted request meets the SLO iff it would at TTFT 0 and TTFT + d < slo_ttft
            candidates = sorted(r["ttft_s"] for r in predicted
                                if r.get("ttft_s") is not None and meets_slo({**r, "ttft_s": 0.0}, 1.0, self.slo_tpot))
            terms.append(((p["ttft_p50_ms"] or math.nan) / 1e3, (p["ttft_p90_ms"] or math.nan) / 1e3, candidates,
                          len(predicted), (m["ttft_p50_ms"] or math.nan) / 1e3, (m["ttft_p90_ms"] or math.nan) / 1e3,
                          m["attainment"]))
        best = (0.0, math.inf)
        for d in self.d_grid:
            total = 0.0
            for p50, p90, candidates, n, m50, m90, m_att in terms:
                att = bisect_left(candidates, self.slo_ttft - d) / n if n else 0.0
                total += (abs(p50 + d - m50) / m50 + abs(p90 + d - m90) / m90) * 100 + abs(att - m_att) * 100
            value = total / (3 * len(terms))
            if value < best[1] - 1e-12:
                best = (d, value)
        return best


def objective(rows: list[dict]) -> float:
    """Mean over the rows of |TTFT p50 error| %, |TTFT p90 error| % and |attainment difference| points."""
    return sum(sum(abs(v) for v in errors(r)) for r in rows) / (3 * len(rows))


def errors(row: dict) -> tuple[float, float, float]:
    """(TTFT p50 error %, TTFT p90 error %, attainment difference in points) of a compare row."""
    p, m = row["predicted"], row["measured"]

    def pct(key: str) -> float:
        if p[key] is None or not m[key]:
            return math.nan
        return (p[key] - m[key]) / m[key] * 100

    return pct("ttft_p50_ms"), pct("ttft_p90_ms"), row["attainment_diff_points"]


def within(row: dict, bound: float = WITHIN) -> bool:
    return all(abs(e) <= bound for e in errors(row))


def _grid_around(value: float, step: float, low: float = 0.0) -> list[float]:
    return sorted({round(max(low, value + k * step), 6) for k in range(-2, 3)})


def fit(problem: Problem, grids: dict[str, tuple[float, ...]] | None = None, refinements: int = 2,
        log=None) -> tuple[Calibration, float]:
    """Coordinate search (module docstring) over the simulated parameters of `grids` (name -> coarse
    grid; default GRIDS), request_overhead_s solved at each point; (the calibration, its
    objective). Ties keep the smaller values (a parameter the file cannot see stays 0)."""
    grids = dict(GRIDS if grids is None else grids)
    names = list(grids)
    seen: dict[tuple, tuple[float, float]] = {}  # point -> (objective, request overhead)

    def evaluate(point: tuple) -> tuple[float, float]:
        key = tuple(round(v, 9) for v in point)
        if key not in seen:
            d, value = problem.best_shift(problem.costs.calibrated(**dict(zip(names, point))))
            seen[key] = (value, d)
        return seen[key]

    point = tuple(0.0 for _ in names)
    for level in range(refinements + 1):
        if level == 0:
            axes = [sorted(grids[n]) for n in names]
        else:  # around the best, the finest coarse step halved per level
            axes = [_grid_around(v, _min_step(grids[n]) / 2 ** level) for n, v in zip(names, point)]
        while True:
            before = point
            for i, axis in enumerate(axes):
                candidates = [point[:i] + (v,) + point[i + 1:] for v in axis]
                point = min(candidates, key=lambda q: (evaluate(q)[0], sum(q)))
            if point == before:
                break
        if log:
            value, d = evaluate(point)
            shown = ", ".join(f"{n} {v:g}" for n, v in zip(names, point))
            log(f"  level {level}: {shown}, request_overhead_s {d:g}: objective {value:.2f} "
                f"({problem.simulations} simulations)")
    value, d = evaluate(point)
    if log:  # how well the file pins each parameter: the objective along its coarse grid, the others at the best
        for i, n in enumerate(names):
            cells = []
            for v in sorted(set(grids[n]) | {point[i]}):
                obj, dv = evaluate(point[:i] + (v,) + point[i + 1:])
                cells.append(f"{v:g}: {obj:.2f} (d {dv * 1e3:.0f} ms)")
            log(f"  along {n}: " + ", ".join(cells))
    params = {n: round(v, 6) for n, v in zip(names, point)} | {"request_overhead_s": round(d, 6)}
    return Calibration(**params), value


def _min_step(grid: tuple[float, ...]) -> float:
    xs = sorted(grid)
    return min(b - a for a, b in zip(xs, xs[1:])) if len(xs) > 1 else max(xs[0], 1.0) / 4


def format_table(rows: list[dict]) -> str:
    """Per rate: predicted / measured TTFT p50, p90 and attainment, the errors, and whether all
    three are within +-WITHIN; then the count."""
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    lines = [f"{'rate':>6} {'TTFT p50 ms':>13} {'err %':>7} {'TTFT p90 ms':>13} {'err %':>7} "
             f"{'attainment %':>14} {'pts':>6}  within",
             f"{'':>6} {'pred / meas':>13} {'':>7} {'pred / meas':>13} {'':>7} {'pred / meas':>14}"]
    for r in rows:
        p, m = r["predicted"], r["measured"]
        e50, e90, ea = errors(r)
        rate = "all" if r["rate"] is None else f"{r['rate']:g}"
        lines.append(f"{rate:>6} {ms(p['ttft_p50_ms']) + ' / ' + ms(m['ttft_p50_ms']):>13} {e50:>+7.1f} "
                     f"{ms(p['ttft_p90_ms']) + ' / ' + ms(m['ttft_p90_ms']):>13} {e90:>+7.1f} "
                     f"{p['attainment'] * 100:>6.1f} / {m['attainment'] * 100:<5.1f} {ea:>+6.1f}  "
                     f"{'yes' if within(r) else 'no'}")
    n = sum(within(r) for r in rows)
    lines.append(f"{n} of {len(rows)} rates within +-{WITHIN:g} (TTFT p50 / p90 in %, attainment in points); "
                 f"mean |error| {objective(rows):.2f}")
    return "\n".join(lines)


def describe(c: Calibration) -> str:
    return (f"request_overhead_s = {c.request_overhead_s * 1e3:.1f} ms, encode_batch_overhead_s = "
            f"{c.encode_batch_overhead_s * 1e3:.2f} ms, colocation_factor = {c.colocation_factor:.3f}")


def read_records(path: str) -> list[dict]:
    from scripts.simulate import read_records as read

    return read(path)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--costs", required=True, help="cost model JSON (the profiler's output, or a calibrated one)")
    p.add_argument("--records", help="bench_serve.py records JSONL to fit on")
    p.add_argument("--check", help="bench_serve.py records JSONL to check the calibration on")
    p.add_argument("--out", help="write the calibrated cost model JSON here (with --records)")
    p.add_argument("--mode", choices=("epd", "pd", "aggregated"), default="epd", help="the engine's mode")
    p.add_argument("--placement", help='instances and their GPUs (default: "E:0,0 P:0 D:0")')
    p.add_argument("--image-size", default="1920x1080", help="the runs' image resolution WxH")
    p.add_argument("--prompt-tokens", type=int, default=22, help="text tokens per prompt without a usage count")
    p.add_argument("--slo-ttft", type=float, default=1.4, help="TTFT SLO in seconds")
    p.add_argument("--slo-tpot", type=float, default=0.04, help="TPOT SLO in seconds")
    p.add_argument("--fresh-images", action="store_true",
                   help="every image of every rate new, as bench_serve.py sends them by default (without it: "
                        "its --same-images runs, the same images at every rate to one server, cached after their "
                        "first sending)")
    p.add_argument("--warmup-requests", type=int, default=1, help="bench_serve.py's warm-up requests")
    return p


def baseline(problem: Problem, path: str) -> None:
    """The uncalibrated tables: the profile alone as the simulator ran before (every image new),
    and with the cache as the run had it."""
    bare = problem.costs.calibrated(request_overhead_s=0.0, encode_batch_overhead_s=0.0, colocation_factor=0.0)
    if problem.repeated_images:
        fresh = Problem(bare, problem.records, problem.mode, problem.placement, problem.sizes, problem.prompt_tokens,
                        problem.config, problem.slo_ttft, problem.slo_tpot, repeated_images=False)
        print(f"\n== the profile alone, every image new (no encoder cache), on {path}")
        print(format_table(fresh.rows(bare)))
    print(f"\n== the profile alone on {path}")
    print(format_table(problem.rows(bare)))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.records and not args.check:
        raise CLIError("give --records (fit) and/or --check (compare)")
    if args.out and not args.records:
        raise CLIError("--out writes a fitted model: give --records")
    try:
        parse_devices(args.mode, args.placement)
        size = parse_size(args.image_size)
    except ValueError as e:
        raise CLIError(str(e)) from None
    costs = CostModel.load(args.costs)
    settings = dict(mode=args.mode, placement=args.placement, sizes=[size], prompt_tokens=args.prompt_tokens,
                    slo_ttft=args.slo_ttft, slo_tpot=args.slo_tpot, repeated_images=not args.fresh_images,
                    warmup=args.warmup_requests)
    images = ("every image new" if args.fresh_images else
              f"the same images at every rate, cached after their first sending (warm-up {args.warmup_requests})")
    print(f"mode {args.mode}, placement {args.placement or 'default'}, {args.image_size} images; {images}")
    if args.records:
        problem = Problem(costs.calibrated(request_overhead_s=0.0, encode_batch_overhead_s=0.0,
                                           colocation_factor=0.0), read_records(args.records), **settings)
        baseline(problem, args.records)
        print(f"\n== fitting on {args.records}")
        started = time.perf_counter()
        calibration, value = fit(problem, log=print)
        fitted = Calibration(**calibration.params(), fit={
            "records": Path(args.records).name, "objective": round(value, 3),
            "objective_is": "mean over rates of |TTFT p50 err| %, |TTFT p90 err| %, |attainment diff| points",
            "repeated_images": not args.fresh_images, "warmup_requests": args.warmup_requests,
            "image_size": args.image_size, "placement": args.placement, "mode": args.mode})
        costs = CostModel.from_dict({**costs.to_dict(), "calibration": fitted.to_dict()})
        print(f"fitted in {time.perf_counter() - started:.0f} s ({problem.simulations} simulations): "
              f"{describe(calibration)}")
        print(f"\n== calibrated, on {args.records} (fitted here)")
        print(format_table(problem.rows(costs)))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(costs.to_dict(), indent=2) + "\n")
            print(f"calibrated cost model: {args.out}")
    if args.check:
        check = Problem(costs, read_records(args.check), **settings)
        if not args.records:
            print(f"calibration: {describe(costs.calib)}")
        baseline(check, args.check)
        print(f"\n== calibrated, checked on {args.check} (not fitted on)")
        print(format_table(check.rows(costs)))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
