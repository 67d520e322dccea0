"""Predicted vs measured: bench_serve.py's records of a run, simulated with the same requests.

The measured records give the workload exactly: each request's send time (scheduled_s), images,
output tokens (what it made; max_tokens if it failed) and prompt tokens (the server's usage count,
when it sent one). What they lack comes from the caller: the image size (per phase for a --phases
run) and the text tokens of a prompt without a usage count. A records file holds one run per entry
of --rates (a rate listed twice makes two runs, simulated each on its own and compared pooled), or
one --phases run (records with a phase index), compared per phase and over all.

repeated_images: the file is one bench_serve.py run against one server, which sends request i's
images (seeded by the run's seed, i and the image's index) at every rate, after a warm-up of its
first `warmup` requests (--warmup-requests, default 1). Then image j of request i has the key
(i, j), the warm-up fills the encoders' caches first, and each rate starts with the caches the
rate before left (Simulation.cache_state / warm): as measured, an image is encoded only the
first time it is sent. Without it every image of every run is new (each run a fresh server).

`simulate_runs` pairs each run's measured records with predicted ones, `rows_of` summarizes
pairs (scripts/fit_simulator.py shifts predicted TTFTs in between), `compare` is both.
"""

from __future__ import annotations

from engine.simulator.cost_model import CostModel
from engine.simulator.metrics import summarize_rate
from engine.simulator.request import SimRequest
from engine.simulator.sim import SimConfig, Simulation

Size = tuple[int, int]


def group_runs(records: list[dict]) -> dict[object, list[dict]]:
    """Runs of a records file, in its order: "phases" -> every record of a --phases run, else
    (rate, run) -> its records (run: the rate's place in bench_serve.py's --rates, so that a rate
    listed twice is two runs; 0 in records without it)."""
    if any(r.get("phase") is not None for r in records):
        return {"phases": records}
    runs: dict[object, list[dict]] = {}
    for r in records:
        runs.setdefault((float(r["rate"]), r.get("run", 0)), []).append(r)
    return runs


def requests_of(records: list[dict], costs: CostModel, sizes: list[Size], prompt_tokens: int,
                keyed: bool = False) -> list[SimRequest]:
    """The simulated requests of measured records (sizes[phase], or sizes[0] without phases);
    keyed: image j of request i has the content key (i, j)."""
    out = []
    for r in sorted(records, key=lambda r: (r["scheduled_s"], r["request_id"])):
        phase = r.get("phase") or 0
        images = int(r.get("images") or 0)
        tokens = r.get("output_tokens") if r.get("success") and r.get("output_tokens") else r["max_tokens"]
        prompt = r.get("prompt_tokens") or prompt_tokens + images * costs.image_tokens
        out.append(SimRequest(id=r["request_id"], arrival=float(r["scheduled_s"]), images=images,
                              image_size=sizes[min(phase, len(sizes) - 1)], prompt_tokens=int(prompt),
                              max_tokens=int(tokens), phase=r.get("phase"), rate=float(r["rate"]),
                              image_keys=tuple((r["request_id"], j) for j in range(images)) if keyed else ()))
    return out


def warm_up_state(costs: CostModel, mode: str, placement: str | None, records: list[dict], sizes: list[Size],
                  prompt_tokens: int, config: SimConfig | None, warmup: int) -> dict | None:
    """The encoders' caches after bench_serve.py's warm-up: its first `warmup` requests (request ids
    0..warmup-1), one after another on an idle server."""
    first: dict[int, dict] = {}
    for r in records:
        if r["request_id"] < warmup:
            first.setdefault(r["request_id"], r)
    if not first:
        return None
    reqs = requests_of([first[i] for i in sorted(first)], costs, sizes, prompt_tokens, keyed=True)
    for n, req in enumerate(reqs):
        req.arrival = 100.0 * n  # one after another
    sim = Simulation(costs, mode, placement, config)
    sim.run(reqs)
    return sim.cache_state()


def simulate_runs(costs: CostModel, mode: str, placement: str | None, records: list[dict], sizes: list[Size],
                  prompt_tokens: int = 22, config: SimConfig | None = None, repeated_images: bool = False,
                  warmup: int = 1) -> list[tuple[object, list[dict], list[dict]]]:
    """(rate or "phases", measured records, predicted records) per rate of the file, in its order
    (see the module docstring for repeated_images and warmup). Each run is simulated on its own;
    the runs of one rate (it was listed more than once) are pooled."""
    pooled: dict[object, tuple[object, list[dict], list[dict]]] = {}
    state = (warm_up_state(costs, mode, placement, records, sizes, prompt_tokens, config, warmup)
             if repeated_images and warmup > 0 else None)
    for key, measured in group_runs(records).items():
        sim = Simulation(costs, mode, placement, config)
        sim.warm(state)
        predicted = [r.record() for r in sim.run(requests_of(measured, costs, sizes, prompt_tokens, repeated_images))]
        if repeated_images:
            state = sim.cache_state()
        rate = key if key == "phases" else key[0]
        _, m, p = pooled.setdefault(rate, (rate, [], []))
        m += measured
        p += predicted
    return list(pooled.values())


def _summary(records: list[dict], slo_ttft: float, slo_tpot: float) -> dict:
    end = max((r["start_s"] + (r.get("e2el_s") or 0.0) for r in records), default=0.0)
    start = min(r["scheduled_s"] for r in records)
    s = summarize_rate(float(records[0]["rate"]), records, end - start, slo_ttft, slo_tpot)
    return {"ttft_p50_ms": s["ttft_ms"]["p50"], "ttft_p90_ms": s["ttft_ms"]["p90"],
            "tpot_p50_ms": s["tpot_ms"]["p50"], "attainment": s["attainment"], "completed": s["completed"]}


def compare(costs: CostModel, mode: str, placement: str | None, records: list[dict], sizes: list[Size],
            prompt_tokens: int = 22, config: SimConfig | None = None, slo_ttft: float = 1.4,
            slo_tpot: float = 0.04, repeated_images: bool = False, warmup: int = 1) -> list[dict]:
    """One row per run (and per phase of a --phases run, then its "all" row): rate, phase,
    measured and predicted TTFT p50 / p90, TPOT p50 and attainment, and attainment's difference
    (predicted - measured) in percentage points."""
    runs = simulate_runs(costs, mode, placement, records, sizes, prompt_tokens, config, repeated_images, warmup)
    return rows_of(runs, slo_ttft, slo_tpot)


def rows_of(runs: list[tuple[object, list[dict], list[dict]]], slo_ttft: float = 1.4,
            slo_tpot: float = 0.04) -> list[dict]:
    """compare's rows of simulate_runs' (key, measured, predicted) triples."""
    rows = []
    for key, measured, predicted in runs:
        groups = [(float(key), None, measured, predicted)] if key != "phases" else []
        if key == "phases":
            for k in sorted({r["phase"] for r in measured}):
                groups.append((float(next(r["rate"] for r in measured if r["phase"] == k)), k,
                               [r for r in measured if r["phase"] == k], [r for r in predicted if r["phase"] == k]))
            groups.append((None, "all", measured, predicted))
        for rate, phase, meas, pred in groups:
            m, p = _summary(meas, slo_ttft, slo_tpot), _summary(pred, slo_ttft, slo_tpot)
            rows.append({"rate": rate, "phase": phase, "requests": len(meas), "measured": m, "predicted": p,
                         "attainment_diff_points": (p["attainment"] - m["attainment"]) * 100})
    return rows


def format_rows(rows: list[dict]) -> str:
    """The comparison as a table: predicted / measured per column."""
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    lines = [f"{'rate':>8} {'phase':>5} {'TTFT p50 ms':>15} {'TTFT p90 ms':>15} {'attainment %':>14} {'diff':>7}",
             f"{'':>8} {'':>5} {'pred / meas':>15} {'pred / meas':>15} {'pred / meas':>14} {'points':>7}"]
    for r in rows:
        p, m = r["predicted"], r["measured"]
        rate = "all" if r["rate"] is None else f"{r['rate']:g}"
        phase = "-" if r["phase"] is None else str(r["phase"])
        lines.append(f"{rate:>8} {phase:>5} {ms(p['ttft_p50_ms']) + ' / ' + ms(m['ttft_p50_ms']):>15} "
                     f"{ms(p['ttft_p90_ms']) + ' / ' + ms(m['ttft_p90_ms']):>15} "
                     f"{p['attainment'] * 100:>6.1f} / {m['attainment'] * 100:<5.1f} "
                     f"{r['attainment_diff_points']:>+7.1f}")
    return "\n".join(lines)
