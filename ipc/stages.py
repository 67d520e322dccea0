"""Stage processes for EPD serving: encoders, prefill, decode. Each owns its arena (exported
as a SharedArena handle), reads peers' arenas through handles mapped once, and talks to the
orchestrator only in small picklable messages (ipc/messages.py): request ids, token ids and
block ids. Every pipe has one writer and one reader: each stage has its own inbox (written by
the orchestrator) and outbox (read by it; ipc/channel.py); frees between stages go through the
orchestrator. A stage killed in the middle of a write can then only break its own pipes, which
the orchestrator drops.

    encoder:  EncodeTask -> writes image embeddings into its MM arena -> Encoded
    prefill:  PrefillTask (MM refs) -> copies the embeddings in, frees them (FreeMM, for the
              encoder), prefills into its KV arena -> Prefilled
    decode:   DecodeTask (a prefill instance's KV blocks) -> pulls them, acks (FreeKV, for that
              prefill) -> Tokens (one message per step) ...

All stages start at once and load their weights in parallel; prefill and decode then wait for
the handles of the arenas they map (Peers). One prefill and one decode on one device share one
KV arena (prefill owns the first blocks, decode the rest): decode reads the prompt's blocks in
place and acknowledges them when the request ends, so nothing is copied. Otherwise decode pulls
the blocks (ipc/migration.py) and acknowledges at once. Hand-off copies are timed on the host
around their sync and reported.

A stage dies with its parent (ipc/parent_watch.py), ignores SIGINT, and treats the end of its
inbox (the orchestrator gone) as Shutdown.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from dataclasses import dataclass

import torch

from ipc.messages import (
    Abort,
    Crashed,
    DecodeTask,
    Encoded,
    EncodeTask,
    Exported,
    Failed,
    FreeKV,
    FreeMM,
    Migrated,
    Peers,
    Prefilled,
    PrefillTask,
    Ready,
    Shutdown,
    StageStatus,
    Tokens,
)
from ipc.parent_watch import bind_to_parent


@dataclass
class StageConfig:
    model: str
    backend: str = "torch"
    device: str = "cpu"
    dtype: str = "auto"
    kv_cache_tokens: int | None = None
    max_num_seqs: int = 64
    max_images_per_batch: int = 8
    share_kv_arena: bool = True  # prefill and decode on one device: decode reads KV in place
    # torch's CPU threads per stage; 0: this machine's cores divided among the stage processes.
    # Every process defaulting to all cores made their OpenMP threads wait on each other.
    torch_threads: int = 0


class _Reporter:
    def __init__(self, outbox, stage: str) -> None:
        self.outbox, self.stage, self.last, self.sent = outbox, stage, 0.0, None

    def __call__(self, stats: dict, idle: bool = False) -> None:
        now = time.monotonic()
        if stats != self.sent and (idle or now - self.last >= 0.2):
            self.outbox.send(StageStatus(self.stage, stats))
            self.last, self.sent = now, stats


def _blocks(manager) -> dict:
    return {"used": manager.num_blocks - manager.num_free, "total": manager.num_blocks} if manager else {}


def _receive(inbox, block: bool) -> list:
    """The messages waiting in the inbox (block: wait for the first). The orchestrator gone
    (end of the pipe) reads as Shutdown."""
    msgs: list = []
    try:
        if block:
            msgs.append(inbox.recv())
        while inbox.poll():
            msgs.append(inbox.recv())
    except (EOFError, OSError):
        msgs.append(Shutdown())
    return msgs


def _await_peers(inbox) -> list | None:
    """The peer arena handles the orchestrator sends once every arena exists (None: shut down)."""
    while True:
        for msg in _receive(inbox, block=True):
            if isinstance(msg, Peers):
                return msg.handles
            if isinstance(msg, Shutdown):
                return None


def _gb(tensor: torch.Tensor, rows: int | None = None) -> float:
    """Size in GB of `rows` leading rows of tensor (all by default)."""
    rows = tensor.shape[0] if rows is None else rows
    return round(rows * tensor[0].numel() * tensor.element_size() / 1e9, 4) if tensor.shape[0] else 0.0


def _base_stats(runner) -> dict:
    return {"pid": os.getpid(), "device": str(runner.device), "backend": runner.backend,
            "torch_threads": torch.get_num_threads()}


def _kv_stats(runner, own_blocks: torch.Tensor) -> dict:
    """The stage's KV cache for its Ready message; own_blocks: the arena from its first block."""
    return {"kv_cache_blocks": runner.num_kv_blocks, "kv_cache_tokens": runner.num_kv_blocks * runner.block_size,
            "kv_cache_gb": _gb(own_blocks, runner.num_kv_blocks)}


def stage_summary(name: str, stats: dict) -> str:
    """One line for the start-up log, from a Ready message's stats."""
    threads = stats.get("torch_threads", 0)
    line = (f"stage {name}: pid {stats.get('pid')} on {stats.get('device')} ({stats.get('backend')}, "
            f"{threads} CPU thread{'s' if threads != 1 else ''})")
    if "kv_cache_blocks" in stats:
        line += (f"; KV {stats['kv_cache_blocks']} blocks = {stats['kv_cache_tokens']} tokens, "
                 f"{stats['kv_cache_gb']:g} GB")
        if stats.get("kv_arena_of"):
            line += f" (in {stats['kv_arena_of']}'s arena)"
        elif stats.get("kv_blocks_for_decode"):
            line += f" (+{stats['kv_blocks_for_decode']} blocks of decode's in the same arena)"
    if "mm_arena_blocks" in stats:
        line += f"; MM {stats['mm_arena_blocks']} blocks, {stats['mm_arena_gb']:g} GB"
    if "graph_buckets" in stats:
        buckets = stats["graph_buckets"]
        line += f"; graphs {buckets} in {stats.get('graph_capture_s', 0):.1f} s" if buckets else "; no graphs (eager)"
    return line


# ----------------------------------------------------------------------------- processes


def _llm(cfg: StageConfig, **kw):
    from engine import LLM

    args = dict(backend=cfg.backend, device=cfg.device, dtype=cfg.dtype, kv_cache_tokens=cfg.kv_cache_tokens,
                max_num_seqs=cfg.max_num_seqs, max_images_per_batch=cfg.max_images_per_batch)
    return LLM(cfg.model, **{**args, **kw})


def encoder_main(cfg: StageConfig, index: int, inbox, outbox) -> None:
    """Encode images into this process's MM arena; free blocks when prefill says so."""
    from engine.request import Sequence
    from engine.sampling import SamplingParams
    from ipc.arena import SharedArena

    name = f"encode{index}"
    llm = _llm(cfg, parts="vision")  # the tower + projector only; vision graphs on a GPU
    runner = llm.runner
    arena = SharedArena.create(tuple(runner.mm_arena.shape), runner.dtype, runner.device, f"mm{index}")
    runner.mm_arena = arena.tensor
    graphs = sorted(runner.vision_graphs.graphs) if runner.vision_graphs else []
    outbox.send(Exported(name, arena.handle))
    outbox.send(Ready(name, {**_base_stats(runner), "mm_arena_blocks": arena.tensor.shape[0],
                             "mm_arena_gb": _gb(arena.tensor), "graph_buckets": graphs}))
    pending: list[EncodeTask] = []
    report = _Reporter(outbox, name)
    try:
        while True:
            report({"waiting": len(pending), "mm_blocks": _blocks(llm.engine.mm_blocks), "vision_graphs": graphs},
                   idle=True)
            for msg in _receive(inbox, block=True):
                if isinstance(msg, Shutdown):
                    return
                if isinstance(msg, FreeMM):
                    llm.engine.mm_blocks.free(msg.blocks)
                elif isinstance(msg, EncodeTask):
                    pending.append(msg)
            while pending:  # FCFS; a task waits for MM blocks to be freed
                task = pending[0]
                blocks = llm.engine.mm_blocks.allocate(len(task.images))
                if blocks is None:
                    break
                pending.pop(0)
                try:
                    pixels = llm.image_processor.preprocess(task.images)
                    seq = Sequence(seq_id=task.req_id, prompt_ids=[], sampling=SamplingParams(), seed=0,
                                   stop_token_ids=frozenset(), pixel_values=pixels, mm_blocks=blocks)
                    runner.encode([seq])
                    outbox.send(Encoded(task.req_id, task.part, index, blocks))
                except Exception as e:  # a bad image fails its request, not the stage
                    llm.engine.mm_blocks.free(blocks)
                    outbox.send(Failed(task.req_id, name, str(e), images=len(task.images)))
    finally:
        arena.close()


def prefill_main(cfg: StageConfig, index: int, inbox, outbox, encodes: bool, decode_blocks: int = 0) -> None:
    """Prefill prompts into this process's KV arena, image embeddings pulled from encoders
    (encodes, pd mode: encoded here). decode_blocks > 0: the arena has that many more blocks,
    for a decode stage on this device."""
    from ipc.arena import SharedArena

    name = f"prefill{index}"
    # epd: the LM only (embeddings come from the encoders); pd: the whole model
    llm = _llm(cfg, cuda_graphs=False, parts="all" if encodes else "lm")
    runner = llm.runner
    shape = (runner.num_kv_blocks + decode_blocks, *runner.kv_arena.shape[1:])
    runner.kv_arena = None  # freed (and returned to the driver) before the shared arena is made
    _empty_cache(runner.device)
    arena = SharedArena.create(shape, runner.dtype, runner.device, f"kv-prefill{index}")
    runner.kv_arena = arena.tensor
    mm_arenas: list = []
    try:
        outbox.send(Exported(name, arena.handle))
        mm_handles = _await_peers(inbox)
        if mm_handles is None:
            return
        mm_arenas = [SharedArena.open(h, runner.device) for h in mm_handles]
        mm = runner.mm_arena
        outbox.send(Ready(name, {
            **_base_stats(runner), **_kv_stats(runner, arena.tensor), "kv_blocks_for_decode": decode_blocks,
            "mm_arena_blocks": mm.shape[0], "mm_arena_gb": _gb(mm)}))
        _prefill_loop(cfg, index, llm, mm_arenas, inbox, outbox)
    finally:
        for a in mm_arenas:
            a.close()
        arena.close()


def _prefill_loop(cfg: StageConfig, index: int, llm, mm_arenas: list, inbox, outbox) -> None:
    from engine.request import Sequence, Status

    runner, sched = llm.runner, llm.engine.prefill
    tasks: dict[int, PrefillTask] = {}
    report = _Reporter(outbox, f"prefill{index}")
    while True:
        report({"waiting": len(sched.waiting), "kv_blocks": _blocks(llm.engine.kv_blocks),
                "mm_blocks": _blocks(llm.engine.mm_blocks)}, idle=True)
        for msg in _receive(inbox, block=True):
            if isinstance(msg, Shutdown):
                return
            if isinstance(msg, FreeKV):
                llm.engine.kv_blocks.free(msg.blocks)
            elif isinstance(msg, PrefillTask):
                tasks[msg.req_id] = msg
                sched.add(Sequence(seq_id=msg.req_id, prompt_ids=msg.prompt_ids, sampling=msg.sampling,
                                   seed=msg.seed, stop_token_ids=frozenset()))
        while sched.waiting:
            batch = sched.schedule(max_seqs=cfg.max_num_seqs)
            if not batch:
                break  # wait for FreeKV acks from decode
            ready, mm = [], {}
            for seq in batch:
                try:
                    start = time.perf_counter()
                    nbytes = _stage_images(seq, tasks.pop(seq.seq_id), llm, mm_arenas, outbox)
                    mm[seq.seq_id] = (nbytes, time.perf_counter() - start if nbytes else 0.0)
                    ready.append(seq)
                except Exception as e:  # fails this request only
                    llm.abort(seq)
                    outbox.send(Failed(seq.seq_id, f"prefill{index}", str(e)))
            if not ready:
                continue
            tokens = runner.prefill(ready).token_ids
            for seq, token in zip(ready, tokens):
                if seq.mm_blocks:
                    llm.engine.mm_blocks.free(seq.mm_blocks)
                    seq.mm_blocks = []
                seq.status = Status.FINISHED  # the KV blocks now belong to the hand-off
                outbox.send(Prefilled(seq.seq_id, token, index, seq.block_table, *mm[seq.seq_id]))


def _stage_images(seq, task: PrefillTask, llm, mm_arenas: list, outbox) -> int:
    """Put the request's image embeddings into local MM blocks: encode them here (pd), or copy
    them from the encoders' arenas (epd). The encoders' blocks are freed (FreeMM) whether or not
    this succeeds: the task owns them. Returns the bytes copied."""
    count = len(task.mm_refs) or len(task.images)
    if not count:
        return 0
    try:
        blocks = llm.engine.mm_blocks.allocate(count)
        if blocks is None:
            raise RuntimeError(f"prefill MM staging arena is full ({count} images)")
        seq.mm_blocks = blocks
        if task.images:
            seq.pixel_values = llm.image_processor.preprocess(task.images)
            llm.runner.encode([seq])
            seq.pixel_values = None
            return 0
        for local, (encoder, block) in zip(blocks, task.mm_refs):
            llm.runner.mm_arena[local].copy_(mm_arenas[encoder].tensor[block], non_blocking=True)
        _synchronize(llm.runner.device)  # the encoders may overwrite these blocks once freed
        return count * llm.runner.mm_arena[0].numel() * llm.runner.mm_arena.element_size()
    finally:
        by_encoder: dict[int, list[int]] = {}
        for encoder, block in task.mm_refs:
            by_encoder.setdefault(encoder, []).append(block)
        for encoder, freed in by_encoder.items():
            outbox.send(FreeMM(freed, encoder))


def decode_main(cfg: StageConfig, index: int, inbox, outbox, shared: bool) -> None:
    """Take over prefilled requests and run continuous-batching decode. shared (one prefill, one
    decode, one device): the prompt's KV blocks are read in place in prefill's arena (decode owns
    the blocks after prefill's); otherwise they are pulled from the prefill instance's arena into
    this stage's and acknowledged at once."""
    from ipc.arena import SharedArena

    name = f"decode{index}"
    llm = _llm(cfg, parts="lm", max_images_per_batch=0, cuda_graphs=False)
    runner, engine = llm.runner, llm.engine
    kv_handles = _await_peers(inbox)
    if kv_handles is None:
        return
    srcs = [SharedArena.open(h, runner.device) for h in kv_handles]  # mapped once, kept
    try:
        if shared:  # one arena: prefill's blocks first, then this stage's
            runner.kv_arena = None
            _empty_cache(runner.device)
            runner.kv_arena = srcs[0].tensor
            engine.kv_blocks.rebase(srcs[0].tensor.shape[0] - runner.num_kv_blocks)
        start = time.perf_counter()
        if runner.backend == "cuda":
            runner.capture_graphs()  # after the arena is final: graphs bake in its address
        graphs = sorted(runner.decode_graphs.graphs) if runner.decode_graphs else []
        first = engine.kv_blocks.first
        outbox.send(Ready(name, {
            **_base_stats(runner), **_kv_stats(runner, runner.kv_arena[first:]),
            "kv_arena_of": "prefill0" if shared else None,
            "graph_buckets": graphs, "graph_capture_s": round(time.perf_counter() - start, 2)}))
        _decode_loop(index, llm, srcs, shared, graphs, inbox, outbox)
    finally:
        runner.kv_arena = None
        for src in srcs:
            src.close()


def _decode_loop(index: int, llm, srcs: list, shared: bool, graphs: list, inbox, outbox) -> None:
    from engine.request import Sequence, Status, append_step
    from engine.schedulers import blocks_for
    from ipc.migration import pull_blocks

    runner, engine = llm.runner, llm.engine
    live: dict[int, Sequence] = {}
    borrowed: dict[int, list[int]] = {}  # shared arena: prefill's blocks each request reads in place
    pending: list[DecodeTask] = []

    def finish(seq: Sequence) -> None:
        lent = borrowed.pop(seq.seq_id, [])
        seq.block_table = seq.block_table[len(lent):]  # ours go back to our pool, prefill's to prefill
        engine.finish(seq)
        if lent:
            outbox.send(FreeKV(lent, 0))

    def abort(req_id: int) -> None:
        if req_id in live:
            finish(live.pop(req_id))
            return
        for task in pending:  # not started yet: its KV blocks go straight back to prefill
            if task.req_id == req_id:
                pending.remove(task)
                outbox.send(FreeKV(task.kv_blocks, task.prefill))
                return

    report = _Reporter(outbox, f"decode{index}")
    while True:
        idle = not engine.has_work() and not pending
        report({"running": len(engine.decode.running), "waiting": len(pending),
                "kv_blocks": _blocks(engine.kv_blocks), "decode_graphs": graphs}, idle=idle)
        for msg in _receive(inbox, block=idle):
            if isinstance(msg, Shutdown):
                return
            if isinstance(msg, Abort):
                abort(msg.req_id)
            elif isinstance(msg, DecodeTask):
                pending.append(msg)
        while pending:
            task = pending[0]
            # Reserve for the whole answer: a decode stage never preempts (it could not
            # recompute a prompt whose image embeddings stayed with the encoders).
            need = blocks_for(len(task.prompt_ids) + task.sampling.max_tokens, runner.block_size)
            blocks = engine.kv_blocks.allocate(need - len(task.kv_blocks) if shared else need)
            if blocks is None:
                break
            pending.pop(0)
            if shared:
                borrowed[task.req_id] = task.kv_blocks
                blocks = task.kv_blocks + blocks
            else:
                start = time.perf_counter()
                nbytes = pull_blocks(srcs[task.prefill].tensor, task.kv_blocks, runner.kv_arena,
                                     blocks[: len(task.kv_blocks)])
                _synchronize(runner.device)
                outbox.send(Migrated(task.req_id, nbytes, time.perf_counter() - start))
                outbox.send(FreeKV(task.kv_blocks, task.prefill))  # acked: prefill may reuse them
            seq = Sequence(seq_id=task.req_id, prompt_ids=task.prompt_ids, sampling=task.sampling,
                           seed=task.seed, stop_token_ids=task.stop_token_ids, block_table=blocks)
            seq.num_cached, seq.status = len(task.prompt_ids), Status.RUNNING
            live[seq.seq_id] = seq
            seq.append_tokens([task.first_token])  # the token path (the orchestrator runs it too)
            if seq.finish_reason:
                finish(live.pop(seq.seq_id))
                continue
            engine.decode.add(seq)
        if not engine.has_work():
            continue
        req_ids, token_ids = [], []
        for kept in append_step(engine.step()):  # tokens past a stop (multi-step decode) are dropped
            req_ids.append(kept.seq.seq_id)
            token_ids.append(kept.token)
            if kept.finish_reason:
                finish(live.pop(kept.seq.seq_id))
        if req_ids:
            outbox.send(Tokens(req_ids, token_ids))


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_stage(target, name: str, parent_pid: int, cfg: StageConfig, index: int, inbox, outbox, *extra) -> None:
    """Process entry: tie the stage to its parent, then run it. An error is sent to the
    orchestrator as Crashed (first line + traceback, which it logs) rather than printed, and the
    process exits with status 1."""
    bind_to_parent(parent_pid)
    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)
    try:
        target(cfg, index, inbox, outbox, *extra)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        try:
            outbox.send(Crashed(name, f"{type(e).__name__}: {first}" if first else type(e).__name__,
                                traceback.format_exc()))
        except OSError:  # the orchestrator is gone too
            pass
        sys.exit(1)
