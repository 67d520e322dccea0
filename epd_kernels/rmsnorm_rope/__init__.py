"""CUDA norms and RoPE + KV-cache write (the rmsnorm_rope kernel family).

Same names and signatures as epd_kernels/reference.py; each wrapper allocates its outputs and calls
`epd_kernels._epd_C`. Dtypes: float16 or bfloat16, one dtype for every tensor of an op except
positions / slot_mapping (int64) and cos_sin (float32).
"""

from __future__ import annotations

import torch

from epd_kernels import _epd_C
from epd_kernels import reference as _reference
from epd_kernels.attn_varlen import KERNEL_HEAD_DIMS


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., H], weight [H] -> [..., H] (new, contiguous).

    HF rounding: x * rsqrt(mean(x^2) + eps) in fp32, rounded to x.dtype, times weight, rounded again.
    """
    hidden = x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _epd_C.rms_norm(out.view(-1, hidden), x.reshape(-1, hidden), weight, eps)
    return out


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [..., H], weight [H] -> (normed [..., H], new_residual [..., H]).

    new_residual = round(x + residual) and normed = rms_norm(new_residual, weight, eps).
    In place: new_residual is written into `residual`'s memory and returned (a view of it), so the
    caller must not read the old residual afterwards (the model never does). Each element is read
    once and written once, in one pass.
    """
    hidden = x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    res = residual.reshape(-1, hidden)  # a view of residual unless its layout forbids (then a copy)
    _epd_C.add_rms_norm(out.view(-1, hidden), res, x.reshape(-1, hidden), weight, eps)
    return out, res.reshape(residual.shape)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., H] (e.g. [N, L, H]), weight [H], bias [H] -> [..., H] (new, contiguous).

    fp32 mean and variance over H, output rounded once to x.dtype.
    """
    hidden = x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _epd_C.layer_norm(out.view(-1, hidden), x.reshape(-1, hidden), weight, bias, eps)
    return out


def add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [..., H], weight, bias [H] -> (normed [..., H], new_residual [..., H]).

    new_residual = round(x + residual) and normed = layer_norm(new_residual, weight, bias, eps), bit
    for bit; in place like add_rms_norm (new_residual is `residual`'s memory), one pass.
    """
    hidden = x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    res = residual.reshape(-1, hidden)  # a view of residual unless its layout forbids (then a copy)
    _epd_C.add_layer_norm(out.view(-1, hidden), res, x.reshape(-1, hidden), weight, bias, eps)
    return out, res.reshape(residual.shape)


def rope_and_cache_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    kv_arena: torch.Tensor,
    layer: int,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """Rotate-half RoPE on q and k; write rotated k and v into the paged KV arena; return rotated q.

    q [T, Hq, D], k / v [T, Hkv, D] (Hq a multiple of Hkv; D in 64, 80, 96, 128): heads contiguous,
    any row stride that is a multiple of 8 elements (column slices of one fused qkv output work).
    positions [T] int64, cos_sin [max_positions, D] float32 (cos | sin), kv_arena
    [num_blocks, num_layers, 2, block_size, Hkv, D] contiguous, q.dtype (mutated: [slot // block_size,
    layer, 0 / 1, slot % block_size] for every slot = slot_mapping[t] >= 0; -1 rows write nothing),
    slot_mapping [T] int64. Returns q_rot [T, Hq, D] (new, contiguous), rows with slot -1 included.
    cos/sin are rounded to q.dtype before the fp32 math, as HF does.
    """
    if q.shape[-1] not in KERNEL_HEAD_DIMS:  # small test models: the reference (as attention does)
        return _reference.rope_and_cache_write(q, k, v, positions, cos_sin, kv_arena, layer, slot_mapping)
    q_rot = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _epd_C.rope_and_cache_write(q_rot, q, k, v, positions, cos_sin, kv_arena, layer, slot_mapping)
    return q_rot
