"""The encode role: images into this worker's MM arena, answered from its encoder cache where it can.

Two stages, pipelined: a preprocessing thread reads a batch's image bytes, checks them and
decodes + preprocesses them (on its own CUDA stream where the GPU path runs), while the worker's
thread runs the vision tower on the batch before, on a stream of its own. JPEGs are decoded by
nvjpeg (torchvision); with the worker's 32 CUDA hardware queues (ipc/worker.py) a decode does not
wait for the tower. The thread releases the GIL there and in PIL.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import torch

from engine.block_manager import BlockManager
from engine.images_anyres import all_items
from engine.messages import (
    ENCODER_STAMPS,
    Encoded,
    EncodeTask,
    Exported,
    Failed,
    FreeMM,
    Loaded,
    Ready,
    SendWeights,
    ServeArena,
    Unencoded,
)
from engine.mm_cache import EncoderCache, item_pixels
from engine.preprocess import on_side_stream, on_stream, stage_image_processor
from engine.request import Sequence
from engine.roles.base import RoleSpec, Send, _gb, _mm_blocks, _pixel_cache, _Role
from engine.runner import ModelRunner, kv_block_shape, mm_arena_shape
from engine.sampling import SamplingParams
from ipc.arena import SharedArena
from ipc.busy_board import BusyBoard

MAX_IN_FLIGHT = 2  # batches past the queue: one in the tower, one preprocessing


STEP_STAMPS = ENCODER_STAMPS[4:]  # inside the preprocessing: bytes read, decoded, resized (host times)


@dataclass
class _Batch:
    """Tasks encoded together: their MM blocks (taken from the cache), which of their items
    need the tower, and the preprocessing job's result (pixels, its start and end)."""

    tasks: list[EncodeTask]
    taken: list[list[tuple[list[int], bool]]]
    job: Future | None = None
    marks: dict[str, float] = field(default_factory=dict)  # the preprocessing's steps (STEP_STAMPS)
    blocks: list[list[int]] = field(init=False)
    misses: list[tuple[int, int]] = field(init=False)

    def __post_init__(self) -> None:
        self.blocks = [[b for item_blocks, _ in got for b in item_blocks] for got in self.taken]
        self.misses = [(t, i) for t, got in enumerate(self.taken) for i, (_, hit) in enumerate(got) if not hit]


class EncodeRole(_Role):
    """Encode images into this worker's MM arena through its encoder cache (engine/mm_cache.py):
    an image cached there is answered at once with its blocks (one more reference), so it serves
    whichever prefill gets the request; FreeMM drops a reference."""

    def __init__(self, spec: RoleSpec, send: Send) -> None:
        super().__init__(spec, send)
        config, cfg = self.config, self.cfg
        model = self.load_model("vision")
        self.arena = SharedArena.create(mm_arena_shape(config, cfg), self.dtype, self.device, f"mm{spec.index}")
        no_kv = torch.empty(0, *kv_block_shape(config, cfg), dtype=self.dtype, device=self.device)
        self.runner = ModelRunner(config, cfg, model, no_kv, self.arena.tensor)
        if config.cuda_graphs and self.runner.backend == "cuda":
            self.runner.capture_graphs()
        self.graphs = sorted(self.runner.vision_graphs.graphs) if self.runner.vision_graphs else []
        self.blocks = BlockManager(self.runner.num_mm_blocks)
        self.cache = EncoderCache(self.blocks, enabled=config.mm_cache)  # serves every prefill
        self.image_processor = stage_image_processor(config, cfg)  # on this GPU where it can
        self.pixel_cache = _pixel_cache(config, self.image_processor)
        self.pending: deque[EncodeTask] = deque()
        self.in_flight: deque[_Batch] = deque()
        self._prep = ThreadPoolExecutor(1, thread_name_prefix="preprocess")
        self._prep_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # the tower on a stream of its own, not the legacy default stream: work on that stream
        # inside nvjpeg would wait for the tower and serialize the pipeline (docs/benchmarks.md)
        self._tower_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.board = BusyBoard.open(spec.busy_board) if spec.busy_board is not None else None
        self._published = False
        send(Loaded(self.name, kv_owner=False, weights=self.packed_weights))
        send(Exported(self.name, self.arena.handle))
        send(Ready(self.name, {**self.base_stats(self.runner), "mm_arena_blocks": self.arena.tensor.shape[0],
                               "mm_arena_gb": _gb(self.arena.tensor), "graph_buckets": self.graphs}))

    @property
    def busy(self) -> bool:
        return bool(self.in_flight) or self._can_start()

    @property
    def drained(self) -> bool:  # and no prefill reads its blocks any more
        return not self.busy and not self.pending and self.cache.stats()["in_use_blocks"] == 0

    def hand_over(self) -> None:
        """For a role switch: take no new tasks, give back those not started (Unencoded: another
        encoder takes them), finish the batches in flight."""
        self.drain()
        for task in self.pending:
            self.send(Unencoded(task.req_id, task.part, len(task.items)))
        self.pending.clear()
        self._publish()

    def _can_start(self) -> bool:  # FCFS: the first task waits for MM blocks to be freed
        return bool(self.pending) and self.cache.can_acquire(self.pending[0].keys, [1] * len(self.pending[0].items))

    def handle(self, msg: object) -> None:
        if isinstance(msg, SendWeights):
            self.send_weights(msg)
            return
        if isinstance(msg, ServeArena):  # a prefill on another host reads this MM arena over a link
            self.serve_arena(msg, self.arena.tensor)
            return
        if isinstance(msg, FreeMM):
            self.cache.release(msg.blocks)
        elif isinstance(msg, EncodeTask):
            if not msg.items:  # every item of every image (LLaVA-1.5: one per image)
                msg.items = all_items(self.cfg, msg.image_sizes or [(None, None)] * len(msg.images))
            if self.draining:
                self.refuse(msg.req_id, len(msg.items))
                return
            self.pending.append(msg)
        self._publish()

    def _publish(self) -> None:
        """This encoder's slot on the busy board: work in hand (a prefill on this device waits)."""
        busy = self.busy
        if self.board is not None and busy != self._published:
            self.board.set(self.spec.index, self.device, busy)
            self._published = busy

    def step(self) -> None:
        """Start a batch when none is preprocessing: the waiting tasks FCFS, as many as the item
        budget (max_images_per_batch) and the MM arena take (on the H200, nvjpeg + our kernels
        run 1713 1080p images/s at batch 32, 439 at batch 1), its preprocessing on the thread.
        Then the oldest batch's tower once its pixels are ready, waiting for them a few
        milliseconds at most (new tasks come in between)."""
        self._start_batch()
        if self.in_flight:
            head = self.in_flight[0]
            wait([head.job], timeout=0.005)
            if head.job.done():
                self.in_flight.popleft()
                self._start_batch()  # the thread is free: the next batch preprocesses during this tower
                self._finish(head)
        self._publish()

    def _start_batch(self) -> None:
        """A batch onto the preprocessing thread, if it is idle and the MM arena takes one."""
        if (len(self.in_flight) < MAX_IN_FLIGHT and all(b.job.done() for b in self.in_flight)
                and self._can_start()):
            batch = self._take_batch()
            batch.job = self._prep.submit(self._prepare, batch)
            self.in_flight.append(batch)

    def _take_batch(self) -> _Batch:
        tasks, taken, items = [], [], 0
        budget = self.config.max_images_per_batch
        while self._can_start() and (not tasks or items + len(self.pending[0].items) <= budget):
            task = self.pending.popleft()
            got = self.cache.acquire(task.keys, [1] * len(task.items))
            assert got is not None, "_can_start said the blocks fit"
            tasks.append(task)
            taken.append(got)
            items += len(task.items)
        return _Batch(tasks, taken)

    def _prepare(self, batch: _Batch) -> tuple[torch.Tensor | None, float, float]:
        """The preprocessing job (on the thread): the tower's inputs for the batch's misses, in
        order, from one preprocessing call, synchronized. Returns (pixels or None, its start, its
        end: perf_counter); a bad image raises."""
        start = time.perf_counter()
        if not batch.misses:
            return None, start, start
        for task in batch.tasks:
            task.images = self.image_sources(task.images)
        batch.marks["sources_end"] = time.perf_counter()
        inner = getattr(self.image_processor, "images", self.image_processor)
        if hasattr(inner, "marks"):  # the GPU preprocessor stamps its decode and resize
            inner.marks = batch.marks
        with on_side_stream(self._prep_stream):
            pixels = self._pixels(batch.tasks, batch.misses)
        return pixels, start, time.perf_counter()

    def _pixels(self, tasks: list[EncodeTask], misses: list[tuple[int, int]]) -> torch.Tensor:
        """The tower's inputs for items `misses` ((task, position of the item in it)), in that
        order, from one preprocessing call over the tasks' images."""
        used = sorted({t for t, _ in misses})  # tasks with items to preprocess
        images = [image for t in used for image in tasks[t].images]
        first = dict(zip(used, _starts([len(tasks[t].images) for t in used])))  # each one's first image there
        sizes = [hw for t in used for hw in tasks[t].image_sizes] if all(tasks[t].image_sizes for t in used) else []
        items = [(first[t] + tasks[t].items[i][0], tasks[t].items[i][1]) for t, i in misses]
        keys = [tasks[t].keys[i] if tasks[t].keys else None for t, i in misses]
        return item_pixels(self.image_processor, self.cfg, self.pixel_cache, images, items, sizes,
                           keys if any(k is not None for k in keys) else [])

    def _finish(self, batch: _Batch) -> None:
        """The tower for a batch whose pixels are ready, synchronized (a prefill in another
        process reads the arena), then each task answered with the batch's times. If an image
        or the tower fails, the batch's blocks go back and each task runs again alone, so only
        the request it belongs to fails."""
        try:
            pixels, prep_start, prep_end = batch.job.result()
        except Exception as e:  # a bad image: its request fails, not the stage
            self._retry_alone(batch, e)
            return
        start = time.perf_counter()
        try:
            with on_stream(self._tower_stream):
                if batch.misses:
                    if pixels.is_cuda:  # made on the preprocessing stream, read on this one
                        pixels.record_stream(self._tower_stream)
                    seq = Sequence(seq_id=-1, prompt_ids=[], sampling=SamplingParams(), seed=0,
                                   stop_token_ids=frozenset(), pixel_values=pixels,
                                   mm_blocks=[batch.blocks[t][i] for t, i in batch.misses])
                    self.runner.encode([seq])
                if self._tower_stream is not None:  # this stream only: the next batch preprocesses on the other
                    self._tower_stream.synchronize()
        except Exception as e:
            self._retry_alone(batch, e)
            return
        end = time.perf_counter()
        steps = tuple(batch.marks[k] for k in STEP_STAMPS) if all(k in batch.marks for k in STEP_STAMPS) else ()
        times = (prep_start, prep_end, start, end, *steps)
        for task, blocks in zip(batch.tasks, batch.blocks):
            self.send(Encoded(task.req_id, task.part, self.spec.index, blocks, prep_end - prep_start, end - start,
                              times))

    def _retry_alone(self, batch: _Batch, error: Exception) -> None:
        """Give a failed batch's blocks back (nothing of it cached); one task: it fails with the
        error; several: each runs again alone, at once."""
        self.cache.discard([batch.tasks[t].keys[i] for t, i in batch.misses if batch.tasks[t].keys])
        for blocks in batch.blocks:
            self.cache.release(blocks)
        if len(batch.tasks) == 1:
            task = batch.tasks[0]
            self.send(Failed(task.req_id, self.name, str(error) or type(error).__name__, images=len(task.items)))
            return
        for task in batch.tasks:
            got = self.cache.acquire(task.keys, [1] * len(task.items))
            assert got is not None, "the batch's blocks were given back"
            alone = _Batch([task], [got])
            alone.job = _done(self._prepare, alone)
            self._finish(alone)

    def stats(self) -> dict:
        pixels = self.pixel_cache.stats() if self.pixel_cache else {}
        return {"waiting": len(self.pending), "mm_blocks": _mm_blocks(self.cache), "vision_graphs": self.graphs,
                "mm_cache": {**self.cache.stats(), **pixels}, **self.served()}

    def close(self) -> None:
        self._prep.shutdown(cancel_futures=True)
        if self.board is not None:
            self.board.set(self.spec.index, self.device, False)
            self.board.close()
        self.arena.close()
        if self.byte_arena is not None:
            self.byte_arena.close()
        super().close()


def _starts(counts: list[int]) -> list[int]:
    """Where each of consecutive runs of these lengths starts."""
    out, n = [], 0
    for c in counts:
        out.append(n)
        n += c
    return out


def _done(fn, *args) -> Future:
    """fn(*args) run now, as a finished Future (its result or its exception)."""
    future: Future = Future()
    try:
        future.set_result(fn(*args))
    except Exception as e:
        future.set_exception(e)
    return future

