"""The simulated aggregated engine: one instance per GPU doing everything (engine/aggregated.py,
engine/llm.py).

A request's images are first decoded and preprocessed by the image workers (image_workers
threads, one job per request, FCFS), off the engine's thread; then it joins the engine. Each step,
as AggregatedEngine.step: an encode batch if images wait (FCFS whole requests up to
max_images_per_batch items), then a prefill batch if prompts are ready (FCFS up to
max_num_batched_tokens, and max_num_seqs minus the running sequences), otherwise one decode step
of every running sequence. The steps run back to back while there is work.

Ignored: KV and MM arena capacity (no preemption), the caches, multi-step decode, the 50 ms the
engine waits for image jobs when idle, and the image workers' use of the GPU or of CPU cores
shared with other processes.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from engine.simulator.request import SimRequest
from engine.simulator.stages import Instance, decode_step, take_items, take_prompts

if TYPE_CHECKING:
    from engine.simulator.sim import Simulation


class Aggregated(Instance):
    kind = "aggregated"

    def __init__(self, sim: Simulation, index: int, device: str) -> None:
        super().__init__(sim, index, device)
        self.preprocessing: deque[SimRequest] = deque()  # waiting for an image worker
        self.workers_busy = 0
        self.encode_waiting: deque[SimRequest] = deque()
        self.prefill_waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.busy = False

    def add(self, req: SimRequest) -> None:
        if req.images:
            self.preprocessing.append(req)
            self._start_jobs()
        else:
            self.prefill_waiting.append(req)
            self._step()

    def _start_jobs(self) -> None:
        while self.preprocessing and self.workers_busy < self.config.image_workers:
            req = self.preprocessing.popleft()
            self.workers_busy += 1
            seconds = self.preprocess_s([(req, req.images)])
            self.loop.after(seconds, lambda req=req, seconds=seconds: self._preprocessed(req, seconds))

    def _preprocessed(self, req: SimRequest, seconds: float) -> None:
        self.workers_busy -= 1
        req.preprocess_s = seconds
        self.encode_waiting.append(req)
        self._start_jobs()
        self._step()

    def has_work(self) -> bool:
        return bool(self.encode_waiting or self.prefill_waiting or self.running)

    def _step(self) -> None:
        """Start a step unless one runs: encode first (if images wait), then prefill or decode."""
        if self.busy or not self.has_work():
            return
        self.busy = True
        if not self.encode_waiting:
            self._prefill_or_decode()
            return
        batch = take_items(self.encode_waiting, self.config.max_images_per_batch, lambda r: r.images)
        start, items = self.loop.now, sum(r.images for r in batch)

        def encoded() -> None:
            now = self.loop.now
            self.sim.log_batch(self, kind="encode", items=items, seqs=len(batch), start=start)
            for req in batch:
                req.tower_s, req.encode_end = now - start, now
            self.prefill_waiting.extend(batch)
            self._prefill_or_decode()

        self.gpu.submit(self.costs.tower_s(items), encoded)

    def _prefill_or_decode(self) -> None:
        free = self.config.max_num_seqs - len(self.running)
        batch = take_prompts(self.prefill_waiting, free, self.config.max_num_batched_tokens) if free > 0 else []
        if batch:
            start, tokens = self.loop.now, sum(r.prompt_tokens for r in batch)
            for req in batch:
                req.prefill_start = start

            def prefilled() -> None:
                self.sim.log_batch(self, kind="prefill", tokens=tokens, seqs=len(batch), start=start)
                for req in batch:
                    req.emit(self.loop.now)
                self.running += [r for r in batch if not r.done]
                self._step_done([r for r in batch if r.done])

            self.gpu.submit(self.costs.prefill_s(tokens), prefilled)
        elif self.running:
            decode_step(self, self.running, self._step_done)
        else:  # encoded only: nothing more this step
            self._step_done([])

    def _step_done(self, finished: list[SimRequest]) -> None:
        self.busy = False
        for req in finished:
            self.sim.finished(req, self)
        self._step()
