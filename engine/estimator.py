"""The load estimator: what each stage instance is asked to do and how fast it does it, from the
orchestrator's own message stream (no extra messages, no clocks in the stages).

    est = LoadEstimator(tau_s=2.0)
    est.sent("encode0", req_id, 2, now)      # a task dispatched: a request + its units queued there
    est.done("encode0", req_id, now)         # answered (encoded, prefilled, failed or ended)
    est.steps("decode0", batch=12, now)      # a decode step's tokens arrived
    est.snapshot(now, {"encode0": "encode", ...}) -> {"stages": {...}, "kinds": {...}}

Units are what a stage's cost grows with: vision items for an encoder, prompt tokens for a
prefill (decode is measured by its steps). Every rate is an exponentially decayed sum with time
constant tau_s, so a figure reflects about the last tau_s seconds:
- arrival_rate: requests sent per second; utilization: the fraction of time the instance had
  work outstanding (from this side: sent and not answered);
- s_per_unit: busy seconds up to the last answer / units answered (a ratio of decayed sums: a
  batch that answers eight tasks at once is counted right, work in progress is not counted
  before its answer); predicted_wait_s: the queued units at that speed;
- decode: running requests, the step time (EWMA of the gaps between its token messages while it
  had requests), tokens per second, departure_rate (requests answered per second) and step_slope_s:
  how much a step grows per running request, a least-squares line through the recent (batch, step)
  pairs (decayed sums; None until the batch has varied by more than one request), so that the
  allocator can predict the step at the batch that the arrivals beyond the departures will make.
Per kind, the instances' capacities add up: predicted_wait_s = queued units / sum of speeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

KV_FULL = 0.95  # a stage's KV arena this full takes no more prompts


class Decayed:
    """A sum whose terms decay as exp(-age / tau_s)."""

    def __init__(self, tau_s: float) -> None:
        self.tau_s, self.value, self.t = tau_s, 0.0, None

    def add(self, x: float, now: float) -> None:
        self.get(now)
        self.value += x

    def get(self, now: float) -> float:
        if self.t is not None and now > self.t:
            self.value *= math.exp(-(now - self.t) / self.tau_s)
        self.t = now if self.t is None else max(self.t, now)
        return self.value


@dataclass
class _Instance:
    tau_s: float
    tasks: dict[int, list[int]] = field(default_factory=dict)  # req_id -> units of each task queued here
    busy_mark: float | None = None  # since when the busy time not yet counted runs
    work_mark: float | None = None  # since when the busy time not yet paid for by an answer runs
    arrivals: Decayed = field(init=False)
    busy: Decayed = field(init=False)
    work: Decayed = field(init=False)  # busy seconds up to the last answer: what the answered units cost
    units_done: Decayed = field(init=False)
    step_s: float | None = None  # decode: EWMA
    batch: float = 0.0  # decode: EWMA of the step's requests
    last_step: float | None = None
    departures: Decayed = field(init=False)
    fit: dict[str, Decayed] = field(init=False)  # decode: sums of 1, batch, gap, batch^2, batch x gap

    def __post_init__(self) -> None:
        self.arrivals, self.busy, self.units_done = Decayed(self.tau_s), Decayed(self.tau_s), Decayed(self.tau_s)
        self.work, self.departures = Decayed(self.tau_s), Decayed(self.tau_s)
        self.fit = {k: Decayed(self.tau_s) for k in ("n", "x", "y", "xx", "xy")}

    def step_slope(self, now: float) -> float | None:
        """Seconds a step grows per request in it (>= 0), from the decayed (batch, step) pairs;
        None while the batch has varied too little to tell (variance under 1 request^2)."""
        n, x, y, xx, xy = (self.fit[k].get(now) for k in ("n", "x", "y", "xx", "xy"))
        if n < 3 or xx / n - (x / n) ** 2 < 1.0:
            return None
        return max((xy / n - x / n * y / n) / (xx / n - (x / n) ** 2), 0.0)

    @property
    def queued_requests(self) -> int:
        return sum(len(units) for units in self.tasks.values())

    @property
    def queued_units(self) -> int:
        return sum(sum(units) for units in self.tasks.values())

    def account(self, now: float) -> None:
        """Count the busy time up to now."""
        if self.busy_mark is not None:
            self.busy.add(max(now - self.busy_mark, 0.0), now)
            self.busy_mark = now if self.queued_requests > 0 else None


class LoadEstimator:
    STEP_ALPHA = 0.2  # decode step-time EWMA weight of the newest step

    def __init__(self, tau_s: float = 2.0) -> None:
        if not tau_s > 0:
            raise ValueError(f"tau_s = {tau_s}; must be > 0")
        self.tau_s = tau_s
        self.instances: dict[str, _Instance] = {}

    def _get(self, name: str) -> _Instance:
        if name not in self.instances:
            self.instances[name] = _Instance(self.tau_s)
        return self.instances[name]

    def sent(self, name: str, req_id: int, units: int, now: float) -> None:
        x = self._get(name)
        x.account(now)
        x.tasks.setdefault(req_id, []).append(units)
        x.arrivals.add(1.0, now)
        if x.busy_mark is None:
            x.busy_mark = now
        if x.work_mark is None:
            x.work_mark = now

    def done(self, name: str, req_id: int, now: float) -> None:
        """The oldest task of req_id at `name` is answered (a task never sent: ignored)."""
        x = self._get(name)
        queued = x.tasks.get(req_id)
        if not queued:
            return
        x.account(now)  # up to now, with the task still queued
        units = queued.pop(0)
        if not queued:
            del x.tasks[req_id]
        x.units_done.add(float(units), now)
        x.departures.add(1.0, now)
        if x.work_mark is not None:
            x.work.add(max(now - x.work_mark, 0.0), now)
        x.work_mark = now if x.queued_requests > 0 else None
        if x.queued_requests == 0:  # idle: its next step's gap would count the idle spell as a step
            x.busy_mark = x.last_step = None

    def steps(self, name: str, batch: int, now: float) -> None:
        """A decode's token message: one step over `batch` requests (its first one after an idle
        spell only marks the time)."""
        x = self._get(name)
        if x.last_step is not None and x.queued_requests > 0:
            gap = now - x.last_step
            x.step_s = gap if x.step_s is None else (1 - self.STEP_ALPHA) * x.step_s + self.STEP_ALPHA * gap
            x.batch = (1 - self.STEP_ALPHA) * x.batch + self.STEP_ALPHA * batch if x.batch else float(batch)
            for k, v in (("n", 1.0), ("x", batch), ("y", gap), ("xx", batch * batch), ("xy", batch * gap)):
                x.fit[k].add(v, now)
        x.last_step = now if x.queued_requests > 0 else None

    def forget(self, name: str) -> None:
        """A stage gone (dead, or switched to another role under another name)."""
        self.instances.pop(name, None)

    def snapshot(self, now: float, kinds: dict[str, str], blocks: dict[str, dict] | None = None) -> dict:
        """{"stages": name -> figures, "kinds": kind -> totals} for the live stages `kinds`
        (name -> kind); blocks: each stage's latest block reports ({"kv_blocks": {"used", "total"},
        "mm_blocks": ...}), shown as kv_used / mm_used (fractions) and, per kind, kv_full / mm_full
        (a stage of it at >= KV_FULL)."""
        stages = {}
        for name, kind in kinds.items():
            x = self._get(name)
            x.account(now)
            busy, work, units = x.busy.get(now), x.work.get(now), x.units_done.get(now)
            row = {"kind": kind, "arrival_rate": round(x.arrivals.get(now) / self.tau_s, 3),
                   "utilization": round(min(busy / self.tau_s, 1.0), 3)}
            if kind == "decode":
                row.update(running=x.queued_requests, step_s=x.step_s,
                           tokens_per_s=round(x.batch / x.step_s, 1) if x.step_s else None,
                           departure_rate=round(x.departures.get(now) / self.tau_s, 3), step_slope_s=x.step_slope(now))
            else:
                s_per_unit = work / units if units > 1e-9 else None
                row.update(queued_requests=x.queued_requests, queued_units=x.queued_units, s_per_unit=s_per_unit,
                           predicted_wait_s=x.queued_units * s_per_unit if s_per_unit is not None else None)
            for arena in ("kv", "mm"):
                b = ((blocks or {}).get(name) or {}).get(f"{arena}_blocks") or {}
                if b.get("total"):
                    row[f"{arena}_used"] = round(b["used"] / b["total"], 3)
            stages[name] = row
        return {"tau_s": self.tau_s, "stages": stages, "kinds": _by_kind(stages)}


def _by_kind(stages: dict[str, dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for kind in ("encode", "prefill", "decode"):
        rows = [r for r in stages.values() if r["kind"] == kind]
        if not rows:
            continue
        total = {"instances": len(rows), "arrival_rate": round(sum(r["arrival_rate"] for r in rows), 3),
                 "utilization": round(sum(r["utilization"] for r in rows) / len(rows), 3),
                 "kv_full": any(r.get("kv_used", 0.0) >= KV_FULL for r in rows),
                 "mm_full": any(r.get("mm_used", 0.0) >= KV_FULL for r in rows)}
        if kind == "decode":
            steps = [r["step_s"] for r in rows if r["step_s"] is not None]
            slopes = [r["step_slope_s"] for r in rows if r["step_slope_s"] is not None]
            total.update(running=sum(r["running"] for r in rows), step_s=max(steps) if steps else None,
                         departure_rate=round(sum(r["departure_rate"] for r in rows), 3),
                         step_slope_s=max(slopes) if slopes else None)
        else:
            speeds = [1.0 / r["s_per_unit"] for r in rows if r["s_per_unit"]]
            queued = sum(r["queued_units"] for r in rows)
            total.update(queued_units=queued, queued_requests=sum(r["queued_requests"] for r in rows),
                         predicted_wait_s=queued / sum(speeds) if speeds else None)
        out[kind] = total
    return out
