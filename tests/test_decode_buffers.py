"""The decode graphs' static buffers: one batch copied in, padding rows inert (CPU)."""

from __future__ import annotations

import torch

import engine  # noqa: F401  (import order: engine before graphs)
from engine import SamplingParams
from engine.request import Sequence
from graphs.decode_graphs import StaticBuffers


def _seq(i: int, prompt: int, out: list[int], blocks: list[int], temperature: float) -> Sequence:
    s = Sequence(seq_id=i, prompt_ids=list(range(100, 100 + prompt)), seed=7 + i,
                 sampling=SamplingParams(max_tokens=50, temperature=temperature, top_k=5, top_p=0.5),
                 stop_token_ids=frozenset())
    s.output_ids = list(out)
    s.block_table = list(blocks)
    return s


def test_copy_from_writes_rows_and_padding() -> None:
    bufs = StaticBuffers.allocate(8, 6, torch.device("cpu"))
    staging = bufs.staging()
    # a first, larger batch leaves values behind in rows that the second call pads
    big = [_seq(i, 20, [1, 2], [9, 8], 0.0) for i in range(6)]
    bufs.copy_from(big, 16, 8, staging)
    seqs = [_seq(0, 5, [], [3], 0.0), _seq(1, 17, [42, 43], [4, 7], 0.7), _seq(2, 32, [5], [1, 2, 6], 1.0)]
    bufs.copy_from(seqs, 16, 4, staging)
    assert bufs.input_ids[:4].tolist() == [104, 43, 5, 0]
    assert bufs.positions[:4].tolist() == [4, 18, 32, 0]
    assert bufs.seq_lens[:4].tolist() == [5, 19, 33, 0]
    # slot = block_table[pos // 16] * 16 + pos % 16
    assert bufs.slot_mapping[:4].tolist() == [3 * 16 + 4, 7 * 16 + 2, 6 * 16 + 0, -1]
    assert bufs.temperature[:4].tolist() == [0.0, 0.699999988079071, 1.0, 0.0]
    assert bufs.top_k[:4].tolist() == [5, 5, 5, 0]
    assert bufs.top_p[:4].tolist() == [0.5, 0.5, 0.5, 1.0]
    assert bufs.seeds[:4].tolist() == [7, 8, 9, 0]
    assert bufs.steps[:4].tolist() == [0, 2, 1, 0]
    assert bufs.block_tables[:4].tolist() == [[3, 0, 0, 0, 0, 0], [4, 7, 0, 0, 0, 0], [1, 2, 6, 0, 0, 0], [0] * 6]
    assert bufs.seq_lens.dtype == torch.int32 and bufs.top_p.dtype == torch.float32


def test_fresh_buffers_are_padding() -> None:
    bufs = StaticBuffers.allocate(4, 3, torch.device("cpu"))
    assert bufs.slot_mapping.tolist() == [-1] * 4 and bufs.seq_lens.tolist() == [0] * 4
    assert bufs.top_p.tolist() == [1.0] * 4 and bufs.block_tables.tolist() == [[0] * 3] * 4
