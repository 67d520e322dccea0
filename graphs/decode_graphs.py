"""Decode under CUDA graphs: one graph per batch bucket, captured largest first into one pool.

Static buffers hold token ids, positions, slot mapping, sequence lengths, block tables and
the sampling parameters; a step copies the batch into them and replays the smallest bucket
that fits. Padded rows are no-ops: seq_len 0 (attention writes zeros) and slot -1 (no cache
write). Graphs do not depend on sequence lengths: the kernels read them from device memory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields

import torch

from engine.models.llama import AttentionMetadata
from engine.request import Sequence


def batch_buckets(max_batch: int) -> list[int]:
    """[1, 2, 4, 8, 16, 24, 32, 48, 64, ...] up to max_batch (always included)."""
    sizes = [1, 2, 4, 8, 16, 24, 32] + list(range(48, max_batch + 1, 16))
    return sorted({s for s in sizes if s < max_batch} | {max_batch})


@dataclass
class StaticBuffers:
    input_ids: torch.Tensor  # [B] int64
    positions: torch.Tensor  # [B] int64
    slot_mapping: torch.Tensor  # [B] int64, -1 on padded rows
    seq_lens: torch.Tensor  # [B] int32, 0 on padded rows
    block_tables: torch.Tensor  # [B, max_blocks] int32
    temperature: torch.Tensor  # [B] fp32
    top_k: torch.Tensor  # [B] int64
    top_p: torch.Tensor  # [B] fp32
    seeds: torch.Tensor  # [B] int64
    steps: torch.Tensor  # [B] int64

    @classmethod
    def allocate(cls, batch: int, max_blocks: int, device: torch.device) -> StaticBuffers:
        i64, i32, f32 = torch.int64, torch.int32, torch.float32
        z = lambda *shape, dtype: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        return cls(z(batch, dtype=i64), z(batch, dtype=i64), z(batch, dtype=i64) - 1, z(batch, dtype=i32),
                   z(batch, max_blocks, dtype=i32), z(batch, dtype=f32), z(batch, dtype=i64),
                   z(batch, dtype=f32) + 1, z(batch, dtype=i64), z(batch, dtype=i64))

    def copy_from(self, seqs: list[Sequence], block_size: int, rows: int) -> None:
        """Write the batch into rows [0, len(seqs)); rows [len(seqs), rows) become padding."""
        n, width = len(seqs), self.block_tables.shape[1]
        pos = [s.num_tokens - 1 for s in seqs]
        host = {
            "input_ids": [s.all_ids[-1] for s in seqs] + [0] * (rows - n),
            "positions": pos + [0] * (rows - n),
            "slot_mapping": [s.block_table[p // block_size] * block_size + p % block_size for s, p in zip(seqs, pos)]
            + [-1] * (rows - n),
            "seq_lens": [s.num_tokens for s in seqs] + [0] * (rows - n),
            "block_tables": [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
            + [[0] * width] * (rows - n),
            "temperature": [s.sampling.temperature for s in seqs] + [0.0] * (rows - n),
            "top_k": [s.sampling.top_k for s in seqs] + [0] * (rows - n),
            "top_p": [s.sampling.top_p for s in seqs] + [1.0] * (rows - n),
            "seeds": [s.seed for s in seqs] + [0] * (rows - n),
            "steps": [len(s.output_ids) for s in seqs] + [0] * (rows - n),
        }
        for f in fields(self):
            dst = getattr(self, f.name)[:rows]
            dst.copy_(torch.tensor(host[f.name], dtype=dst.dtype).pin_memory(), non_blocking=True)


class DecodeGraphs:
    """Captures and replays decode steps of `runner` (cuda backend) for each batch bucket."""

    def __init__(self, runner, max_batch: int, max_blocks_per_seq: int) -> None:
        self.runner = runner
        self.buckets = batch_buckets(max_batch)
        self.buffers = StaticBuffers.allocate(max_batch, max_blocks_per_seq, runner.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # (tokens [B], logits [B, V])
        self.pool = None
        self.capture_log: list[tuple[int, float, int]] = []  # (bucket, seconds, bytes)

    def _forward(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.buffers
        meta = AttentionMetadata(is_prefill=False, slot_mapping=b.slot_mapping[:rows], seq_lens=b.seq_lens[:rows],
                                 block_tables=b.block_tables[:rows])
        model, ops = self.runner.model, self.runner.ops
        hidden = model(ops, b.input_ids[:rows], b.positions[:rows], meta, self.runner.kv_arena)
        logits = model.compute_logits(hidden)
        tokens = ops.sample(logits, b.temperature[:rows], b.top_k[:rows], b.top_p[:rows], b.seeds[:rows],
                            b.steps[:rows])
        return tokens, logits

    @torch.inference_mode()
    def capture(self, rows: int, stream: torch.cuda.Stream | None = None) -> None:
        """Capture the bucket of `rows`; capture largest first so smaller graphs reuse the pool."""
        start, mem = time.perf_counter(), torch.cuda.memory_allocated()
        self._forward(rows)  # warm-up outside the graph (cuBLAS handles, lazy inits)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=stream, capture_error_mode="thread_local"):
            out = self._forward(rows)
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[rows], self.outputs[rows] = graph, out
        self.capture_log.append((rows, time.perf_counter() - start, torch.cuda.memory_allocated() - mem))

    def capture_all(self) -> None:
        for rows in sorted(self.buckets, reverse=True):
            self.capture(rows)

    def bucket_for(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n and b in self.graphs), None)

    @torch.inference_mode()
    def run(self, seqs: list[Sequence]) -> tuple[list[int], torch.Tensor] | None:
        """Replay one decode step for `seqs`: (tokens, logits [n, V]); None when no captured
        bucket fits (the caller runs eagerly)."""
        rows = self.bucket_for(len(seqs))
        if rows is None:
            return None
        self.buffers.copy_from(seqs, self.runner.block_size, rows)
        self.graphs[rows].replay()
        tokens, logits = self.outputs[rows]
        n = len(seqs)
        return tokens[:n].tolist(), logits[:n]
