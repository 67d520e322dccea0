"""The resource allocator (`dynamic=True`): when one stage instance should change role, decided
from the load estimator's figures (engine/estimator.py); EPDEngine carries the decision out with
its role switch (engine/switching.py) and logs it.

Policy, evaluated every `interval_s`:
1. Pressure per stage kind, 1.0 = at its budget:
   - encode: max(utilization, predicted wait / (encode_share x slo_ttft_s));
   - prefill: max(utilization, predicted wait / (prefill_share x slo_ttft_s));
   - decode: max(step time / slo_tpot_s, running requests / (instances x max_num_seqs)), and the
     same two `lookahead_s` ahead: the requests arriving beyond those departing (arrival_rate -
     departure_rate, when it exceeds `growth` x the arrival rate: less is the rates' own noise)
     are added to the running ones, and the step grows by the estimator's step_slope_s per
     request added to an instance. Judged by the step alone the pressure rose only as the step's
     EWMA did: on the CPU's shifting workload the switch to decode came 10-12 s into the
     decode-heavy phase; on its synthetic trace (tests/test_dynamic.py, 8 seeds) the first
     decision comes 2.3-5.1 s into it instead of 3.3-10.2 s, and a steady load at ~0.6 of the
     SLO still moves nothing.
   While decode's slots are all taken, or a prefill's KV arena is full (KV it holds for
   decode, or shares with it), the prefill queue is decode's: a prefill keeps the KV of
   the requests decode has no slot for, and waits for its blocks. Its pressure then counts as
   decode's (decode's is raised to it, prefill's is 0: blocked, it needs no instance), so an
   instance goes to decode, not to a prefill that would only queue more (seen on the CPU:
   prefill pressure 27 behind 64 full decode slots). Then the encoders too, if their MM arena is
   full (mm_full): a prefill that admits no request reads no embeddings, so the encoders wait on it
   and their queue is decode's as well (on the CPU they looked busy for 48 s while a KV-bound
   prefill held their embeddings, and no donor was found until then). A full MM arena alone is
   not enough: it is also the normal state of a busy encoder whose arena holds two batches (the
   CPU's), so it does not tell a blocked encoder from a saturated one unless the prefill is blocked.
   Utilization alone would call a stage that is busy but well within its budget hot; a wait
   alone misses a stage that answers at once but never rests.
2. The hottest kind with pressure >= high is the receiver; the donor is the coolest other kind
   with more than one live instance whose pressure *after* losing one instance (x n / (n - 1))
   stays <= low. No donor, no switch: a kind never loses its last instance.
3. Hysteresis: the same (donor, receiver) pair must win `confirm` evaluations in a row; after a
   switch, none for cooldown_s = max(min_cooldown_s, cost_factor x the last switch's measured
   seconds) (a switch costs its drain and the new role's start); an instance that changed role
   stays at least min_dwell_s. A switch back (receiver -> donor of the last switch) also waits
   `reverse_after_s`: load that oscillates faster than that is not followed (no flapping).
4. The donor instance: the one of its kind with the least queued work, among those that can
   change role (not "pinned" in the snapshot: others map its weights, a decode shares its KV
   arena; on the CPU the first pick was refused and the switch came an evaluation later).

Every evaluation that changes something returns a Decision with its reason (the pressures it
saw); EPDEngine logs it and keeps the last ones in status()["allocator"].
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class AllocatorPolicy:
    slo_ttft_s: float = 1.4
    slo_tpot_s: float = 0.04
    encode_share: float = 0.3  # of the TTFT budget an encode queue may use
    prefill_share: float = 0.5
    max_num_seqs: int = 64  # a decode instance's request slots
    lookahead_s: float = 2.0  # decode's pressure is also judged this far ahead (0: as it is now)
    growth: float = 0.3  # ... when its arrivals exceed its departures by this share of the arrivals
    high: float = 0.8
    low: float = 0.5
    confirm: int = 2
    interval_s: float = 1.0
    min_cooldown_s: float = 5.0
    cost_factor: float = 10.0
    min_dwell_s: float = 10.0
    reverse_after_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("slo_ttft_s", "slo_tpot_s", "interval_s", "encode_share", "prefill_share"):
            if not getattr(self, name) > 0:
                raise ValueError(f"AllocatorPolicy.{name} = {getattr(self, name)}; must be > 0")
        if not 0 < self.low < self.high:
            raise ValueError(f"AllocatorPolicy: need 0 < low ({self.low}) < high ({self.high})")
        for name in ("lookahead_s", "growth"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"AllocatorPolicy.{name} = {getattr(self, name)}; must be >= 0")
        if self.confirm < 1:
            raise ValueError(f"AllocatorPolicy.confirm = {self.confirm}; must be >= 1")


@dataclass(frozen=True)
class Decision:
    stage: str  # the instance that switches
    from_kind: str
    to_kind: str
    reason: str
    pressures: dict[str, float]


@dataclass
class Allocator:
    policy: AllocatorPolicy = field(default_factory=AllocatorPolicy)
    last_eval: float | None = None
    streak: tuple[str, str] | None = None
    streak_count: int = 0
    last_switch: tuple[str, str, float] | None = None  # (from, to, when it ended)
    last_switch_s: float = 0.0
    dwell_until: dict[str, float] = field(default_factory=dict)  # stage name -> earliest next switch
    last_pressures: dict[str, float] = field(default_factory=dict)  # of the last evaluation

    def pressures(self, snapshot: dict) -> dict[str, float]:
        p, kinds, out = self.policy, snapshot["kinds"], {}
        decode_full = False
        for kind, k in kinds.items():
            if kind == "decode":
                n = k["instances"]
                step = (k["step_s"] or 0.0) / p.slo_tpot_s
                slots = k["running"] / (n * p.max_num_seqs)
                arriving, departing = k.get("arrival_rate", 0.0), k.get("departure_rate", 0.0)
                # only a growth the rates' noise cannot make (steady Poisson arrivals: ~30% of the rate)
                more = (arriving - departing) * p.lookahead_s if arriving - departing > p.growth * arriving else 0.0
                step_ahead = step + (k.get("step_slope_s") or 0.0) * more / n / p.slo_tpot_s if k["step_s"] else 0.0
                out[kind] = round(max(step, slots, step_ahead, (k["running"] + more) / (n * p.max_num_seqs)), 3)
                decode_full = slots >= 1.0 or kinds.get("prefill", {}).get("kv_full", False)
            else:
                share = p.encode_share if kind == "encode" else p.prefill_share
                wait = (k["predicted_wait_s"] or 0.0) / (share * p.slo_ttft_s)
                out[kind] = round(max(k["utilization"], wait), 3)
        if decode_full and "prefill" in out:  # blocked: its queue is decode's
            out["decode"], out["prefill"] = max(out["decode"], out["prefill"]), 0.0
            if kinds.get("encode", {}).get("mm_full"):  # and the encoders wait on that prefill
                out["decode"], out["encode"] = max(out["decode"], out["encode"]), 0.0
        return out

    def switched(self, decision: Decision, seconds: float, now: float) -> None:
        """The switch `decision` asked for is done (it took `seconds`); its new name is dwelling."""
        self.last_switch = (decision.from_kind, decision.to_kind, now)
        self.last_switch_s = seconds
        self.streak, self.streak_count = None, 0

    def dwell(self, name: str, now: float) -> None:
        self.dwell_until[name] = now + self.policy.min_dwell_s

    def due(self, now: float) -> bool:
        """An evaluation interval has passed (before it, evaluate returns None at once)."""
        return self.last_eval is None or now - self.last_eval >= self.policy.interval_s

    def evaluate(self, snapshot: dict, now: float) -> Decision | None:
        """A switch to make now, or None (also between intervals and during cooldowns)."""
        p = self.policy
        if not self.due(now):
            return None
        self.last_eval = now
        pressures = self.last_pressures = self.pressures(snapshot)
        if self.last_switch is not None and now - self.last_switch[2] < max(p.min_cooldown_s,
                                                                             p.cost_factor * self.last_switch_s):
            return None
        kinds = snapshot["kinds"]
        hot = max(pressures, key=pressures.get, default=None)
        if hot is None or pressures[hot] < p.high:
            self.streak, self.streak_count = None, 0
            return None
        donors = [k for k in pressures if k != hot and kinds[k]["instances"] > 1
                  and pressures[k] * kinds[k]["instances"] / (kinds[k]["instances"] - 1) <= p.low]
        if self.last_switch is not None and now - self.last_switch[2] < p.reverse_after_s:
            donors = [k for k in donors if (hot, k) != (self.last_switch[0], self.last_switch[1])]
        if not donors:
            self.streak, self.streak_count = None, 0
            return None
        donor = min(donors, key=pressures.get)
        pair = (donor, hot)
        self.streak_count = self.streak_count + 1 if self.streak == pair else 1
        self.streak = pair
        if self.streak_count < p.confirm:
            return None
        candidates = [(row.get("queued_units", row.get("running", 0)), name)
                      for name, row in snapshot["stages"].items()
                      if row["kind"] == donor and not row.get("pinned") and self.dwell_until.get(name, 0.0) <= now]
        if not candidates:
            return None
        stage = min(candidates)[1]
        reason = (f"{hot} pressure {pressures[hot]:.2f} >= {p.high} for {p.confirm} checks; {donor} "
                  f"{pressures[donor]:.2f} (x {kinds[donor]['instances']}/{kinds[donor]['instances'] - 1} "
                  f"<= {p.low}) gives {stage}")
        self.streak, self.streak_count = None, 0
        return Decision(stage, donor, hot, reason, pressures)
