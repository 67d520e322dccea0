"""Plots of serving benchmarks (scripts/bench_serve.py output), one run per mode, as PNGs:

    python scripts/plot_serve.py runs/aggregated.json runs/pd.json runs/epd.json --out-dir plots

(a) attainment.png: SLO attainment vs request rate per run, with the attainment target line;
(b) ttft_cdf_rate<R>.png: the TTFT CDF of each run at one rate (--rate; default the highest rate
    every run has);
(c) timeline_<label>_rate<R>.png: one run's requests at that rate as horizontal stacked bars
    (queue / encode / wait / prefill / decode) from the server's epd_metrics, placed at each
    request's send time; skipped, with a message, when the records carry no epd_metrics.

Inputs: summary JSON files (--out of bench_serve.py; their records come from the records_file they
name, or from a records JSONL given next to them) or records JSONL files (--records), whose SLO
attainment is computed here with --slo-ttft / --slo-tpot. Labels: --labels, else the files' own.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.cli import ArgumentParser, CLIError, run_main  # noqa: E402
from scripts.bench_serve import attainment  # noqa: E402

PHASES = (("queue_s", "queue", "#9e9e9e"), ("preprocess_s", "preprocess", "#17becf"), ("encode_s", "encode", "#1f77b4"),
          ("wait_s", "wait", "#ff7f0e"), ("prefill_s", "prefill", "#2ca02c"))
DECODE_COLOR = "#d62728"
OTHER_COLOR = "#c5b0d5"


def read_records(path: Path) -> list[dict]:
    """A records JSONL, each rate as a float ("inf" -> inf)."""
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                    rec["rate"] = float(rec["rate"])
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                    raise CLIError(f"{path}:{n}: not a bench_serve.py record ({e})") from None
                records.append(rec)
    return records


def load_run(path: Path, slo_ttft: float, slo_tpot: float) -> dict:
    """{label, per_rate: [{rate, attainment}], records: [...]} from a summary JSON or records JSONL."""
    if not path.is_file():
        raise CLIError(f"{path}: no such file")
    if path.suffix == ".jsonl":
        records = read_records(path)
        label = next((r["label"] for r in records if r.get("label")), path.stem)
        per_rate = [{"rate": rate, "attainment": attainment([r for r in records if r["rate"] == rate],
                                                            slo_ttft, slo_tpot)}
                    for rate in sorted({r["rate"] for r in records})]
        return {"label": label, "per_rate": per_rate, "records": records, "target": None}
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CLIError(f"{path}: not a summary JSON ({e})") from None
    if "rates" not in summary:
        raise CLIError(f"{path}: not a bench_serve.py summary (no 'rates')")
    records: list[dict] = []
    named = summary.get("records_file")
    for candidate in ([Path(named), path.parent / Path(named).name] if named else []) + [path.with_suffix(".jsonl")]:
        if candidate.is_file():
            records = read_records(candidate)
            break
    per_rate = [{"rate": float(r["rate"]), "attainment": r["attainment"]} for r in summary["rates"]]
    return {"label": summary.get("label") or path.stem, "per_rate": per_rate, "records": records,
            "target": (summary.get("slo") or {}).get("attainment_target")}


def rate_positions(rates: list[float]) -> tuple[dict[float, float], list[float], list[str]]:
    """x positions for rates, inf placed past the largest finite one; (positions, ticks, tick labels)."""
    finite = sorted({r for r in rates if not math.isinf(r)})
    pos = {r: r for r in finite}
    if any(math.isinf(r) for r in rates):
        pos[math.inf] = finite[-1] * 1.5 if finite else 1.0
    ticks = sorted(pos.values())
    labels = ["inf" if math.isinf(r) else f"{r:g}" for r in sorted(pos)]
    return pos, ticks, labels


def safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_") or "run"


def plot_attainment(runs: list[dict], target: float, out: Path) -> Path:
    import matplotlib.pyplot as plt

    pos, ticks, labels = rate_positions([r["rate"] for run in runs for r in run["per_rate"]])
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        pts = sorted(run["per_rate"], key=lambda r: pos[r["rate"]])
        ax.plot([pos[r["rate"]] for r in pts], [r["attainment"] * 100 for r in pts], marker="o", label=run["label"])
    ax.axhline(target * 100, color="k", linestyle="--", linewidth=1, label=f"{target:.0%} target")
    ax.set_xticks(ticks, labels)
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / "attainment.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_ttft_cdf(runs: list[dict], rate: float, slo_ttft: float, out: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        ttfts = sorted(r["ttft_s"] for r in run["records"]
                       if r["rate"] == rate and r.get("success") and r.get("ttft_s") is not None)
        if ttfts:
            n = len(ttfts)
            ax.step(ttfts, [(i + 1) / n for i in range(n)], where="post", label=f"{run['label']} ({n})")
    ax.axvline(slo_ttft, color="k", linestyle="--", linewidth=1, label=f"TTFT SLO {slo_ttft:g} s")
    ax.set_xlabel("TTFT (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"TTFT CDF at {rate:g} req/s")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / f"ttft_cdf_rate{safe(f'{rate:g}')}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_timeline(run: dict, rate: float, max_requests: int, out: Path) -> Path | None:
    """Stacked phase bars per request; None when no record at `rate` has epd_metrics."""
    import matplotlib.pyplot as plt

    recs = sorted((r for r in run["records"] if r["rate"] == rate and r.get("epd_metrics")),
                  key=lambda r: r.get("start_s") or 0.0)[:max_requests]
    if not recs:
        return None
    fig, ax = plt.subplots(figsize=(9, max(2.5, 0.22 * len(recs) + 1.2)))
    seen: set[str] = set()

    def bar(y: int, left: float, width: float, name: str, color: str) -> None:
        if width > 0:
            ax.barh(y, width, left=left, color=color, height=0.8, label=None if name in seen else name)
            seen.add(name)

    for y, rec in enumerate(recs):
        m = rec["epd_metrics"]
        left = rec.get("start_s") or 0.0
        for key, name, color in PHASES:
            width = float(m.get(key) or 0.0)
            bar(y, left, width, name, color)
            left += width
        ttft = m.get("ttft_s")
        phases = sum(float(m.get(key) or 0.0) for key, _, _ in PHASES)
        if ttft is not None and ttft - phases > 1e-6:  # time before the first token the phases don't cover
            bar(y, left, ttft - phases, "other", OTHER_COLOR)
            left += ttft - phases
        if ttft is not None and m.get("e2e_s") is not None:
            bar(y, left, float(m["e2e_s"]) - float(ttft), "decode", DECODE_COLOR)
    ax.set_yticks(range(len(recs)), [str(r.get("request_id", i)) for i, r in enumerate(recs)], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("time since the first request was sent (s)")
    ax.set_ylabel("request")
    ax.set_title(f"{run['label']}: request stages at {rate:g} req/s")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    path = out / f"timeline_{safe(run['label'])}_rate{safe(f'{rate:g}')}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__)
    p.add_argument("inputs", nargs="*", help="summary .json or records .jsonl files, one per mode")
    p.add_argument("--labels", help="comma-separated labels, one per input (default: the files' own)")
    p.add_argument("--rate", type=float, help="rate of the TTFT CDF and the timeline (default: the highest common)")
    p.add_argument("--timeline-label", help="run shown in the timeline (default: the first with epd_metrics)")
    p.add_argument("--max-timeline-requests", type=int, default=60, help="requests in the timeline at most")
    p.add_argument("--slo-ttft", type=float, default=1.4, help="TTFT SLO (s): CDF line; attainment of .jsonl inputs")
    p.add_argument("--slo-tpot", type=float, default=0.04, help="TPOT SLO (s): attainment of .jsonl inputs")
    p.add_argument("--attainment-target", type=float, help="target line (default: the summaries', else 0.9)")
    p.add_argument("--out-dir", default="plots", help="directory for the PNGs")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.inputs:
        raise CLIError("no inputs: give summary .json or records .jsonl files from scripts/bench_serve.py")
    runs = [load_run(Path(p), args.slo_ttft, args.slo_tpot) for p in args.inputs]
    if args.labels:
        labels = args.labels.split(",")
        if len(labels) != len(runs):
            raise CLIError(f"--labels has {len(labels)} names for {len(runs)} inputs")
        for run, label in zip(runs, labels):
            run["label"] = label
            for rec in run["records"]:
                rec["label"] = label
    try:
        import matplotlib
    except ImportError:
        raise CLIError("plot_serve.py needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = args.attainment_target or next((r["target"] for r in runs if r["target"]), None) or 0.9
    print(plot_attainment(runs, target, out))

    with_records = [run for run in runs if run["records"]]
    if not with_records:
        print("no per-request records (records JSONL) found: no TTFT CDF or timeline", file=sys.stderr)
        return 0
    common = set.intersection(*({r["rate"] for r in run["records"]} for run in with_records))
    rate = args.rate
    if rate is None:
        if not common:
            raise CLIError("the runs share no rate; pick one with --rate")
        rate = max(common)
    elif not any(r["rate"] == rate for run in with_records for r in run["records"]):
        raise CLIError(f"--rate {rate:g}: no run has records at that rate")
    print(plot_ttft_cdf(with_records, rate, args.slo_ttft, out))

    chosen = [run for run in with_records if args.timeline_label in (None, run["label"])]
    if args.timeline_label and not chosen:
        raise CLIError(f"--timeline-label {args.timeline_label!r}: no such run "
                       f"({', '.join(r['label'] for r in with_records)})")
    path = None
    for run in chosen:
        path = plot_timeline(run, rate, args.max_timeline_requests, out)
        if path is not None:
            print(path)
            break
    if path is None:
        print(f"no epd_metrics in the records at {rate:g} req/s (not our server?): no stage timeline",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
