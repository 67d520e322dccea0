"""Elementwise CUDA ops: activations and the token embedding. Same names and signatures as
epd_kernels/reference.py; outputs are allocated here and filled by epd_kernels._epd_C."""

from __future__ import annotations

import torch

from epd_kernels import _epd_C


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] (gate | up; fp16, bf16 or fp32, last dim contiguous) -> [T, I] of x.dtype.

    round(round(silu(gate)) * up): silu(gate) is rounded to x.dtype before the product, as in HF."""
    out = torch.empty((x.shape[0], x.shape[1] // 2), dtype=x.dtype, device=x.device)
    _epd_C.silu_and_mul(out, x)
    return out


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU. x [...] (any shape; fp16, bf16 or fp32) -> same shape and dtype; fp32 math."""
    x = x.contiguous()
    out = torch.empty_like(x)
    _epd_C.gelu(out, x)
    return out


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's x * sigmoid(1.702 x). x [...] (any shape; fp16, bf16 or fp32) -> same shape and dtype."""
    x = x.contiguous()
    out = torch.empty_like(x)
    _epd_C.quick_gelu(out, x)
    return out


def embed_tokens(
    input_ids: torch.Tensor, weight: torch.Tensor, image_index: torch.Tensor | None, image_embeds: torch.Tensor | None
) -> torch.Tensor:
    """input_ids [T] int64, weight [V, H] -> [T, H] of weight.dtype.

    Rows with image_index[t] >= 0 (image_index [T] int64) take image_embeds[image_index[t]]
    (image_embeds [N, H], cast to weight.dtype). Ids outside [0, V) and image rows outside [0, N)
    give zero rows instead of reading out of bounds; callers validate ids beforehand (no host sync here).
    """
    out = torch.empty((input_ids.shape[0], weight.shape[1]), dtype=weight.dtype, device=weight.device)
    if image_index is None or image_embeds is None:
        image_index = image_embeds = None
    else:
        image_embeds = image_embeds.to(weight.dtype).contiguous()
    _epd_C.embed_tokens(out, input_ids, weight, image_index, image_embeds)
    return out
