"""The encode role: images into this worker's MM arena, answered from its encoder cache where it can."""

from __future__ import annotations

import time
from collections import deque

import torch

from engine.block_manager import BlockManager
from engine.images_anyres import all_items
from engine.messages import (
    Encoded,
    EncodeTask,
    Exported,
    Failed,
    FreeMM,
    Loaded,
    Ready,
)
from engine.mm_cache import EncoderCache, item_pixels
from engine.preprocess import stage_image_processor
from engine.request import Sequence
from engine.roles.base import RoleSpec, Send, _gb, _mm_blocks, _pixel_cache, _Role, _synchronize
from engine.runner import ModelRunner, kv_block_shape, load_weights, mm_arena_shape
from engine.sampling import SamplingParams
from ipc.arena import SharedArena


class EncodeRole(_Role):
    """Encode images into this worker's MM arena through its encoder cache (engine/mm_cache.py):
    an image cached there is answered at once with its blocks (one more reference), so it serves
    whichever prefill gets the request; FreeMM drops a reference."""

    def __init__(self, spec: RoleSpec, send: Send) -> None:
        super().__init__(spec, send)
        config, cfg = self.config, self.cfg
        model = load_weights(config, cfg, "vision")
        self.arena = SharedArena.create(mm_arena_shape(config, cfg), self.dtype, self.device, f"mm{spec.index}")
        no_kv = torch.empty(0, *kv_block_shape(config, cfg), dtype=self.dtype, device=self.device)
        self.runner = ModelRunner(config, cfg, model, no_kv, self.arena.tensor)
        if config.cuda_graphs and self.runner.backend == "cuda":
            self.runner.capture_graphs()
        self.graphs = sorted(self.runner.vision_graphs.graphs) if self.runner.vision_graphs else []
        self.blocks = BlockManager(self.runner.num_mm_blocks)
        self.cache = EncoderCache(self.blocks, enabled=config.mm_cache)  # serves every prefill
        self.image_processor = stage_image_processor(config, cfg)  # on this GPU where it can
        self.pixel_cache = _pixel_cache(config)
        self.pending: deque[EncodeTask] = deque()
        send(Loaded(self.name, kv_owner=False))
        send(Exported(self.name, self.arena.handle))
        send(Ready(self.name, {**self.base_stats(self.runner), "mm_arena_blocks": self.arena.tensor.shape[0],
                               "mm_arena_gb": _gb(self.arena.tensor), "graph_buckets": self.graphs}))

    @property
    def busy(self) -> bool:  # FCFS: the first task waits for MM blocks to be freed
        return bool(self.pending) and self.cache.can_acquire(self.pending[0].keys, [1] * len(self.pending[0].items))

    def handle(self, msg: object) -> None:
        if isinstance(msg, FreeMM):
            self.cache.release(msg.blocks)
        elif isinstance(msg, EncodeTask):
            if not msg.items:  # every item of every image (LLaVA-1.5: one per image)
                msg.items = all_items(self.cfg, msg.image_sizes or [(None, None)] * len(msg.images))
            if self.draining:
                self.refuse(msg.req_id, len(msg.items))
                return
            msg.images = self.image_sources(msg.req_id, msg.images, msg.keys, msg.items)
            if msg.images is not None:
                self.pending.append(msg)

    def step(self) -> None:
        """Encode the waiting tasks FCFS, as many at a time as the item budget
        (max_images_per_batch) and the MM arena take: one preprocessing call and one tower call
        for all their items not cached (on the H200, nvjpeg + our kernels run 1713 1080p images/s
        at batch 32, 439 at batch 1)."""
        while self.busy:
            batch, taken, items = [], [], 0
            budget = self.config.max_images_per_batch
            while self.busy and (not batch or items + len(self.pending[0].items) <= budget):
                task = self.pending.popleft()
                got = self.cache.acquire(task.keys, [1] * len(task.items))
                assert got is not None, "busy said the blocks fit"
                batch.append(task)
                taken.append(got)
                items += len(task.items)
            self._encode_batch(batch, taken)

    def _encode_batch(self, batch: list[EncodeTask], taken: list[list[tuple[list[int], bool]]]) -> None:
        """Encode the batch's items not cached into their blocks, synchronize (a prefill in
        another process reads the arena), then answer each task. If an image fails, the batch's
        blocks go back and each task runs again alone, so only the request it belongs to fails."""
        blocks = [[b for item_blocks, _ in got for b in item_blocks] for got in taken]
        misses = [(t, i) for t, got in enumerate(taken) for i, (_, hit) in enumerate(got) if not hit]
        timing = {"preprocess_s": 0.0}
        start = time.perf_counter()
        try:
            if misses:
                pixels = self._batch_pixels(batch, misses, timing)
                seq = Sequence(seq_id=-1, prompt_ids=[], sampling=SamplingParams(), seed=0, stop_token_ids=frozenset(),
                               pixel_values=pixels, mm_blocks=[blocks[t][i] for t, i in misses])
                self.runner.encode([seq])
            _synchronize(self.device)
        except Exception as e:  # a bad image fails its request, not the stage
            self.cache.discard([batch[t].keys[i] for t, i in misses if batch[t].keys])
            for task_blocks in blocks:
                self.cache.release(task_blocks)
            if len(batch) == 1:
                self.send(Failed(batch[0].req_id, self.name, str(e), images=len(batch[0].items)))
            else:
                for task in batch:
                    self._encode_alone(task)
            return
        tower_s = time.perf_counter() - start - timing["preprocess_s"]
        for task, task_blocks in zip(batch, blocks):
            self.send(Encoded(task.req_id, task.part, self.spec.index, task_blocks, timing["preprocess_s"], tower_s))

    def _encode_alone(self, task: EncodeTask) -> None:
        got = self.cache.acquire(task.keys, [1] * len(task.items))
        assert got is not None, "the batch's blocks were given back"
        self._encode_batch([task], [got])

    def _batch_pixels(self, batch: list[EncodeTask], misses: list[tuple[int, int]], timing: dict) -> torch.Tensor:
        """The tower's inputs for items `misses` ((task, position of the item in it)), in that
        order, from one preprocessing call over the tasks' images; its time (synchronized) goes
        into timing["preprocess_s"]."""
        start = time.perf_counter()
        first = [0]  # each task's first image in the batch's image list
        for task in batch:
            first.append(first[-1] + len(task.images))
        images = [image for task in batch for image in task.images]
        sizes = [hw for task in batch for hw in task.image_sizes] if all(t.image_sizes for t in batch) else []
        items = [(first[t] + batch[t].items[i][0], batch[t].items[i][1]) for t, i in misses]
        keys = [batch[t].keys[i] if batch[t].keys else None for t, i in misses]
        pixels = item_pixels(self.image_processor, self.cfg, self.pixel_cache, images, items, sizes,
                             keys if any(k is not None for k in keys) else [])
        _synchronize(self.device)
        timing["preprocess_s"] = time.perf_counter() - start
        return pixels

    def stats(self) -> dict:
        pixels = self.pixel_cache.stats() if self.pixel_cache else {}
        return {"waiting": len(self.pending), "mm_blocks": _mm_blocks(self.cache), "vision_graphs": self.graphs,
                "mm_cache": {**self.cache.stats(), **pixels}}

    def close(self) -> None:
        self.arena.close()
        if self.byte_arena is not None:
            self.byte_arena.close()
