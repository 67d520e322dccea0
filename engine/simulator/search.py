"""Placement search: for N GPUs, every placement of the three modes, each one's goodput on one
workload shape, ranked by goodput per GPU.

Candidates: epd with every (E, P, D) split of one instance per GPU (E + P + D = N, each >= 1);
epd co-located on every GPU (k encoders, one prefill, one decode per GPU, as "E:0,0 P:0 D:0" for
k = 2 on one GPU); pd with every (P, D) split of one instance per GPU, and co-located on every GPU;
aggregated on every GPU. Goodput: the highest rate whose SLO attainment is >= the target, found
by doubling from a start rate and then bisecting (geometrically) between the last rate that
passed and the first that failed; every phase of the shape runs at that rate. Attainment is not
strictly monotone in the rate with random arrivals; the fixed seed keeps each run repeatable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from engine.simulator.cost_model import CostModel
from engine.simulator.sim import SimConfig, simulate
from engine.simulator.workload import Phase, with_rate

COLOCATED_ENCODERS = (1, 2, 3)  # encoders per GPU in the co-located epd placements


@dataclass(frozen=True)
class Candidate:
    mode: str
    placement: str
    gpus: int


def _ids(gpus: range, times: int = 1) -> str:
    return ",".join(str(g) for g in gpus for _ in range(times))


def enumerate_placements(gpus: int, colocated_encoders: tuple[int, ...] = COLOCATED_ENCODERS) -> list[Candidate]:
    """Every candidate placement on GPUs 0..gpus-1 (see the module docstring)."""
    if gpus < 1:
        raise ValueError(f"gpus = {gpus}; must be >= 1")
    out: list[Candidate] = []
    every = range(gpus)
    for e in range(1, gpus - 1):
        for p in range(1, gpus - e):
            out.append(Candidate("epd", f"E:{_ids(range(e))} P:{_ids(range(e, e + p))} "
                                        f"D:{_ids(range(e + p, gpus))}", gpus))
    for k in colocated_encoders:
        out.append(Candidate("epd", f"E:{_ids(every, k)} P:{_ids(every)} D:{_ids(every)}", gpus))
    for p in range(1, gpus):
        out.append(Candidate("pd", f"P:{_ids(range(p))} D:{_ids(range(p, gpus))}", gpus))
    out.append(Candidate("pd", f"P:{_ids(every)} D:{_ids(every)}", gpus))
    out.append(Candidate("aggregated", f"A:{_ids(every)}", gpus))
    return out


@dataclass(frozen=True)
class SearchSettings:
    """What a goodput is judged on, and how far the rate search goes."""

    slo_ttft: float = 1.4
    slo_tpot: float = 0.04
    target: float = 0.9
    seed: int = 0
    start_rate: float = 1.0
    min_rate: float = 1 / 64
    max_rate: float = 4096.0
    iterations: int = 6  # bisection steps after the bracket: the rate to within 2^(1/64) ~ 1%


def find_goodput(costs: CostModel, mode: str, placement: str, phases: list[Phase], config: SimConfig | None = None,
                 settings: SearchSettings | None = None) -> tuple[float, int]:
    """(goodput in req/s, simulations run): 0 when even min_rate misses the target; max_rate
    when it still meets it there."""
    s = settings or SearchSettings()
    runs = 0

    def meets(rate: float) -> bool:
        nonlocal runs
        runs += 1
        result = simulate(costs, mode, placement, with_rate(phases, rate), config=config, seed=s.seed,
                          slo_ttft=s.slo_ttft, slo_tpot=s.slo_tpot)
        return result.summary["attainment"] >= s.target

    rate = s.start_rate
    if meets(rate):
        lo = rate
        while lo * 2 <= s.max_rate and meets(lo * 2):
            lo *= 2
        if lo * 2 > s.max_rate:
            return lo, runs
        hi = lo * 2
    else:
        hi = rate
        while hi / 2 >= s.min_rate and not meets(hi / 2):
            hi /= 2
        if hi / 2 < s.min_rate:
            return 0.0, runs
        lo = hi / 2
    for _ in range(s.iterations):
        mid = math.sqrt(lo * hi)
        if meets(mid):
            lo = mid
        else:
            hi = mid
    return lo, runs


def search(costs: CostModel, gpus: int, phases: list[Phase], config: SimConfig | None = None,
           settings: SearchSettings | None = None, candidates: list[Candidate] | None = None) -> list[dict]:
    """Each candidate's goodput, best first: by goodput per GPU, then goodput, then mode and
    placement (a stable order for equals)."""
    rows = []
    for c in candidates if candidates is not None else enumerate_placements(gpus):
        goodput, runs = find_goodput(costs, c.mode, c.placement, phases, config, settings)
        rows.append({"mode": c.mode, "placement": c.placement, "gpus": c.gpus, "goodput": goodput,
                     "goodput_per_gpu": goodput / c.gpus, "simulations": runs})
    rows.sort(key=lambda r: (-r["goodput_per_gpu"], -r["goodput"], r["mode"], r["placement"]))
    return rows
