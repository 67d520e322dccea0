"""The prefill role: prompts into this worker's KV arena; image embeddings read from the encoders
(or encoded here, in pd mode)."""

from __future__ import annotations

import os
import time

import torch

from engine.block_manager import BlockManager
from engine.images_anyres import all_items
from engine.messages import (
    EncoderDraining,
    Exported,
    Failed,
    FreeKV,
    FreeMM,
    Loaded,
    PeerArena,
    Peers,
    Prefilled,
    PrefillTask,
    Ready,
    SendWeights,
    ServeArena,
    Sized,
    SizeKV,
)
from engine.mm_cache import EncoderCache, acquire_and_encode, item_pixels
from engine.preprocess import stage_image_processor
from engine.request import Sequence, Status
from engine.roles.base import (
    RoleSpec,
    Send,
    _blocks,
    _gb,
    _mm_blocks,
    _pixel_cache,
    _Role,
    _same_device,
    _synchronize,
    open_peer_arena,
)
from engine.runner import ModelRunner, kv_block_shape, mm_arena_shape
from engine.schedulers import PrefillScheduler
from ipc.arena import SharedArena
from ipc.busy_board import BusyBoard
from ipc.linked_arena import LinkedArena

MAX_DEFER_S = 0.25  # encode_first: the longest a prefill batch waits for the encoders on its device
# layers between a large batch's looks at the busy board (EPD_YIELD_EVERY=0: never, for A/B runs)
YIELD_EVERY = int(os.environ.get("EPD_YIELD_EVERY", 4))
YIELD_MIN_TOKENS = 1024  # a batch of fewer tokens (~25 ms on an H200) does not yield inside


class _LayerYield:
    """encode_first inside a prefill batch (the runner calls it as each layer is launched): every
    YIELD_EVERY layers the CPU lets the GPU come to within one such chunk of it (an event), so
    that when an encoder on this device has work the prefill can stop launching, let its queued
    chunk finish and sleep while the encoder is busy - within what is left of the batch's
    MAX_DEFER_S. Without it an encoder's batch time-slices against the whole prefill batch
    (~0.2 s at 8192 tokens on an H200) whenever the prefill started while the encoders were idle."""

    def __init__(self, board: BusyBoard, device: torch.device, budget_s: float) -> None:
        self.board, self.device, self.budget_s = board, device, budget_s
        self.waited, self.yields = 0.0, 0
        self.behind: torch.cuda.Event | None = None  # the end of the chunk before the last

    def __call__(self, layer: int) -> None:
        if YIELD_EVERY <= 0 or (layer + 1) % YIELD_EVERY:
            return
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
            if self.behind is not None:
                self.behind.synchronize()
            self.behind = event
        if self.waited >= self.budget_s or not self.board.busy_on(self.device):
            return
        start = time.monotonic()
        if self.behind is not None:
            self.behind.synchronize()  # nothing of this batch is left on the GPU
        while self.board.busy_on(self.device) and self.waited + time.monotonic() - start < self.budget_s:
            time.sleep(0.0005)
        self.waited += time.monotonic() - start
        self.yields += 1


class PrefillRole(_Role):
    """Prefill prompts into this worker's KV arena; image embeddings read from the encoders'
    arenas (in place on the same device) or, in pd mode, encoded here."""

    def __init__(self, spec: RoleSpec, send: Send) -> None:
        super().__init__(spec, send)
        config, cfg = self.config, self.cfg
        # epd: the LM only (embeddings come from the encoders); pd: the whole model
        self.model = self.load_model("all" if spec.encodes else "lm")
        # own MM blocks: images encoded here (pd), or copied from an encoder on another device
        self.mm_arena = torch.empty(mm_arena_shape(config, cfg), dtype=self.dtype, device=self.device)
        self.mm_blocks = BlockManager(self.mm_arena.shape[0])
        self.mm_cache = EncoderCache(self.mm_blocks, enabled=config.mm_cache and spec.encodes)  # pd: its encodes
        self.image_processor = stage_image_processor(config, cfg) if spec.encodes else None
        self.pixel_cache = _pixel_cache(config, self.image_processor) if spec.encodes else None
        self.arena: SharedArena | None = None
        self.runner: ModelRunner | None = None
        self.peers: list[SharedArena | LinkedArena | None] = []  # the encoders' MM arenas
        self.tasks: dict[int, PrefillTask] = {}
        self.draining_encoders: set[int] = set()  # their embeddings are copied out as tasks come (EncoderDraining)
        self.staged: dict[int, tuple[list[int], int] | str] = {}  # req_id: own MM blocks copied into, bytes; or why not
        self.stalled = False  # the first waiting prompt needs blocks that only a FreeKV returns
        self.board = (BusyBoard.open(spec.busy_board) if spec.busy_board is not None and config.encode_first
                      and not spec.encodes else None)
        self.deferred_since: float | None = None  # when this batch began to wait for the encoders
        self.deferred_s = 0.0  # in all (before batches and inside them)
        self.batch_waited = 0.0  # what the batch being run waited before it began
        self.yields = 0  # times a batch stopped at a layer for an encoder
        send(Loaded(self.name, kv_owner=True, weights=self.packed_weights))

    def handle(self, msg: object) -> None:
        if isinstance(msg, SendWeights):
            self.send_weights(msg)
            return
        if isinstance(msg, ServeArena):  # a decode on another host pulls KV blocks from this arena over a link
            self.serve_arena(msg, self.arena.tensor)
        elif isinstance(msg, SizeKV):
            self._size(msg)
        elif isinstance(msg, Peers):
            self._map_peers(msg)
        elif isinstance(msg, PeerArena):
            self._map_encoder(msg.index, msg.handle)
            if msg.handle is None:
                self.draining_encoders.discard(msg.index)
        elif isinstance(msg, EncoderDraining):
            self.draining_encoders.add(msg.index)
            self._take_from_draining()
        elif isinstance(msg, FreeKV):
            self.kv_blocks.free(msg.blocks)
            self.stalled = False
        elif isinstance(msg, PrefillTask):
            if self.draining:
                self._free_encoder_blocks(msg)
                self.refuse(msg.req_id)
                return
            if msg.images:  # pd: read the bytes now (the orchestrator frees them once this task is answered)
                msg.images = self.image_sources(msg.images)
            self.tasks[msg.req_id] = msg
            self.sched.add(Sequence(seq_id=msg.req_id, prompt_ids=msg.prompt_ids, sampling=msg.sampling,
                                    seed=msg.seed, stop_token_ids=frozenset(), image_sizes=list(msg.image_sizes)))
            self.stalled = False
            if self.draining_encoders:
                self._take_from_draining()

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
        self.peers, self.in_place = [], []
        for index, handle in enumerate(msg.handles):
            self._map_encoder(index, handle)
        self.runner = ModelRunner(self.config, self.cfg, self.model, self.arena.tensor, self.mm_arena,
                                  mm_peers=[p.tensor if here else None for p, here in zip(self.peers, self.in_place)])
        mm = self.mm_arena
        self.send(Ready(self.name, {
            **self.base_stats(self.runner), **self.kv_stats(self.runner, self.kv_blocks.num_blocks),
            "kv_blocks_for_decode": self.extra, "mm_arena_blocks": mm.shape[0], "mm_arena_gb": _gb(mm),
            "mm_in_place_from": [i for i, here in enumerate(self.in_place) if here],
            "mm_linked_from": [i for i, peer in enumerate(self.peers) if isinstance(peer, LinkedArena)]}))

    def _map_encoder(self, index: int, handle) -> None:
        """Encoder `index`'s MM arena mapped (handle None: an encoder that changed role, unmapped)."""
        while len(self.peers) <= index:
            self.peers.append(None)
            self.in_place.append(False)
        if self.peers[index] is not None:
            self.peers[index].close()
        self.peers[index] = open_peer_arena(handle, self.device) if handle is not None else None
        self.in_place[index] = handle is not None and _same_device(handle, self.device)
        if self.runner is not None:
            mm = self.runner.mm_peers
            mm.extend([None] * (index + 1 - len(mm)))
            mm[index] = self.peers[index].tensor if self.in_place[index] else None

    @property
    def drained(self) -> bool:  # and decode has given back every KV block it pulled or read
        blocks = getattr(self, "kv_blocks", None)
        return not self.busy and not self.tasks and (blocks is None or blocks.num_free == blocks.num_blocks)

    @property
    def busy(self) -> bool:
        return self.runner is not None and bool(self.sched.waiting) and not self.stalled

    def _defer(self) -> bool:
        """encode_first: True while an encoder on this device has work in hand and this batch has
        waited less than MAX_DEFER_S (it sleeps 0.5 ms: the worker polls its inbox in between).
        It cannot starve: an encoder whose MM arena is full of embeddings waiting for this prefill
        has nothing it can run, so it is not busy."""
        now = time.monotonic()
        waited = now - self.deferred_since if self.deferred_since is not None else 0.0
        if self.board is None or waited >= MAX_DEFER_S or not self.board.busy_on(self.device):
            self.deferred_since = None
            self.deferred_s += waited
            self.batch_waited = waited
            return False
        if self.deferred_since is None:
            self.deferred_since = now
        time.sleep(0.0005)
        return True

    def _take_from_draining(self) -> None:
        """Copy the embeddings that queued tasks hold in draining encoders' arenas into own MM
        blocks (FCFS, as many tasks as those blocks take; the rest when a prefill frees some),
        and free them there: the encoders can close without waiting for these prefills."""
        if self.runner is None:
            return
        for task in list(self.tasks.values()):
            if task.req_id in self.staged or not any(e in self.draining_encoders for e, _ in task.mm_refs):
                continue
            blocks = self.mm_cache.allocate(len(task.mm_refs))
            if blocks is None:
                return
            try:
                self.staged[task.req_id] = (blocks, self._copy_in(task, blocks))
            except Exception as e:  # the request fails when it is scheduled (its refs are gone)
                self.mm_blocks.free(blocks)
                self.staged[task.req_id] = f"copying its embeddings from a draining encoder failed: {e}"

    def step(self) -> None:
        if self.draining_encoders:
            self._take_from_draining()  # own MM blocks freed by the last batch take more
        if self._defer():
            return
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
        started = time.perf_counter()
        after_layer = None
        if self.board is not None and sum(s.num_tokens - s.num_cached for s in ready) >= YIELD_MIN_TOKENS:
            after_layer = _LayerYield(self.board, self.device, MAX_DEFER_S - self.batch_waited)
        try:
            tokens = self.runner.prefill(ready, after_layer=after_layer).token_ids  # synchronised: embeddings read
        finally:
            if after_layer is not None:
                self.deferred_s += after_layer.waited
                self.yields += after_layer.yields
            for task in in_place:
                self._free_encoder_blocks(task)
        ended = time.perf_counter()
        for seq, token in zip(ready, tokens):
            if seq.mm_blocks:
                self.mm_blocks.free(seq.mm_blocks)
                seq.mm_blocks = []
            seq.mm_peer_blocks = []
            seq.status = Status.FINISHED  # the KV blocks now belong to the hand-off
            self.send(Prefilled(seq.seq_id, token, self.spec.index, seq.block_table, *mm[seq.seq_id],
                                times=(started, ended)))

    def _stage_images(self, seq: Sequence, task: PrefillTask) -> int:
        """Make the request's image embeddings readable by the prefill: encode them here (pd),
        read them in place in the encoders' arenas on this device, or copy them into own MM
        blocks from an encoder on another device. Encoder blocks copied (or failed) are freed
        here; those read in place after the prefill. Returns the bytes copied."""
        if task.req_id in self.staged:  # copied in while its encoder drained
            staged = self.staged.pop(task.req_id)
            if isinstance(staged, str):
                raise RuntimeError(staged)
            seq.mm_blocks, nbytes = staged
            return nbytes
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
            return 0 if task.images else self._copy_in(task, blocks)
        finally:
            self._free_encoder_blocks(task)

    def _copy_in(self, task: PrefillTask, blocks: list[int]) -> int:
        """Copy the task's embeddings from the encoders' arenas into own MM blocks `blocks` (one
        per item, in order), synchronized, and free them there. Returns the bytes copied."""
        try:
            for encoder in sorted({e for e, _ in task.mm_refs}):
                pairs = [(local, block) for local, (e, block) in zip(blocks, task.mm_refs) if e == encoder]
                peer = self.peers[encoder]
                if isinstance(peer, LinkedArena):  # an encoder on another host: pulled over the link
                    peer.pull([b for _, b in pairs], self.mm_arena, [local for local, _ in pairs])
                    continue
                for local, block in pairs:
                    self.mm_arena[local].copy_(peer.tensor[block], non_blocking=True)
            _synchronize(self.device)  # the encoders may overwrite these blocks once freed
            return len(blocks) * self.mm_arena[0].numel() * self.mm_arena.element_size()
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
                "mm_blocks": _mm_blocks(self.mm_cache), "encode_first_wait_s": round(self.deferred_s, 3),
                "encode_first_yields": self.yields, **cache, **self.served()}

    def close(self) -> None:
        if self.board is not None:
            self.board.close()
        for peer in self.peers:
            if peer is not None:
                peer.close()
        if self.arena is not None:
            self.arena.close()
        if self.byte_arena is not None:
            self.byte_arena.close()
        super().close()
