"""Attention ops on the CUDA extension: paged varlen prefill, paged decode, dense (vision) attention.

Same names and signatures as epd_kernels/reference.py. KV arena layout (block-major):
[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim], block_size a power of two.
The kernels support head_dim 64, 80, 96 and 128 in float16 / bfloat16; other head dims (the tiny
test models use 16 and 32) run the torch reference instead, which syncs with the host.
"""

from __future__ import annotations

import torch

from epd_kernels import _epd_C
from epd_kernels import reference as _reference

KERNEL_HEAD_DIMS = (64, 80, 96, 128)


def paged_attention_prefill(
    q: torch.Tensor,
    kv_arena: torch.Tensor,
    layer: int,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    max_seqlen_q: int | None = None,
    invariant: bool = False,
) -> torch.Tensor:
    """Causal varlen attention over the paged KV cache, prior context included.

    q [T, Hq, D] fp16/bf16 (last dim contiguous) packs B sequences; cu_seqlens_q [B+1] int32.
    Sequence i's q_len = cu_seqlens_q[i+1] - cu_seqlens_q[i] queries are the last q_len of its
    seq_lens[i] ([B] int32) tokens, whose K/V are already in kv_arena (layout above, q's dtype);
    query j sits at position seq_lens[i] - q_len + j and sees keys 0..that position.
    block_tables [B, max_blocks] int32: block b of sequence i is arena block block_tables[i, b].
    Hq must be a multiple of Hkv. max_seqlen_q: host int >= every q_len (sizes the grid; None =
    computed here with one device sync). invariant: one tile shape whatever the batch (batch-invariant
    mode, epd_kernels/invariant.py). Returns out [T, Hq, D], q's dtype.
    """
    if q.shape[-1] not in KERNEL_HEAD_DIMS:
        return _reference.paged_attention_prefill(q, kv_arena, layer, cu_seqlens_q, seq_lens, block_tables, scale)
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item()) if cu_seqlens_q.numel() > 1 else 0
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _epd_C.paged_attention_prefill(out, q, kv_arena, layer, cu_seqlens_q, seq_lens, block_tables, scale, max_seqlen_q,
                                   invariant)
    return out


def paged_attention_decode(
    q: torch.Tensor,
    kv_arena: torch.Tensor,
    layer: int,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    invariant: bool = False,
) -> torch.Tensor:
    """One query per sequence over the paged KV cache.

    q [B, Hq, D] fp16/bf16; kv_arena as above (q's dtype); seq_lens [B] int32 (0 = padded row,
    whose output is zeros); block_tables [B, max_blocks] int32. invariant: splits of a fixed size and
    the reduce pass always (batch-invariant mode): a sequence's output is independent of B and of
    block_tables' width. Returns out [B, Hq, D], q's dtype.
    """
    if q.shape[-1] not in KERNEL_HEAD_DIMS:
        return _reference.paged_attention_decode(q, kv_arena, layer, seq_lens, block_tables, scale)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _epd_C.paged_attention_decode(out, q, kv_arena, layer, seq_lens, block_tables, scale, invariant)
    return out


def attention_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Non-causal attention for the vision tower.

    q, k, v [B, N, H, D] fp16/bf16, any strides with a contiguous last dim (e.g. views
    qkv[:, :, i] of a fused [B, N, 3, H, D] tensor). Returns out [B, N, H, D] contiguous, q's dtype.
    """
    if q.shape[-1] not in KERNEL_HEAD_DIMS:
        return _reference.attention_dense(q, k, v, scale)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _epd_C.attention_dense(out, q, k, v, scale)
    return out
