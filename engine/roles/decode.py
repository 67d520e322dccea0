"""The decode role: prefilled requests' KV taken over, continuous-batching decode, tokens out."""

from __future__ import annotations

import time
from collections import deque

import torch

from engine.aggregated import AggregatedEngine
from engine.block_manager import BlockManager
from engine.messages import (
    Abort,
    DecodeTask,
    Exported,
    Failed,
    FreeKV,
    HandedOver,
    Loaded,
    Migrated,
    PeerArena,
    Peers,
    Ready,
    SendWeights,
    Sized,
    SizeKV,
    Tokens,
)
from engine.request import Sequence, Status, append_step
from engine.roles.base import RoleSpec, Send, _blocks, _Role, _synchronize, open_peer_arena
from engine.runner import ModelRunner, kv_block_shape, mm_arena_shape
from engine.schedulers import blocks_for
from ipc.arena import SharedArena
from ipc.linked_arena import LinkedArena
from ipc.migration import pull_blocks


def _pull(src: SharedArena | LinkedArena, src_ids: list[int], dst: torch.Tensor, dst_ids: list[int]) -> int:
    """dst[dst_ids] = src's blocks src_ids: peer copies from a mapped arena, or over the link
    from a prefill on another host. Returns the bytes moved."""
    if isinstance(src, LinkedArena):
        return src.pull(src_ids, dst, dst_ids)
    return pull_blocks(src.tensor, src_ids, dst, dst_ids)


class DecodeRole(_Role):
    """Take over prefilled requests and run continuous-batching decode (multi_step steps per
    call, as the aggregated engine). shared: the prompt's KV blocks are read in place in
    prefill0's arena (decode owns the blocks after prefill's); otherwise they are pulled from
    the prefill instance's arena into this worker's and acknowledged at once."""

    def __init__(self, spec: RoleSpec, send: Send) -> None:
        super().__init__(spec, send)
        self.model = self.load_model("lm")
        # decode reads no images: an empty MM arena, for sizing and for its runner
        self.no_mm = torch.empty(mm_arena_shape(self.config, self.cfg, 0), dtype=self.dtype, device=self.device)
        self.kv_arena: torch.Tensor | None = None
        self.engine: AggregatedEngine | None = None
        self.srcs: list[SharedArena | LinkedArena | None] = []  # the prefill instances' KV arenas
        self.live: dict[int, Sequence] = {}
        self.borrowed: dict[int, list[int]] = {}  # shared arena: prefill's blocks each request reads in place
        self.pending: deque[DecodeTask] = deque()
        self.stalled = False  # the first pending task needs blocks that only a finishing request returns
        self.graphs: list[int] = []
        self.own_arena: SharedArena | None = None
        self.arena_handle = None  # where this role's blocks are: its own arena or prefill0's
        self.lent: dict[tuple, tuple[int, list[int]]] = {}  # handed over: KV sent -> (request, its blocks)
        self.mapped: dict[object, SharedArena] = {}  # other decodes' arenas, mapped for handed-over requests
        send(Loaded(self.name, kv_owner=not spec.shared, weights=self.packed_weights))

    def handle(self, msg: object) -> None:
        if isinstance(msg, SendWeights):
            self.send_weights(msg)
            return
        if isinstance(msg, SizeKV):
            blocks = self.kv_blocks_to_own(self.no_mm, msg.share)
            # shared: a decode that changes role hands its requests over from this arena
            self.own_arena = SharedArena.create((blocks, *kv_block_shape(self.config, self.cfg)), self.dtype,
                                                self.device, f"kv-decode{self.spec.index}")
            self.kv_arena = self.own_arena.tensor
            self.send(Sized(self.name, blocks))
            self.send(Exported(self.name, self.own_arena.handle))  # the orchestrator removes its file if it is killed
        elif isinstance(msg, Peers):
            self._start(msg)
        elif isinstance(msg, PeerArena):  # a prefill instance that came or went by a role switch
            self.srcs.extend([None] * (msg.index + 1 - len(self.srcs)))
            if self.srcs[msg.index] is not None:
                self.srcs[msg.index].close()
            self.srcs[msg.index] = open_peer_arena(msg.handle, self.device) if msg.handle is not None else None
        elif isinstance(msg, FreeKV) and msg.decode is not None:  # a handed-over request's blocks: pulled
            req_id, blocks = self.lent.pop(tuple(msg.blocks))
            lent = self.borrowed.pop(req_id, [])  # shared arena: prefill's blocks go back to prefill
            self.engine.kv_blocks.free(blocks[len(lent):])
            if lent:
                self.send(FreeKV(lent, 0))
        elif isinstance(msg, Abort):
            self._abort(msg.req_id)
            self.stalled = False
        elif isinstance(msg, DecodeTask):
            if self.draining:
                self.send(FreeKV(msg.kv_blocks, msg.prefill, decode=msg.src_decode))
                self.refuse(msg.req_id)
            else:
                self.pending.append(msg)

    def _start(self, msg: Peers) -> None:
        self.srcs = [open_peer_arena(h, self.device) if h is not None else None for h in msg.handles]  # kept
        first = 0
        self.arena_handle = self.own_arena.handle if self.own_arena is not None else None
        if self.spec.shared:  # one arena: prefill0's blocks first, then this role's
            self.kv_arena, first = self.srcs[0].tensor, msg.kv_owned[0]
            self.arena_handle = msg.handles[0]
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
            "kv_linked_from": [i for i, src in enumerate(self.srcs) if isinstance(src, LinkedArena)],
            "graph_buckets": self.graphs, "graph_capture_s": round(time.perf_counter() - start, 2)}))

    @property
    def drained(self) -> bool:
        return not self.busy and not self.live and not self.pending and not self.lent

    def hand_over(self) -> None:
        """For a role switch: give every request up (HandedOver: the orchestrator sends it to
        another decode, which pulls its KV from this arena and acks), taking no new ones."""
        self.drain()
        for task in list(self.pending):  # not started: as it came (its KV is still prefill's)
            self.send(HandedOver(task))
        self.pending.clear()
        for req_id, seq in list(self.live.items()):
            if seq in self.engine.decode.running:
                self.engine.decode.running.remove(seq)  # out of the batch; its blocks stay until the ack
            del self.live[req_id]
            kv = seq.block_table[: blocks_for(seq.num_cached, self.engine.runner.block_size)]  # the KV written
            self.lent[tuple(kv)] = (req_id, seq.block_table)
            tokens = seq.output_ids
            self.send(HandedOver(DecodeTask(req_id, seq.prompt_ids, tokens[0], 0, kv, seq.sampling, seq.seed,
                                            seq.stop_token_ids, more_tokens=tokens[1:], src_decode=self.spec.index,
                                            src_arena=self.arena_handle, num_cached=seq.num_cached)))

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
                self.send(FreeKV(task.kv_blocks, task.prefill, decode=task.src_decode))
                return

    def _admit(self) -> None:
        engine, runner, shared = self.engine, self.engine.runner, self.spec.shared
        while self.pending and engine.decode.free_slots > 0:  # max_num_seqs: the graphs' largest batch
            task = self.pending[0]
            # Reserve for the whole answer: a decode stage never preempts (it could not
            # recompute a prompt whose image embeddings stayed with the encoders).
            need = blocks_for(len(task.prompt_ids) + task.sampling.max_tokens, runner.block_size)
            # in place: prefill0's blocks of the arena this role shares (a prefill added by a role
            # switch has an arena of its own: its blocks are pulled)
            in_place = shared and task.src_arena is None and task.prefill == 0
            blocks = engine.kv_blocks.allocate(need - len(task.kv_blocks) if in_place else need)
            if blocks is None:
                self.stalled = not engine.has_work()  # else a finishing request frees blocks
                return
            self.pending.popleft()
            if task.src_arena is not None:  # handed over by another decode: pull from its arena, ack there
                if task.src_arena not in self.mapped:
                    self.mapped[task.src_arena] = SharedArena.open(task.src_arena, self.device)
                start = time.perf_counter()
                nbytes = pull_blocks(self.mapped[task.src_arena].tensor, task.kv_blocks, runner.kv_arena,
                                     blocks[: len(task.kv_blocks)])
                _synchronize(self.device)
                self.send(Migrated(task.req_id, nbytes, time.perf_counter() - start))
                self.send(FreeKV(task.kv_blocks, 0, decode=task.src_decode))
            elif in_place:
                self.borrowed[task.req_id] = task.kv_blocks
                blocks = task.kv_blocks + blocks
            else:
                start = time.perf_counter()
                try:
                    nbytes = _pull(self.srcs[task.prefill], task.kv_blocks, runner.kv_arena,
                                   blocks[: len(task.kv_blocks)])
                except RuntimeError as e:  # a link to a prefill on another host broke: this request fails
                    engine.kv_blocks.free(blocks)
                    self.send(FreeKV(task.kv_blocks, task.prefill))  # if that prefill still lives
                    self.send(Failed(task.req_id, self.name, f"KV pull from prefill{task.prefill} failed: {e}"))
                    continue
                _synchronize(self.device)
                self.send(Migrated(task.req_id, nbytes, time.perf_counter() - start))
                self.send(FreeKV(task.kv_blocks, task.prefill))  # acked: prefill may reuse them
            seq = Sequence(seq_id=task.req_id, prompt_ids=task.prompt_ids, sampling=task.sampling,
                           seed=task.seed, stop_token_ids=task.stop_token_ids, block_table=blocks)
            seq.num_cached, seq.status = task.num_cached or len(task.prompt_ids), Status.RUNNING
            self.live[seq.seq_id] = seq
            seq.append_tokens([task.first_token, *task.more_tokens])  # the one token path (the orchestrator's too)
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
        for src in [*self.srcs, *self.mapped.values(), self.own_arena]:
            if src is not None:
                src.close()
        super().close()
