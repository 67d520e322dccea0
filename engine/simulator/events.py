"""The event loop and how instances on one GPU share it.

`EventLoop`: a heap of (time, sequence number, callback); equal times run in the order they
were scheduled, so a run is deterministic.

GPU sharing is a small class with one method, `submit(seconds, then)`: `seconds` is the work's
time on the GPU alone, `then` is called when it is done. `ProcessorSharing` (the default): while
k jobs of the instances on a GPU are busy each progresses at 1/k of its solo speed; at each change
of k the remaining work is re-planned. Real GPUs time-slice between processes (and overlap
kernels of different processes only with MPS), so a job's slow-down depends on its kernels'
lengths and occupancy; processor sharing is the fluid limit of fair time-slicing. Its
`colocation_factor` f (the cost model's calibration) charges the switching: while k >= 2 jobs are
busy each progresses at 1 / (k (1 + f)), the GPU giving up f / (1 + f) of its throughput. `Unshared`
runs every job at full speed (each instance as if it had its own GPU): the bound without
contention.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

Callback = Callable[[], None]


class EventLoop:
    """Simulated time and the callbacks due at future times."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callback]] = []
        self._order = itertools.count()

    def at(self, time: float, callback: Callback) -> None:
        heapq.heappush(self._heap, (max(time, self.now), next(self._order), callback))

    def after(self, delay: float, callback: Callback) -> None:
        self.at(self.now + delay, callback)

    def run(self) -> None:
        """Run callbacks in time order until none is left."""
        while self._heap:
            self.now, _, callback = heapq.heappop(self._heap)
            callback()


class Unshared:
    """Every job at full speed, whatever else runs on the GPU."""

    def __init__(self, loop: EventLoop) -> None:
        self.loop = loop

    def submit(self, seconds: float, then: Callback) -> None:
        self.loop.after(seconds, then)


class ProcessorSharing:
    """One GPU under processor sharing: k busy jobs each get 1/k of it."""

    EPS = 1e-12  # remaining solo seconds below which a job is done

    def __init__(self, loop: EventLoop, colocation_factor: float = 0.0, servers: int = 1) -> None:
        self.loop = loop
        self.colocation_factor = colocation_factor  # k >= 2 busy jobs: each at 1 / (k (1 + f))
        self.servers = max(1, servers)  # jobs that run at full speed at once (a CPU's cores; a GPU: 1)
        self.jobs: dict[int, list] = {}  # id -> [remaining solo seconds, callback]
        self._ids = itertools.count()
        self._last = 0.0  # when remaining work was last brought up to date
        self._plan = 0  # the completion event that is still valid

    @property
    def busy(self) -> int:
        return len(self.jobs)

    def submit(self, seconds: float, then: Callback) -> None:
        self._advance()
        self.jobs[next(self._ids)] = [max(seconds, 0.0), then]
        self._replan()

    def _advance(self) -> None:
        """Charge every job its share of the time since the last change."""
        now = self.loop.now
        if self.jobs:
            share = (now - self._last) / self._stretch()
            for job in self.jobs.values():
                job[0] -= share
        self._last = now

    def _stretch(self) -> float:
        """Wall seconds per solo second of each busy job: k / servers (at least 1), times 1 + f
        when shared."""
        k = len(self.jobs)
        return max(1.0, k / self.servers) * (1.0 + self.colocation_factor) if k > 1 else float(k)

    def _replan(self) -> None:
        self._plan += 1
        if self.jobs:
            plan, first = self._plan, min(job[0] for job in self.jobs.values())
            self.loop.after(max(first, 0.0) * self._stretch(), lambda: self._complete(plan))

    def _complete(self, plan: int) -> None:
        if plan != self._plan:
            return  # re-planned since
        self._advance()
        done = [i for i, job in self.jobs.items() if job[0] <= self.EPS]
        if not done:  # rounding: the earliest job is due now
            done = [min(self.jobs, key=lambda i: self.jobs[i][0])]
        callbacks = [self.jobs.pop(i)[1] for i in done]
        self._replan()
        for callback in callbacks:
            callback()
