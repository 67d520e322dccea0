"""Stage processes for EPD serving: encoders, prefill, decode. Each owns its arena (exported
as a SharedArena handle), reads peers' arenas through handles mapped once, and talks to the
orchestrator only in small picklable messages: request ids, token ids and block ids. Every
queue has one writer and one reader: each stage has its own inbox (written by the orchestrator)
and outbox (read by it); frees between stages go through the orchestrator. A stage killed in
the middle of a write can then only break its own queues, which the orchestrator drops.

    encoder:  EncodeTask -> writes image embeddings into its MM arena -> Encoded
    prefill:  PrefillTask (MM refs) -> copies the embeddings in, frees them (FreeMM, for the
              encoder), prefills into its KV arena -> Prefilled
    decode:   DecodeTask (a prefill instance's KV blocks) -> pulls them, acks (FreeKV, for that
              prefill) -> Token ...

One prefill and one decode on one device share one KV arena (prefill owns the first blocks,
decode the rest): decode reads the prompt's blocks in place and acknowledges them when the
request ends, so nothing is copied. Otherwise decode pulls the blocks (ipc/migration.py) and
acknowledges at once. Hand-off copies are timed on the host around their sync and reported.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.sampling import SamplingParams


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


# ----------------------------------------------------------------------------- messages


@dataclass
class EncodeTask:
    req_id: int
    part: int  # which slice of the request's images
    images: list[Any]  # sources as the user gave them (paths, bytes, PIL images, data URLs)


@dataclass
class Encoded:
    req_id: int
    part: int
    encoder: int
    blocks: list[int]  # one MM block per image, in order


@dataclass
class FreeMM:
    blocks: list[int]
    encoder: int = 0  # whose arena (the orchestrator forwards it there)


@dataclass
class PrefillTask:
    req_id: int
    prompt_ids: list[int]
    mm_refs: list[tuple[int, int]]  # epd: (encoder, block) per image, in prompt order
    sampling: SamplingParams
    seed: int
    images: list[Any] = field(default_factory=list)  # pd: image sources, encoded by prefill itself


@dataclass
class Prefilled:
    req_id: int
    first_token: int
    prefill: int  # the instance whose arena holds kv_blocks
    kv_blocks: list[int]
    mm_bytes: int = 0  # image embeddings copied in from the encoders' arenas
    mm_copy_s: float = 0.0


@dataclass
class Migrated:
    req_id: int
    kv_bytes: int  # 0: read in place (shared arena)
    seconds: float


@dataclass
class DecodeTask:
    req_id: int
    prompt_ids: list[int]
    first_token: int
    prefill: int  # the instance whose arena holds kv_blocks
    kv_blocks: list[int]
    sampling: SamplingParams
    seed: int
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)


@dataclass
class FreeKV:
    blocks: list[int]
    prefill: int = 0  # whose arena (the orchestrator forwards it there)


@dataclass
class Token:
    req_id: int
    token_id: int


@dataclass
class Abort:
    req_id: int


@dataclass
class Failed:
    req_id: int
    stage: str
    error: str


@dataclass
class Ready:
    stage: str
    index: int
    handle: Any  # ArenaHandle


@dataclass
class StageStatus:
    """A stage's counters, sent after its work changes them (at most every 0.2 s while busy,
    and always before it waits idle): the orchestrator's `status` shows the latest of each."""

    stage: str  # "encode0", "prefill0", "decode0", ...
    stats: dict


class Shutdown:
    pass


class _Reporter:
    def __init__(self, outbox, stage: str) -> None:
        self.outbox, self.stage, self.last, self.sent = outbox, stage, 0.0, None

    def __call__(self, stats: dict, idle: bool = False) -> None:
        now = time.monotonic()
        if stats != self.sent and (idle or now - self.last >= 0.2):
            self.outbox.put(StageStatus(self.stage, stats))
            self.last, self.sent = now, stats


def _blocks(manager) -> dict:
    return {"used": manager.num_blocks - manager.num_free, "total": manager.num_blocks} if manager else {}


# ----------------------------------------------------------------------------- processes


def _llm(cfg: StageConfig, **kw):
    from engine import LLM

    args = dict(backend=cfg.backend, device=cfg.device, dtype=cfg.dtype, kv_cache_tokens=cfg.kv_cache_tokens,
                max_num_seqs=cfg.max_num_seqs, max_images_per_batch=cfg.max_images_per_batch)
    return LLM(cfg.model, **{**args, **kw})


def encoder_main(cfg: StageConfig, index: int, inbox, outbox) -> None:
    """Encode images into this process's MM arena; free blocks when prefill says so."""
    from engine.request import Sequence
    from ipc.arena import SharedArena

    llm = _llm(cfg, parts="vision")  # the tower + projector only; vision graphs on a GPU
    runner = llm.runner
    arena = SharedArena.create(tuple(runner.mm_arena.shape), runner.dtype, runner.device, f"mm{index}")
    runner.mm_arena = arena.tensor
    outbox.put(Ready("encode", index, arena.handle))
    pending: list[EncodeTask] = []
    report = _Reporter(outbox, f"encode{index}")
    graphs = sorted(runner.vision_graphs.graphs) if runner.vision_graphs else []
    try:
        while True:
            report({"waiting": len(pending), "mm_blocks": _blocks(llm.engine.mm_blocks), "vision_graphs": graphs},
                   idle=True)
            msg = inbox.get()
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
                    seq = Sequence(seq_id=task.req_id, prompt_ids=[], sampling=SamplingParams(), seed=0, detok=None,
                                   stop_token_ids=frozenset(), pixel_values=pixels, mm_blocks=blocks)
                    runner.encode([seq])
                    outbox.put(Encoded(task.req_id, task.part, index, blocks))
                except Exception as e:  # a bad image fails its request, not the stage
                    llm.engine.mm_blocks.free(blocks)
                    outbox.put(Failed(task.req_id, f"encode{index}", str(e)))
    finally:
        arena.close()


def prefill_main(cfg: StageConfig, index: int, mm_handles: list, inbox, outbox, decode_blocks: int = 0) -> None:
    """Prefill prompts into this process's KV arena, image embeddings pulled from encoders.
    decode_blocks > 0: the arena has that many more blocks, for a decode stage on this device."""
    from engine.request import Sequence, Status
    from ipc.arena import SharedArena

    encodes = not mm_handles  # pd: no encoder stages
    # epd: the LM only (embeddings come from the encoders); pd: the whole model
    llm = _llm(cfg, cuda_graphs=False, parts="all" if encodes else "lm")
    runner = llm.runner
    shape = (runner.num_kv_blocks + decode_blocks, *runner.kv_arena.shape[1:])
    runner.kv_arena = None  # freed (and returned to the driver) before the shared arena is made
    _empty_cache(runner.device)
    arena = SharedArena.create(shape, runner.dtype, runner.device, f"kv-prefill{index}")
    runner.kv_arena = arena.tensor
    mm_arenas = [SharedArena.open(h, runner.device) for h in mm_handles]
    outbox.put(Ready("prefill", index, arena.handle))
    sched = llm.engine.prefill
    tasks: dict[int, PrefillTask] = {}
    report = _Reporter(outbox, f"prefill{index}")
    try:
        while True:
            report({"waiting": len(sched.waiting), "kv_blocks": _blocks(llm.engine.kv_blocks),
                    "mm_blocks": _blocks(llm.engine.mm_blocks)}, idle=True)
            msgs = [inbox.get()]
            while not inbox.empty():
                msgs.append(inbox.get())
            for msg in msgs:
                if isinstance(msg, Shutdown):
                    return
                if isinstance(msg, FreeKV):
                    llm.engine.kv_blocks.free(msg.blocks)
                elif isinstance(msg, PrefillTask):
                    tasks[msg.req_id] = msg
                    sched.add(Sequence(seq_id=msg.req_id, prompt_ids=msg.prompt_ids, sampling=msg.sampling,
                                       seed=msg.seed, detok=None, stop_token_ids=frozenset()))
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
                        outbox.put(Failed(seq.seq_id, f"prefill{index}", str(e)))
                if not ready:
                    continue
                tokens = runner.prefill(ready).token_ids
                for seq, token in zip(ready, tokens):
                    if seq.mm_blocks:
                        llm.engine.mm_blocks.free(seq.mm_blocks)
                        seq.mm_blocks = []
                    seq.status = Status.FINISHED  # the KV blocks now belong to the hand-off
                    outbox.put(Prefilled(seq.seq_id, token, index, seq.block_table, *mm[seq.seq_id]))
    finally:
        for a in mm_arenas:
            a.close()
        arena.close()


def _stage_images(seq, task: PrefillTask, llm, mm_arenas: list, outbox) -> int:
    """Put the request's image embeddings into local MM blocks: encode them here (pd), or copy
    them from the encoders' arenas and tell each encoder its blocks are consumed (epd).
    Returns the bytes copied."""
    count = len(task.mm_refs) or len(task.images)
    if not count:
        return 0
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
    by_encoder: dict[int, list[int]] = {}
    for encoder, block in task.mm_refs:
        by_encoder.setdefault(encoder, []).append(block)
    _synchronize(llm.runner.device)  # the encoders may overwrite these blocks once freed
    for encoder, freed in by_encoder.items():
        outbox.put(FreeMM(freed, encoder))
    return count * llm.runner.mm_arena[0].numel() * llm.runner.mm_arena.element_size()


def decode_main(cfg: StageConfig, index: int, kv_handles: list, inbox, outbox, shared: bool) -> None:
    """Take over prefilled requests and run continuous-batching decode. shared (one prefill, one
    decode, one device): the prompt's KV blocks are read in place in prefill's arena (decode owns
    the blocks after prefill's); otherwise they are pulled from the prefill instance's arena into
    this stage's and acknowledged at once."""
    from engine.request import Sequence, Status
    from engine.schedulers import blocks_for
    from ipc.arena import SharedArena
    from ipc.migration import pull_blocks

    llm = _llm(cfg, parts="lm", max_images_per_batch=0, cuda_graphs=False)
    runner, engine = llm.runner, llm.engine
    srcs = [SharedArena.open(h, runner.device) for h in kv_handles]  # mapped once, kept
    if shared:  # one arena: prefill's blocks first, then this stage's
        runner.kv_arena = None
        _empty_cache(runner.device)
        runner.kv_arena = srcs[0].tensor
        engine.kv_blocks.rebase(srcs[0].tensor.shape[0] - runner.num_kv_blocks)
    if runner.backend == "cuda":
        runner.capture_graphs()  # after the arena is final: graphs bake in its address
    outbox.put(Ready("decode", index, None))
    live: dict[int, Sequence] = {}
    borrowed: dict[int, list[int]] = {}  # shared arena: prefill's blocks each request reads in place
    pending: list[DecodeTask] = []

    def finish(seq: Sequence) -> None:
        lent = borrowed.pop(seq.seq_id, [])
        seq.block_table = seq.block_table[len(lent):]  # ours go back to our pool, prefill's to prefill
        engine.finish(seq)
        if lent:
            outbox.put(FreeKV(lent, 0))

    report = _Reporter(outbox, f"decode{index}")
    graphs = sorted(runner.decode_graphs.graphs) if runner.decode_graphs else []
    try:
        while True:
            msgs = []
            idle = not engine.has_work() and not pending
            report({"running": len(engine.decode.running), "waiting": len(pending),
                    "kv_blocks": _blocks(engine.kv_blocks), "decode_graphs": graphs}, idle=idle)
            if idle:
                msgs.append(inbox.get())
            while not inbox.empty():
                msgs.append(inbox.get())
            for msg in msgs:
                if isinstance(msg, Shutdown):
                    return
                if isinstance(msg, Abort) and msg.req_id in live:
                    finish(live.pop(msg.req_id))
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
                    outbox.put(Migrated(task.req_id, nbytes, time.perf_counter() - start))
                    outbox.put(FreeKV(task.kv_blocks, task.prefill))  # acked: prefill may reuse them
                seq = Sequence(seq_id=task.req_id, prompt_ids=task.prompt_ids, sampling=task.sampling,
                               seed=task.seed, detok=None, stop_token_ids=task.stop_token_ids, block_table=blocks)
                seq.output_ids.append(task.first_token)
                seq.num_cached, seq.status = len(task.prompt_ids), Status.RUNNING
                live[seq.seq_id] = seq
                if seq.stop_reason():
                    finish(live.pop(seq.seq_id))
                    continue
                engine.decode.add(seq)
            if not engine.has_work():
                continue
            for seq, token in engine.step():
                if seq.status is Status.FINISHED:
                    continue
                seq.output_ids.append(token)
                outbox.put(Token(seq.seq_id, token))
                if seq.stop_reason():
                    finish(live.pop(seq.seq_id))
    finally:
        runner.kv_arena = None
        for src in srcs:
            src.close()


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_stage(target, *args) -> None:
    """Process entry: run a stage; an unexpected error is reported, then the process exits."""
    try:
        target(*args)
    except Exception:
        traceback.print_exc()
        raise
