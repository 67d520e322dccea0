"""The simulated stage instances of EPD and pd: encoder, prefill, decode.

Each mirrors its role's batching (engine/roles/, engine/schedulers.py) with times from the cost
model; GPU work goes through its GPU's sharing model (engine/simulator/events.py), so instances on
one GPU slow each other down.

- `Encoder` (engine/roles/encode.py): waiting parts FCFS into batches of up to
  max_images_per_batch items (whole parts; a larger part goes alone); a batch's images are
  preprocessed on the encoder's preprocessing thread, then its tower runs on the GPU. Pipelined
  as the role: the next batch preprocesses during this one's tower, at most two batches past the
  queue, and nothing new starts while the worker is in a tower. Its cache (as engine/mm_cache.py's
  EncoderCache, LRU over SimConfig.mm_cache_capacity items): an item whose key it holds is a hit,
  neither preprocessed nor through the tower; a batch preprocesses and encodes its misses only,
  and one with misses costs the calibration's encode_batch_overhead_s more on the preprocessing
  thread.
- `Prefill` (engine/roles/prefill.py): FCFS prompts up to max_num_batched_tokens (a longer one goes
  alone) and max_num_seqs, one forward; in pd mode it first preprocesses and encodes each
  request's images itself, one request after another (not pipelined, as the role).
- `Decode` (engine/roles/decode.py): continuous batching of up to max_num_seqs sequences; a step
  costs decode_s(batch, mean context) and gives every running sequence one token; new requests
  join at step boundaries.

Ignored: KV and MM arena capacity (no stalls, no preemption), the pixel cache and pd's encoder
cache (there every image is encoded), multi-step decode, a prefill's encode_first wait, the
worker's polling granularity, message latency beyond the cost model's hand-off, and
preprocessing's use of the GPU (it runs on its own resource; its waits for the GPU are the
calibration's encode_batch_overhead_s).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.simulator.cost_model import CostModel
from engine.simulator.events import EventLoop
from engine.simulator.request import SimRequest

if TYPE_CHECKING:
    from engine.simulator.sim import SimConfig, Simulation

MAX_IN_FLIGHT = 2  # engine/roles/encode.py: batches past the queue (one in the tower, one preprocessing)


@dataclass
class Part:
    """A request's items given to one encoder, and when they went through it."""

    req: SimRequest
    items: int
    encoder: int
    keys: tuple = ()  # its items' content keys (fewer than items: the rest have none)
    misses: int = 0  # items not in the encoder's cache when its batch was taken
    prep_start: float = 0.0
    prep_end: float = 0.0
    tower_start: float = 0.0
    tower_end: float = 0.0


@dataclass
class _Batch:
    parts: list[Part]
    ready: bool = False  # preprocessed


def take_items(queue: deque, budget: int, items: Callable[[object], int]) -> list:
    """EncodeScheduler's rule: whole entries FCFS while their items fit `budget`; the first always."""
    batch, total = [], 0
    while queue and (not batch or total + items(queue[0]) <= budget):
        total += items(queue[0])
        batch.append(queue.popleft())
    return batch


def take_prompts(queue: deque[SimRequest], max_seqs: int, max_tokens: int) -> list[SimRequest]:
    """PrefillScheduler's rule: FCFS, no overtaking; at most max_seqs prompts, max_tokens tokens in
    all (a longer prompt goes alone)."""
    batch: list[SimRequest] = []
    tokens = 0
    while queue and len(batch) < max_seqs and (not batch or tokens + queue[0].prompt_tokens <= max_tokens):
        tokens += queue[0].prompt_tokens
        batch.append(queue.popleft())
    return batch


class Instance:
    """One stage instance: its kind and index, its GPU, and the simulation it reports to."""

    kind = ""

    def __init__(self, sim: Simulation, index: int, device: str) -> None:
        self.sim, self.index, self.device = sim, index, device
        self.loop: EventLoop = sim.loop
        self.gpu = sim.gpus[device]
        self.costs: CostModel = sim.costs
        self.config: SimConfig = sim.config

    @property
    def name(self) -> str:
        return f"{self.kind}{self.index}"

    def preprocess_s(self, reqs: list[tuple[SimRequest, int]]) -> float:
        """Preprocessing a batch of (request, images) together: per image size, one batch."""
        by_size: dict[tuple[int, int], int] = {}
        for req, n in reqs:
            by_size[req.image_size] = by_size.get(req.image_size, 0) + n
        return sum(self.costs.preprocess_s(size, n) for size, n in by_size.items())


class Encoder(Instance):
    kind = "encode"

    def __init__(self, sim: Simulation, index: int, device: str) -> None:
        super().__init__(sim, index, device)
        self.pending: deque[Part] = deque()
        self.in_flight: deque[_Batch] = deque()  # preprocessing or preprocessed, not yet in the tower
        self.in_tower = False
        self.cache: OrderedDict = OrderedDict()  # image key -> None, least recently used first
        self.capacity = self.config.mm_cache_capacity

    def remember(self, key: object) -> bool:
        """Look `key` up in the cache and hold it (most recently used); True if it was there."""
        hit = key in self.cache
        if self.capacity > 0:
            self.cache[key] = None
            self.cache.move_to_end(key)
            while len(self.cache) > self.capacity:
                self.cache.popitem(last=False)
        return hit

    def _take(self, part: Part) -> None:
        """A part into a batch: its items looked up (and taken into the cache)."""
        hits = 0
        for key in part.keys:
            hits += self.remember(key)
            self.sim.hints[key] = self.index
        part.misses = part.items - hits

    def add(self, part: Part) -> None:
        self.pending.append(part)
        self._step()

    def _step(self) -> None:
        """The role's step: start a batch's preprocessing if the thread is free, then the oldest
        preprocessed batch's tower (starting the next preprocessing first)."""
        if self.in_tower:
            return  # the worker is inside the tower: it steps again when it returns
        self._start_batch()
        if self.in_flight and self.in_flight[0].ready:
            batch = self.in_flight.popleft()
            self._start_batch()
            self._tower(batch)

    def _start_batch(self) -> None:
        if len(self.in_flight) < MAX_IN_FLIGHT and all(b.ready for b in self.in_flight) and self.pending:
            batch = _Batch(take_items(self.pending, self.config.max_images_per_batch, lambda p: p.items))
            for part in batch.parts:
                part.prep_start = self.loop.now
                self._take(part)
            self.in_flight.append(batch)
            seconds = self.preprocess_s([(p.req, p.misses) for p in batch.parts if p.misses])
            if any(p.misses for p in batch.parts):
                seconds += self.costs.calib.encode_batch_overhead_s
            self.loop.after(seconds, lambda: self._prepared(batch))

    def _prepared(self, batch: _Batch) -> None:
        batch.ready = True
        for part in batch.parts:
            part.prep_end = self.loop.now
        self._step()

    def _tower(self, batch: _Batch) -> None:
        self.in_tower = True
        start, items = self.loop.now, sum(p.misses for p in batch.parts)
        if items:
            self.gpu.submit(self.costs.tower_s(items), lambda: self._encoded(batch, start, items))
        else:  # every item cached: answered without the tower
            self.loop.after(0.0, lambda: self._encoded(batch, start, 0))

    def _encoded(self, batch: _Batch, start: float, items: int) -> None:
        self.in_tower = False
        now = self.loop.now
        if items:
            self.sim.log_batch(self, items=items, seqs=len(batch.parts), start=start)
        for part in batch.parts:
            part.tower_start, part.tower_end = start, now
            self.sim.encoded(part)
        self._step()


class Prefill(Instance):
    kind = "prefill"

    def __init__(self, sim: Simulation, index: int, device: str, encodes: bool = False) -> None:
        super().__init__(sim, index, device)
        self.encodes = encodes  # pd: preprocess and encode each request's images before the forward
        self.waiting: deque[SimRequest] = deque()
        self.busy = False

    def add(self, req: SimRequest) -> None:
        self.waiting.append(req)
        self._step()

    def _step(self) -> None:
        if self.busy or not self.waiting:
            return
        self.busy = True
        batch = take_prompts(self.waiting, self.config.max_num_seqs, self.config.max_num_batched_tokens)
        self._encode(batch, deque(r for r in batch if r.images and self.encodes))

    def _encode(self, batch: list[SimRequest], todo: deque[SimRequest]) -> None:
        """pd: the next request's images preprocessed, then through the tower; then the forward."""
        if not todo:
            self._forward(batch)
            return
        req = todo.popleft()
        prep = self.preprocess_s([(req, req.images)])

        def tower() -> None:
            start = self.loop.now

            def done() -> None:
                req.preprocess_s, req.tower_s, req.encode_end = prep, self.loop.now - start, self.loop.now
                self._encode(batch, todo)

            self.gpu.submit(self.costs.tower_s(req.images), done)

        self.loop.after(prep, tower)

    def _forward(self, batch: list[SimRequest]) -> None:
        start, tokens = self.loop.now, sum(r.prompt_tokens for r in batch)
        for req in batch:
            req.prefill_start = start
        self.gpu.submit(self.costs.prefill_s(tokens), lambda: self._prefilled(batch, start, tokens))

    def _prefilled(self, batch: list[SimRequest], start: float, tokens: int) -> None:
        self.busy = False
        self.sim.log_batch(self, tokens=tokens, seqs=len(batch), start=start)
        for req in batch:
            req.emit(self.loop.now)
            self.sim.prefilled(req, self)
        self._step()


class Decode(Instance):
    kind = "decode"

    def __init__(self, sim: Simulation, index: int, device: str) -> None:
        super().__init__(sim, index, device)
        self.pending: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.busy = False

    def add(self, req: SimRequest) -> None:
        self.pending.append(req)
        self._step()

    def _step(self) -> None:
        if self.busy:
            return
        while self.pending and len(self.running) < self.config.max_num_seqs:
            self.running.append(self.pending.popleft())
        if self.running:
            self.busy = True
            decode_step(self, self.running, self._stepped)

    def _stepped(self, finished: list[SimRequest]) -> None:
        self.busy = False
        for req in finished:
            self.sim.finished(req, self)
        self._step()


def decode_step(instance: Instance, running: list[SimRequest], then: Callable[[list[SimRequest]], None]) -> None:
    """One decode step over `running` on the instance's GPU: a token for each, those finished
    taken out of `running` and handed to `then`."""
    batch = list(running)
    context = sum(r.prompt_tokens + len(r.token_times) for r in batch) / len(batch)
    start = instance.loop.now

    def done() -> None:
        now = instance.loop.now
        instance.sim.log_batch(instance, kind="decode", seqs=len(batch), tokens=len(batch), start=start)
        for req in batch:
            req.emit(now)
        finished = [r for r in batch if r.done]
        if finished:
            running[:] = [r for r in running if not r.done]
        then(finished)

    instance.gpu.submit(instance.costs.decode_s(len(batch), context), done)
