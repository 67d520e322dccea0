"""Decode steps over static buffers, replayed as CUDA graphs: one graph per batch bucket,
captured largest first into one pool; eager (same code, same buffers) where no graph fits or
on the CPU.

DecodeGraphs takes what a step reads explicitly (the model, the ops backend, the KV arena, the
penalty state tensors, the device and the sizes) and a call takes a DecodeBatch: per-row plain
lists, no request objects (the runner builds one from its sequences).

Static buffers hold token ids, positions, slot mapping, sequence lengths, block tables and
the sampling parameters; a call copies the batch in once, then runs k steps back to back. Each
step samples on the device and advances the buffers itself (next token id, position, length,
slot from the block table) and appends its tokens to a device history, so k steps need one
copy-in and one copy-out (multi-step decode, kv_generate-style). Padded rows are no-ops:
seq_len 0 (attention writes zeros) and slot -1 (no cache write).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from engine.models.llama import AttentionMetadata
from graphs.capture import capture_graph

if TYPE_CHECKING:
    from engine.models.llava import MultimodalModel

log = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    """[1, 2, 4, 8, 16, 24, 32, 48, 64, ...] up to max_batch (always included)."""
    sizes = [1, 2, 4, 8, 16, 24, 32] + list(range(48, max_batch + 1, 16))
    return sorted({s for s in sizes if s < max_batch} | {max_batch})


@dataclass
class DecodeBatch:
    """One decode call's rows as plain host lists, one entry per row (what DecodeGraphs.run and
    StaticBuffers.copy_from take). Slot mapping and sequence lengths follow from positions and
    block tables."""

    input_ids: list[int]  # each row's last token (the one this step feeds)
    positions: list[int]  # its position: tokens so far - 1
    block_tables: list[list[int]]  # KV blocks of the row, covering every step to run
    temperature: list[float]
    top_k: list[int]
    top_p: list[float]
    seeds: list[int]
    steps: list[int]  # tokens sampled so far (the sampler's step counter)
    presence: list[float]
    frequency: list[float]
    repetition: list[float]  # 1 = off
    penalty_slot: list[int]  # the row's slot in the penalty state tensors, -1 = no penalties

    def __len__(self) -> int:
        return len(self.input_ids)


# The per-row fields (name, dtype, value on padded rows); block tables are kept apart.
_ROW_FIELDS = (("input_ids", torch.int64, 0), ("positions", torch.int64, 0), ("slot_mapping", torch.int64, -1),
               ("seq_lens", torch.int32, 0), ("temperature", torch.float32, 0.0), ("top_k", torch.int64, 0),
               ("top_p", torch.float32, 1.0), ("seeds", torch.int64, 0), ("steps", torch.int64, 0),
               ("presence", torch.float32, 0.0), ("frequency", torch.float32, 0.0), ("repetition", torch.float32, 1.0),
               ("penalty_slot", torch.int64, -1))


@dataclass
class StaticBuffers:
    input_ids: torch.Tensor  # [B] int64
    positions: torch.Tensor  # [B] int64
    slot_mapping: torch.Tensor  # [B] int64, -1 on padded rows
    seq_lens: torch.Tensor  # [B] int32, 0 on padded rows
    temperature: torch.Tensor  # [B] fp32
    top_k: torch.Tensor  # [B] int64
    top_p: torch.Tensor  # [B] fp32
    seeds: torch.Tensor  # [B] int64
    steps: torch.Tensor  # [B] int64
    presence: torch.Tensor  # [B] fp32
    frequency: torch.Tensor  # [B] fp32
    repetition: torch.Tensor  # [B] fp32, 1 = off
    penalty_slot: torch.Tensor  # [B] int64: the row's slot in the penalty state, -1 = no penalties
    block_tables: torch.Tensor  # [B, max_blocks] int32
    packed: torch.Tensor  # [13 * B * 8] bytes: the [B] fields above are views of it, so one copy moves them all

    @classmethod
    def allocate(cls, batch: int, max_blocks: int, device: torch.device, pin_memory: bool = False) -> StaticBuffers:
        packed = torch.zeros(len(_ROW_FIELDS) * batch * 8, dtype=torch.uint8, device=device, pin_memory=pin_memory)
        rows = {}
        for i, (name, dtype, pad) in enumerate(_ROW_FIELDS):
            start = i * batch * 8
            rows[name] = packed[start : start + batch * dtype.itemsize].view(dtype)
            rows[name].fill_(pad)
        tables = torch.zeros(batch, max_blocks, dtype=torch.int32, device=device, pin_memory=pin_memory)
        return cls(**rows, block_tables=tables, packed=packed)

    def staging(self) -> StaticBuffers:
        """Pinned host twins of these buffers (allocated once: no host allocation per step)."""
        batch, max_blocks = self.block_tables.shape
        return StaticBuffers.allocate(batch, max_blocks, torch.device("cpu"), pin_memory=self.packed.is_cuda)

    def copy_from(self, batch: DecodeBatch, block_size: int, rows: int, staging: StaticBuffers) -> None:
        """Write `batch` into rows [0, len(batch)); rows [len(batch), rows) become padding.
        Each row's block table must already cover the tokens of every step to run. Filled
        through numpy views of the pinned staging (the last call's copies are done: its tokens
        were read back), then two copies: the per-row fields and the block tables."""
        n = len(batch)
        pos, tables_in = batch.positions, batch.block_tables
        values = {
            "slot_mapping": [t[p // block_size] * block_size + p % block_size for t, p in zip(tables_in, pos)],
            "seq_lens": [p + 1 for p in pos],
        }
        for name, _, pad in _ROW_FIELDS:
            host = getattr(staging, name).numpy()
            host[:n] = values[name] if name in values else getattr(batch, name)
            host[n:rows] = pad
        tables = staging.block_tables.numpy()
        tables[:rows] = 0
        for i, t in enumerate(tables_in):
            tables[i, : len(t)] = t
        self.packed.copy_(staging.packed, non_blocking=True)
        self.block_tables[:rows].copy_(staging.block_tables[:rows], non_blocking=True)


class DecodeGraphs:
    """Decode steps on static buffers; replays CUDA graphs where captured, eager elsewhere.

    model: the engine.models model (its lm runs the step; lm.norm warms cuBLAS for a background
    capture); ops: the kernels backend module; kv_arena: the paged KV arena the steps read and
    write (fixed for the object's life: captured graphs bake in its address); block_size: tokens
    per KV block; penalty_counts [S, V] int32 and penalty_prompt_mask [S, V] bool: the penalty
    state (engine/penalties.py), allocated once (graphs bake in their addresses too); device;
    max_batch: the largest batch (bucket); max_blocks_per_seq: block table width; max_steps:
    the most steps one run() may take."""

    def __init__(
        self, *, model: MultimodalModel, ops: ModuleType, kv_arena: torch.Tensor, block_size: int,
        penalty_counts: torch.Tensor, penalty_prompt_mask: torch.Tensor, device: torch.device, max_batch: int,
        max_blocks_per_seq: int, max_steps: int = 64,
    ) -> None:
        self.model, self.ops, self.block_size, self.device = model, ops, block_size, device
        self.kv_arena = kv_arena  # fixed: captured graphs bake in its address
        self.penalty_counts, self.penalty_prompt_mask = penalty_counts, penalty_prompt_mask
        self.buckets = batch_buckets(max_batch)
        self.buffers = StaticBuffers.allocate(max_batch, max_blocks_per_seq, device)
        self.staging = self.buffers.staging()
        self.history = torch.zeros(max_steps, max_batch, dtype=torch.int64, device=device)  # [step, row]
        self.cursor = torch.zeros(1, dtype=torch.int64, device=device)  # next history row
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}  # bucket -> [B, V] logits of the last step
        self.pool = None
        self.capture_log: list[tuple[int, float, int]] = []  # (bucket, seconds, bytes)
        self._capture_thread: threading.Thread | None = None
        self.capture_error: BaseException | None = None
        self._stop_capture = threading.Event()  # set by stop_capture; checked between buckets

    @property
    def max_steps(self) -> int:
        return self.history.shape[0]

    def _step(self, rows: int) -> torch.Tensor:
        """One decode step on rows [0, rows) of the buffers, then advance them. Returns logits."""
        b, bs = self.buffers, self.block_size
        meta = AttentionMetadata(is_prefill=False, slot_mapping=b.slot_mapping[:rows], seq_lens=b.seq_lens[:rows],
                                 block_tables=b.block_tables[:rows])
        model, ops = self.model, self.ops
        hidden = model(ops, b.input_ids[:rows], b.positions[:rows], meta, self.kv_arena)
        logits = model.compute_logits(ops, hidden)  # raw: what logprobs are taken from
        counts, slots = self.penalty_counts, b.penalty_slot[:rows]  # engine/penalties.py
        penalized = ops.apply_penalties(logits, counts, self.penalty_prompt_mask, slots, b.presence[:rows],
                                        b.frequency[:rows], b.repetition[:rows])
        tokens = ops.sample(penalized, b.temperature[:rows], b.top_k[:rows], b.top_p[:rows], b.seeds[:rows],
                            b.steps[:rows])
        ops.record_tokens(counts, slots, tokens)  # the next step (of a multi-step run) sees this token
        # advance on the device: no host sync between steps
        self.history[:, :rows].index_copy_(0, self.cursor, tokens[None])
        self.cursor += 1
        active = b.seq_lens[:rows] > 0
        b.input_ids[:rows].copy_(tokens)
        b.positions[:rows] += active
        b.seq_lens[:rows] += active.int()
        b.steps[:rows] += active
        pos = b.positions[:rows]
        index = (pos // bs).clamp_max(b.block_tables.shape[1] - 1)
        block = b.block_tables[:rows].gather(1, index[:, None])[:, 0].long()
        b.slot_mapping[:rows].copy_(torch.where(active, block * bs + pos % bs, -1))
        return logits

    @torch.inference_mode()
    def warm_up(self) -> None:
        """One eager step at the largest bucket on padding rows (no cache writes): initialises
        cuBLAS handles and lazy state before any capture."""
        self.buffers.seq_lens.zero_()
        self.buffers.slot_mapping.fill_(-1)
        self.buffers.penalty_slot.fill_(-1)  # no token counts recorded for the padding rows
        self.cursor.zero_()
        self._step(self.buckets[-1])
        torch.cuda.synchronize()

    @torch.inference_mode()
    def capture(self, rows: int, stream: torch.cuda.Stream | None = None) -> None:
        """Capture the bucket of `rows` (after warm_up); largest first, so smaller graphs reuse
        the pool. Capture records kernels without running them, so the static buffers may be
        in use by eager steps meanwhile."""
        graph, logits, self.pool, seconds, grown = capture_graph(partial(self._step, rows), self.pool, stream)
        self.logits[rows] = logits
        self.graphs[rows] = graph  # published last: run() may pick it from now on
        self.capture_log.append((rows, seconds, grown))
        log.info("captured decode graph for batch %d in %.3f s (+%.1f MiB)", rows, seconds, grown / 2**20)

    def capture_all(self, background: bool = False) -> None:
        """Capture every bucket not captured yet, largest first; in a background thread on a
        side stream when `background` (serving goes on eagerly, and with each graph as soon as
        it exists). A no-op while a background capture runs."""
        if self.capture_state == "running":
            return
        self._stop_capture.clear()
        self.capture_error = None
        self.warm_up()
        if not background:
            self.capture_pending()
            return
        device = self.device
        index = device.index if device.index is not None else torch.cuda.current_device()

        def work() -> None:
            try:
                torch.cuda.set_device(index)
                stream = torch.cuda.Stream(device)
                # cuBLAS handles are per thread and workspaces per stream: create them here,
                # outside capture (creating one inside invalidated the capture on an H100).
                with torch.cuda.stream(stream):
                    w = self.model.lm.norm
                    torch.nn.functional.linear(w[None, :], w[None, :])
                stream.synchronize()
                self.capture_pending(stream)
            except BaseException as e:  # surfaced by wait_for_capture; serving stays eager
                self.capture_error = e
                log.exception("background capture failed; decode stays eager")

        self._capture_thread = threading.Thread(target=work, name="decode-graph-capture", daemon=True)
        self._capture_thread.start()

    def capture_pending(self, stream: torch.cuda.Stream | None = None) -> None:
        """Capture the pending buckets, largest first, until none is left or stop_capture()."""
        for rows in self.pending:
            if self._stop_capture.is_set():
                log.info("decode graph capture stopped; pending buckets: %s", self.pending)
                return
            self.capture(rows, stream)

    def stop_capture(self) -> None:
        """Ask a running capture to stop after the bucket in progress (capture_all resumes)."""
        self._stop_capture.set()

    def join_capture(self, timeout_s: float | None = None) -> bool:
        """Wait up to timeout_s for a background capture; True when none runs any more."""
        thread = self._capture_thread
        if thread is not None:
            thread.join(timeout_s)
        return thread is None or not thread.is_alive()

    @property
    def pending(self) -> list[int]:
        """Buckets with no graph yet, largest first (the capture order)."""
        captured = self.graphs.copy()  # one atomic copy: the capture thread adds to it
        return sorted((b for b in self.buckets if b not in captured), reverse=True)

    @property
    def capture_state(self) -> str:
        """running (a background capture is on), failed (the last one raised), stopped (asked
        to stop before every bucket was captured), or idle."""
        thread = self._capture_thread
        if thread is not None and thread.is_alive():
            return "running"
        if self.capture_error is not None:
            return "failed"
        return "stopped" if self._stop_capture.is_set() and self.pending else "idle"

    def wait_for_capture(self) -> None:
        if self._capture_thread is not None:
            self._capture_thread.join()
        if self.capture_error is not None:
            raise RuntimeError("background graph capture failed") from self.capture_error

    def bucket_for(self, n: int) -> int | None:
        graphs = self.graphs
        return next((b for b in self.buckets if b >= n and b in graphs), None)

    @torch.inference_mode()
    def run(
        self, batch: DecodeBatch, num_steps: int = 1,
        on_step: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    ) -> tuple[list[list[int]], torch.Tensor]:
        """Run num_steps decode steps for the n rows of `batch` back to back; returns (tokens per
        step, each a list over the rows; raw logits [n, V] of the last step). Block tables must
        cover all steps. on_step(logits [n, V], tokens [n]) runs after each step, before the next
        overwrites the graph's logits (logprobs); it must only queue device work, so the steps
        stay unsynced."""
        if not 1 <= num_steps <= self.max_steps:
            raise ValueError(f"num_steps = {num_steps}; must be in [1, {self.max_steps}]")
        n = len(batch)
        rows = self.bucket_for(n)
        self.buffers.copy_from(batch, self.block_size, rows or n, self.staging)
        self.cursor.zero_()
        for step in range(num_steps):
            if rows is not None:
                self.graphs[rows].replay()
                logits = self.logits[rows][:n]
            else:
                logits = self._step(n)
            if on_step is not None:
                on_step(logits, self.history[step, :n])
        return self.history[:num_steps, :n].tolist(), logits
