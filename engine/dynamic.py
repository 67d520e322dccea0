"""`dynamic=True`: the orchestrator's allocation loop. Each EPDEngine.step calls `tick`: while no
switch runs, the allocator (engine/allocator.py) looks at the load estimator's snapshot; a
decision starts a role switch (EPDEngine.begin_switch, engine/switching.py) that later steps
advance; once it serves, the allocator learns its measured cost. Every decision is logged and
kept (status()["allocator"]), with its reason, whether the switch was refused, and its seconds."""

from __future__ import annotations

import dataclasses
import logging
import time

from engine.allocator import Allocator, AllocatorPolicy, Decision
from engine.sampling import RequestError
from engine.stage_handles import StageError

log = logging.getLogger(__name__)
KEEP = 100  # decisions kept for status


class Dynamic:
    def __init__(self, policy: AllocatorPolicy) -> None:
        self.allocator = Allocator(policy)
        self.started = time.perf_counter()
        self.decisions: list[dict] = []
        self.pending: tuple[str, Decision, dict] | None = None  # (new stage name, decision, its record)

    def tick(self, epd) -> None:
        now = time.perf_counter()
        if self.pending is not None:
            self._follow(epd, now)
            return
        if not self.allocator.due(now):  # the snapshot only when the allocator will read it
            return
        snapshot = epd.load()
        decision = self.allocator.evaluate(snapshot, now)
        if log.isEnabledFor(logging.DEBUG):  # every evaluation, to follow why a switch came when it did
            d = snapshot["kinds"].get("decode", {})
            log.debug("dynamic: t %.1f s pressures %s; decode running %s, arriving %s/s, departing %s/s, step %s",
                      now - self.started, self.allocator.last_pressures, d.get("running"), d.get("arrival_rate"),
                      d.get("departure_rate"), d.get("step_s") and round(d["step_s"], 4))
        if decision is None:
            return
        stage = epd.stages[decision.stage]
        record = {"t_s": round(now - self.started, 3), "stage": decision.stage, "from": decision.from_kind,
                  "to": decision.to_kind, "reason": decision.reason, "pressures": decision.pressures}
        self.decisions = (self.decisions + [record])[-KEEP:]
        try:
            name = epd.begin_switch(stage.kind, stage.index, decision.to_kind)
        except RequestError as e:  # e.g. its weights are mapped by another stage: not this one
            record["refused"] = str(e)
            self.allocator.dwell(decision.stage, now)
            log.warning("dynamic: %s -> %s refused: %s", decision.stage, decision.to_kind, e)
            return
        log.info("dynamic: %s -> %s (%s): %s", decision.stage, decision.to_kind, name, decision.reason)
        self.pending = (name, decision, record)

    def _follow(self, epd, now: float) -> None:
        name, decision, record = self.pending
        try:
            done = epd.switch_done(name)
        except StageError as e:
            record["error"] = str(e)
            self.pending = None
            log.error("dynamic: the switch to %s failed: %s", name, e)
            return
        if done is None:
            return
        record.update(new_stage=name, seconds=done["seconds"], drain_s=done["drain_s"])
        self.allocator.switched(decision, done["seconds"], now)
        self.allocator.dwell(name, now)
        self.pending = None
        log.info("dynamic: %s serves as %s after %.2f s", name, decision.to_kind, done["seconds"])

    def status(self) -> dict:
        return {"policy": dataclasses.asdict(self.allocator.policy), "pressures": self.allocator.last_pressures,
                "switching_to": self.pending[0] if self.pending else None, "decisions": list(self.decisions)}
