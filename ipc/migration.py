"""KV block migration between arenas (block-major: one block = every layer's K and V for
block_size tokens, so a block moves as one contiguous piece).

Pull-based, as DistServe's bridges: the decode side allocates its blocks, pulls the prefill
side's blocks in one batched copy, then acknowledges so the prefill side frees them. Same
arena (prefill and decode share a GPU and an arena): nothing moves.
"""

from __future__ import annotations

import torch


def pull_blocks(src: torch.Tensor, src_ids: list[int], dst: torch.Tensor, dst_ids: list[int]) -> None:
    """dst[dst_ids] = src[src_ids], one gather + one (peer) copy + one scatter.

    src/dst: [num_blocks, num_layers, 2, block_size, kv_heads, head_dim], same dtype and block shape."""
    if len(src_ids) != len(dst_ids):
        raise ValueError(f"pull_blocks: {len(src_ids)} source blocks but {len(dst_ids)} destination blocks")
    if src.shape[1:] != dst.shape[1:] or src.dtype != dst.dtype:
        raise ValueError(f"pull_blocks: block shapes differ: {tuple(src.shape[1:])} {src.dtype} vs "
                         f"{tuple(dst.shape[1:])} {dst.dtype}")
    if not src_ids:
        return
    if src.data_ptr() == dst.data_ptr() and src_ids == dst_ids:
        return  # zero-copy: decode reads the blocks where prefill wrote them
    blocks = src[torch.tensor(src_ids, device=src.device)]
    dst.index_copy_(0, torch.tensor(dst_ids, device=dst.device), blocks.to(dst.device, non_blocking=True))
