"""Stage roles for EPD serving: encode, prefill, decode. A role is built from a RoleSpec (its
kind, index and the resolved EngineConfig) inside a worker process (ipc/worker.py), which feeds
it messages (engine/messages.py) and calls step() while it is busy. Roles hold their weights,
arenas, block managers and runner; they hold no queues of the transport and never block.

    encode:   EncodeTask -> image embeddings into its MM arena (cached ones are not encoded
              again) -> Encoded
    prefill:  PrefillTask (MM refs) -> reads the embeddings (in place when the encoder's arena
              is on its device, else copied into its own MM blocks), frees them (FreeMM, for
              the encoder), prefills into its KV arena -> Prefilled
    decode:   DecodeTask (a prefill instance's KV blocks) -> pulls them, acks (FreeKV, for that
              prefill) -> Tokens (one message per step) ...

Start-up (engine/messages.py): every role loads its weights and says Loaded; prefill and decode
size their KV arena when told (SizeKV), so roles on one GPU size one after another, each seeing
what the others hold; arenas are exported, peers mapped (Peers), then Ready. One prefill and one
decode on one device share one KV arena (prefill owns the first blocks, decode the rest): decode
reads the prompt's blocks in place and acknowledges them when the request ends. Otherwise decode
pulls the blocks (ipc/migration.py) and acknowledges at once. Hand-off copies are timed on the
host around their sync and reported.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.aggregated import AggregatedEngine
from engine.block_manager import BlockManager
from engine.config import EngineConfig, ModelConfig
from engine.images_anyres import all_items
from engine.messages import (
    Abort,
    DecodeTask,
    Encoded,
    EncodeTask,
    Exported,
    Failed,
    FreeKV,
    FreeMM,
    Loaded,
    Migrated,
    Peers,
    Prefilled,
    PrefillTask,
    Ready,
    Sized,
    SizeKV,
    Tokens,
)
from engine.mm_cache import EncoderCache, PixelCache, acquire_and_encode, image_key, item_pixels
from engine.preprocess import stage_image_processor
from engine.request import Sequence, Status, append_step
from engine.runner import ModelRunner, kv_block_shape, kv_blocks_from_memory, load_weights, mm_arena_shape
from engine.sampling import SamplingParams
from engine.schedulers import PrefillScheduler, blocks_for
from ipc.arena import ArenaHandle, SharedArena
from ipc.byte_arena import ByteArena, ByteRef
from ipc.migration import pull_blocks

Send = Callable[[object], None]


@dataclass(frozen=True)
class RoleSpec:
    """What a worker builds: kind "encode" / "prefill" / "decode", its index among its kind,
    the resolved config (its device included). encodes: a prefill that encodes its requests'
    images itself (pd mode). shared: prefill0 and decode0 share prefill0's KV arena."""

    kind: str
    index: int
    config: EngineConfig
    encodes: bool = False
    shared: bool = False
    image_bytes: ArenaHandle | None = None  # the orchestrator's byte arena (ipc/byte_arena.py): image bytes

    @property
    def name(self) -> str:
        return f"{self.kind}{self.index}"


def build_role(spec: RoleSpec, send: Send):
    """The worker's build callable (bind spec with functools.partial)."""
    return {"encode": EncodeRole, "prefill": PrefillRole, "decode": DecodeRole}[spec.kind](spec, send)


def _gb(tensor: torch.Tensor, rows: int | None = None) -> float:
    """Size in GB of `rows` leading rows of tensor (all by default)."""
    rows = tensor.shape[0] if rows is None else rows
    return round(rows * tensor[0].numel() * tensor.element_size() / 1e9, 4) if tensor.shape[0] else 0.0


def _blocks(manager: BlockManager | None) -> dict:
    return {"used": manager.num_blocks - manager.num_free, "total": manager.num_blocks} if manager else {}


def _mm_blocks(cache: EncoderCache) -> dict:
    """An MM arena's blocks: used by requests, idle in the cache (evicted when needed), total."""
    s = cache.stats()
    return {"used": s["in_use_blocks"], "cached": s["idle_blocks"], "total": s["total_blocks"]}


def _pixel_cache(config: EngineConfig) -> PixelCache | None:
    return PixelCache(config.pixel_cache_bytes) if config.pixel_cache_bytes else None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _same_device(handle, device: torch.device) -> bool:
    """The arena behind `handle` lives on `device`: readable in place (CUDA IPC on one GPU, or
    the same shared-memory file on the CPU)."""
    if device.type == "cpu":
        return handle.device == "cpu"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return handle.device == f"cuda:{index}"


class _Role:
    """What every role has: its spec, config, checkpoint config, device, outbox."""

    busy = False

    def __init__(self, spec: RoleSpec, send: Send) -> None:
        self.spec, self.config, self.send, self.name = spec, spec.config, send, spec.name
        self.cfg = ModelConfig.from_dir(self.config.model)
        self.device, self.dtype = torch.device(self.config.device), self.config.torch_dtype
        self.draining = False
        # the orchestrator's byte arena (image bytes), mapped now: the file goes once all are ready
        self.byte_arena = ByteArena.open(spec.image_bytes) if spec.image_bytes is not None and (
            spec.kind == "encode" or spec.encodes) else None

    def base_stats(self, runner: ModelRunner) -> dict:
        return {"pid": os.getpid(), "device": str(self.device), "backend": runner.backend,
                "torch_threads": torch.get_num_threads()}

    def kv_stats(self, runner: ModelRunner, own: int) -> dict:
        """The role's KV cache for its Ready message: `own` blocks of the runner's arena."""
        return {"kv_cache_blocks": own, "kv_cache_tokens": own * runner.block_size,
                "kv_cache_gb": _gb(runner.kv_arena, own)}

    def kv_blocks_to_own(self, mm_arena: torch.Tensor, share: float) -> int:
        """config.kv_cache_tokens' blocks, or `share` of what the GPU has left now."""
        blocks = self.config.num_kv_blocks()
        if blocks is None:
            blocks = kv_blocks_from_memory(self.config, self.cfg, self.model, mm_arena, share)
        return blocks

    def image_sources(self, req_id: int, images: list, keys: list[str], items: list[tuple[int, int]]) -> list | None:
        """A task's images with those sent through the orchestrator's byte arena read out (a
        copy: the span is reused once the orchestrator frees it). A request aborted meanwhile may
        have had its span rewritten: with keys, an image whose bytes no longer hash to its key
        fails the task (None; nothing is cached from it); without, the stale result is dropped by
        the orchestrator, whose request is gone."""
        if not any(isinstance(x, ByteRef) for x in images):
            return images
        out = [self.byte_arena.read(x) if isinstance(x, ByteRef) else x for x in images]
        for (image, _), key in zip(items, keys):
            if isinstance(images[image], ByteRef) and image_key(out[image]) != key.rpartition(":")[0]:
                self.send(Failed(req_id, self.name, "image bytes changed before they were read (request aborted?)",
                                 images=len(items)))
                return None
        return out

    def drain(self) -> None:
        """Take no new work (new tasks fail with "draining"); what is in hand runs to its end."""
        self.draining = True

    def refuse(self, req_id: int, images: int = 0) -> None:
        self.send(Failed(req_id, self.name, f"{self.name} is draining and takes no new requests", images=images))

    def close(self) -> None:
        pass


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


class PrefillRole(_Role):
    """Prefill prompts into this worker's KV arena; image embeddings read from the encoders'
    arenas (in place on the same device) or, in pd mode, encoded here."""

    def __init__(self, spec: RoleSpec, send: Send) -> None:
        super().__init__(spec, send)
        config, cfg = self.config, self.cfg
        # epd: the LM only (embeddings come from the encoders); pd: the whole model
        self.model = load_weights(config, cfg, "all" if spec.encodes else "lm")
        # own MM blocks: images encoded here (pd), or copied from an encoder on another device
        self.mm_arena = torch.empty(mm_arena_shape(config, cfg), dtype=self.dtype, device=self.device)
        self.mm_blocks = BlockManager(self.mm_arena.shape[0])
        self.mm_cache = EncoderCache(self.mm_blocks, enabled=config.mm_cache and spec.encodes)  # pd: its encodes
        self.image_processor = stage_image_processor(config, cfg) if spec.encodes else None
        self.pixel_cache = _pixel_cache(config) if spec.encodes else None
        self.arena: SharedArena | None = None
        self.runner: ModelRunner | None = None
        self.peers: list[SharedArena] = []
        self.tasks: dict[int, PrefillTask] = {}
        self.stalled = False  # the first waiting prompt needs blocks that only a FreeKV returns
        send(Loaded(self.name, kv_owner=True))

    def handle(self, msg: object) -> None:
        if isinstance(msg, SizeKV):
            self._size(msg)
        elif isinstance(msg, Peers):
            self._map_peers(msg)
        elif isinstance(msg, FreeKV):
            self.kv_blocks.free(msg.blocks)
            self.stalled = False
        elif isinstance(msg, PrefillTask):
            if self.draining:
                self._free_encoder_blocks(msg)
                self.refuse(msg.req_id)
                return
            if msg.images:  # pd: read the bytes now (the orchestrator frees them once this request ends)
                items = all_items(self.cfg, msg.image_sizes)
                msg.images = self.image_sources(msg.req_id, msg.images, msg.item_keys, items)
                if msg.images is None:
                    return
            self.tasks[msg.req_id] = msg
            self.sched.add(Sequence(seq_id=msg.req_id, prompt_ids=msg.prompt_ids, sampling=msg.sampling,
                                    seed=msg.seed, stop_token_ids=frozenset(), image_sizes=list(msg.image_sizes)))
            self.stalled = False

    def _size(self, msg: SizeKV) -> None:
        """Make the KV arena (its blocks, and decode's after them when decode shares it), export it."""
        blocks = self.kv_blocks_to_own(self.mm_arena, msg.share)
        if msg.for_decode:  # a configured size is per stage; a measured budget is split in half
            measured = self.config.num_kv_blocks() is None
            own, extra = (blocks - blocks // 2, blocks // 2) if measured else (blocks, blocks)
        else:
            own, extra = blocks, 0
        shape = (own + extra, *kv_block_shape(self.config, self.cfg))
        self.arena = SharedArena.create(shape, self.dtype, self.device, f"kv-prefill{self.spec.index}")
        self.kv_blocks = BlockManager(own)
        self.sched = PrefillScheduler(self.kv_blocks, self.config.block_size, self.config.max_num_batched_tokens)
        self.extra = extra
        self.send(Sized(self.name, own))
        self.send(Exported(self.name, self.arena.handle))

    def _map_peers(self, msg: Peers) -> None:
        self.peers = [SharedArena.open(h, self.device) for h in msg.handles]
        self.in_place = [_same_device(h, self.device) for h in msg.handles]
        self.runner = ModelRunner(self.config, self.cfg, self.model, self.arena.tensor, self.mm_arena,
                                  mm_peers=[p.tensor if here else None for p, here in zip(self.peers, self.in_place)])
        mm = self.mm_arena
        self.send(Ready(self.name, {
            **self.base_stats(self.runner), **self.kv_stats(self.runner, self.kv_blocks.num_blocks),
            "kv_blocks_for_decode": self.extra, "mm_arena_blocks": mm.shape[0], "mm_arena_gb": _gb(mm),
            "mm_in_place_from": [i for i, here in enumerate(self.in_place) if here]}))

    @property
    def busy(self) -> bool:
        return self.runner is not None and bool(self.sched.waiting) and not self.stalled

    def step(self) -> None:
        batch = self.sched.schedule(max_seqs=self.config.max_num_seqs)
        if not batch:
            self.stalled = True  # wait for FreeKV acks from decode
            return
        ready, mm, in_place = [], {}, []
        for seq in batch:
            task = self.tasks.pop(seq.seq_id)
            try:
                start = time.perf_counter()
                nbytes = self._stage_images(seq, task)
                mm[seq.seq_id] = (nbytes, time.perf_counter() - start if nbytes else 0.0)
                ready.append(seq)
                if seq.mm_peer_blocks:
                    in_place.append(task)
            except Exception as e:  # fails this request only
                self._release(seq)
                self.send(Failed(seq.seq_id, self.name, str(e)))
        if not ready:
            return
        try:
            tokens = self.runner.prefill(ready).token_ids  # synchronised: the embeddings were read
        finally:
            for task in in_place:
                self._free_encoder_blocks(task)
        for seq, token in zip(ready, tokens):
            if seq.mm_blocks:
                self.mm_blocks.free(seq.mm_blocks)
                seq.mm_blocks = []
            seq.mm_peer_blocks = []
            seq.status = Status.FINISHED  # the KV blocks now belong to the hand-off
            self.send(Prefilled(seq.seq_id, token, self.spec.index, seq.block_table, *mm[seq.seq_id]))

    def _stage_images(self, seq: Sequence, task: PrefillTask) -> int:
        """Make the request's image embeddings readable by the prefill: encode them here (pd),
        read them in place in the encoders' arenas on this device, or copy them into own MM
        blocks from an encoder on another device. Encoder blocks copied (or failed) are freed
        here; those read in place after the prefill. Returns the bytes copied."""
        count = len(task.mm_refs) or sum(self.cfg.image_layout(h, w).num_items for h, w in task.image_sizes)
        if not count:
            return 0
        if task.mm_refs and all(self.in_place[e] for e, _ in task.mm_refs):
            seq.mm_peer_blocks = list(task.mm_refs)
            return 0
        try:
            if task.images:  # pd: encoded here, through this prefill's own encoder cache
                items = all_items(self.cfg, task.image_sizes)
                blocks = acquire_and_encode(self.mm_cache, self.runner, task.item_keys, len(items), lambda misses: (
                    item_pixels(self.image_processor, self.cfg, self.pixel_cache, task.images,
                                [items[m] for m in misses], task.image_sizes,
                                [task.item_keys[m] for m in misses] if task.item_keys else [])))
            else:
                blocks = self.mm_cache.allocate(count)
            if blocks is None:
                raise RuntimeError(f"prefill MM staging arena is full ({count} items)")
            seq.mm_blocks = blocks
            if task.images:
                return 0
            for local, (encoder, block) in zip(blocks, task.mm_refs):
                self.mm_arena[local].copy_(self.peers[encoder].tensor[block], non_blocking=True)
            _synchronize(self.device)  # the encoders may overwrite these blocks once freed
            return count * self.mm_arena[0].numel() * self.mm_arena.element_size()
        finally:
            self._free_encoder_blocks(task)

    def _free_encoder_blocks(self, task: PrefillTask) -> None:
        """The task owns its embeddings: the encoders get their blocks back (FreeMM) once."""
        by_encoder: dict[int, list[int]] = {}
        for encoder, block in task.mm_refs:
            by_encoder.setdefault(encoder, []).append(block)
        task.mm_refs = []
        for encoder, freed in by_encoder.items():
            self.send(FreeMM(freed, encoder))

    def _release(self, seq: Sequence) -> None:
        if seq.block_table:
            self.kv_blocks.free(seq.block_table)
            seq.block_table = []
        if seq.mm_blocks:
            self.mm_blocks.free(seq.mm_blocks)
            seq.mm_blocks = []
        seq.status = Status.FINISHED

    def stats(self) -> dict:
        if self.runner is None:
            return {}
        pixels = self.pixel_cache.stats() if self.pixel_cache else {}
        cache = {"mm_cache": {**self.mm_cache.stats(), **pixels}} if self.spec.encodes else {}
        return {"waiting": len(self.sched.waiting), "kv_blocks": _blocks(self.kv_blocks),
                "mm_blocks": _mm_blocks(self.mm_cache), **cache}

    def close(self) -> None:
        for peer in self.peers:
            peer.close()
        if self.arena is not None:
            self.arena.close()
        if self.byte_arena is not None:
            self.byte_arena.close()


class DecodeRole(_Role):
    """Take over prefilled requests and run continuous-batching decode (multi_step steps per
    call, as the aggregated engine). shared: the prompt's KV blocks are read in place in
    prefill0's arena (decode owns the blocks after prefill's); otherwise they are pulled from
    the prefill instance's arena into this worker's and acknowledged at once."""

    def __init__(self, spec: RoleSpec, send: Send) -> None:
        super().__init__(spec, send)
        self.model = load_weights(self.config, self.cfg, "lm")
        # decode reads no images: an empty MM arena, for sizing and for its runner
        self.no_mm = torch.empty(mm_arena_shape(self.config, self.cfg, 0), dtype=self.dtype, device=self.device)
        self.kv_arena: torch.Tensor | None = None
        self.engine: AggregatedEngine | None = None
        self.srcs: list[SharedArena] = []
        self.live: dict[int, Sequence] = {}
        self.borrowed: dict[int, list[int]] = {}  # shared arena: prefill's blocks each request reads in place
        self.pending: deque[DecodeTask] = deque()
        self.stalled = False  # the first pending task needs blocks that only a finishing request returns
        self.graphs: list[int] = []
        send(Loaded(self.name, kv_owner=not spec.shared))

    def handle(self, msg: object) -> None:
        if isinstance(msg, SizeKV):
            blocks = self.kv_blocks_to_own(self.no_mm, msg.share)
            self.kv_arena = torch.zeros(blocks, *kv_block_shape(self.config, self.cfg), dtype=self.dtype,
                                        device=self.device)
            self.send(Sized(self.name, blocks))
        elif isinstance(msg, Peers):
            self._start(msg)
        elif isinstance(msg, Abort):
            self._abort(msg.req_id)
            self.stalled = False
        elif isinstance(msg, DecodeTask):
            if self.draining:
                self.send(FreeKV(msg.kv_blocks, msg.prefill))
                self.refuse(msg.req_id)
            else:
                self.pending.append(msg)

    def _start(self, msg: Peers) -> None:
        self.srcs = [SharedArena.open(h, self.device) for h in msg.handles]  # mapped once, kept
        first = 0
        if self.spec.shared:  # one arena: prefill0's blocks first, then this role's
            self.kv_arena, first = self.srcs[0].tensor, msg.kv_owned[0]
        pool = BlockManager(self.kv_arena.shape[0] - first, first=first)
        runner = ModelRunner(self.config, self.cfg, self.model, self.kv_arena, self.no_mm)
        start = time.perf_counter()
        if self.config.cuda_graphs and runner.backend == "cuda":
            runner.capture_graphs()  # after the arena is final: graphs bake in its address
        self.graphs = sorted(runner.decode_graphs.graphs) if runner.decode_graphs else []
        self.engine = AggregatedEngine(runner, self.config, kv_blocks=pool)
        self.send(Ready(self.name, {
            **self.base_stats(runner), **self.kv_stats(runner, pool.num_blocks),
            "kv_arena_of": "prefill0" if self.spec.shared else None, "multi_step": self.config.multi_step,
            "graph_buckets": self.graphs, "graph_capture_s": round(time.perf_counter() - start, 2)}))

    @property
    def busy(self) -> bool:
        return self.engine is not None and (self.engine.has_work() or (bool(self.pending) and not self.stalled))

    def _finish(self, seq: Sequence) -> None:
        lent = self.borrowed.pop(seq.seq_id, [])
        seq.block_table = seq.block_table[len(lent):]  # ours go back to our pool, prefill's to prefill
        self.engine.finish(seq)
        if lent:
            self.send(FreeKV(lent, 0))

    def _abort(self, req_id: int) -> None:
        if req_id in self.live:
            self._finish(self.live.pop(req_id))
            return
        for task in self.pending:  # not started yet: its KV blocks go straight back to prefill
            if task.req_id == req_id:
                self.pending.remove(task)
                self.send(FreeKV(task.kv_blocks, task.prefill))
                return

    def _admit(self) -> None:
        engine, runner, shared = self.engine, self.engine.runner, self.spec.shared
        while self.pending:
            task = self.pending[0]
            # Reserve for the whole answer: a decode stage never preempts (it could not
            # recompute a prompt whose image embeddings stayed with the encoders).
            need = blocks_for(len(task.prompt_ids) + task.sampling.max_tokens, runner.block_size)
            blocks = engine.kv_blocks.allocate(need - len(task.kv_blocks) if shared else need)
            if blocks is None:
                self.stalled = not engine.has_work()  # else a finishing request frees blocks
                return
            self.pending.popleft()
            if shared:
                self.borrowed[task.req_id] = task.kv_blocks
                blocks = task.kv_blocks + blocks
            else:
                start = time.perf_counter()
                nbytes = pull_blocks(self.srcs[task.prefill].tensor, task.kv_blocks, runner.kv_arena,
                                     blocks[: len(task.kv_blocks)])
                _synchronize(self.device)
                self.send(Migrated(task.req_id, nbytes, time.perf_counter() - start))
                self.send(FreeKV(task.kv_blocks, task.prefill))  # acked: prefill may reuse them
            seq = Sequence(seq_id=task.req_id, prompt_ids=task.prompt_ids, sampling=task.sampling,
                           seed=task.seed, stop_token_ids=task.stop_token_ids, block_table=blocks)
            seq.num_cached, seq.status = len(task.prompt_ids), Status.RUNNING
            self.live[seq.seq_id] = seq
            seq.append_tokens([task.first_token])  # the one token path (the orchestrator runs it too)
            if seq.finish_reason:
                self._finish(self.live.pop(seq.seq_id))
                continue
            engine.decode.add(seq)

    def step(self) -> None:
        self._admit()
        if not self.engine.has_work():
            return
        req_ids, token_ids = [], []
        for kept in append_step(self.engine.step()):  # tokens past a stop (multi-step decode) are dropped
            req_ids.append(kept.seq.seq_id)
            token_ids.append(kept.token)
            if kept.finish_reason:
                self._finish(self.live.pop(kept.seq.seq_id))
        if req_ids:
            self.send(Tokens(req_ids, token_ids))

    def stats(self) -> dict:
        if self.engine is None:
            return {}
        return {"running": len(self.engine.decode.running), "waiting": len(self.pending),
                "kv_blocks": _blocks(self.engine.kv_blocks), "decode_graphs": self.graphs}

    def close(self) -> None:
        for src in self.srcs:
            src.close()
