"""KV block migration between arenas (block-major: one block = every layer's K and V for
block_size tokens, so a block moves as one contiguous piece).

Pull-based, as DistServe's bridges: the decode side allocates its blocks, pulls the prefill
side's blocks, then acknowledges so the prefill side frees them. Runs of consecutive blocks on
both sides move as one copy (a peer copy over NVLink between GPUs), with no staging buffer; on a
GPU the copies are issued from C++ (`_epd_C.copy_blocks`) back to back on the current stream.
When prefill and decode share a GPU they share one arena and nothing moves (engine/roles/).
"""

from __future__ import annotations

import torch


def block_runs(src_ids: list[int], dst_ids: list[int]) -> list[tuple[int, int, int]]:
    """(src_start, dst_start, count) for each maximal run consecutive on both sides."""
    runs: list[list[int]] = []
    for s, d in zip(src_ids, dst_ids):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1][2] += 1
        else:
            runs.append([s, d, 1])
    return [(s, d, n) for s, d, n in runs]


def pull_blocks(src: torch.Tensor, src_ids: list[int], dst: torch.Tensor, dst_ids: list[int]) -> int:
    """dst[dst_ids] = src[src_ids], asynchronously on the current stream; returns bytes moved.

    src/dst: [num_blocks, num_layers, 2, block_size, kv_heads, head_dim], same dtype and block shape."""
    if len(src_ids) != len(dst_ids):
        raise ValueError(f"pull_blocks: {len(src_ids)} source blocks but {len(dst_ids)} destination blocks")
    if src.shape[1:] != dst.shape[1:] or src.dtype != dst.dtype:
        raise ValueError(f"pull_blocks: block shapes differ: {tuple(src.shape[1:])} {src.dtype} vs "
                         f"{tuple(dst.shape[1:])} {dst.dtype}")
    for name, ids, arena in (("source", src_ids, src), ("destination", dst_ids, dst)):
        bad = [b for b in ids if not 0 <= b < arena.shape[0]]
        if bad:
            raise ValueError(f"pull_blocks: {name} blocks {bad[:4]} outside the arena's {arena.shape[0]} blocks")
    if dst.is_cuda:  # one cudaMemcpyAsync per run, issued from C++ (no per-copy Python or events)
        from epd_kernels import _epd_C

        _epd_C.copy_blocks(dst, dst_ids, src, src_ids)
    else:
        for s, d, n in block_runs(src_ids, dst_ids):
            dst[d : d + n].copy_(src[s : s + n])
    return len(src_ids) * src[0].numel() * src.element_size()
