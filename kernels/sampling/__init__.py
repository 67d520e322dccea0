"""Sampling CUDA op. Same name and signature as kernels/reference.py:sample; the output is
allocated here and filled by kernels._epd_C."""

from __future__ import annotations

import torch

from kernels import _epd_C


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    steps: torch.Tensor,
) -> torch.Tensor:
    """logits [B, V] (fp32; other float dtypes are upcast) -> token ids [B] int64.

    temperature [B] fp32 (<= 0: greedy argmax, first index on ties), top_k [B] int64 (<= 0: all),
    top_p [B] fp32 (>= 1: all), seeds [B] int64, steps [B] int64, all on logits' device.
    Per row: softmax(logits / T), keep the top_k most likely, then the shortest prefix (descending
    probability, lower index first on ties) whose mass reaches top_p, and draw by inverse CDF in
    that order with u = random_uniform(seed, step) * kept mass. No host sync; graph-capturable.
    """
    logits = logits.float()
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    device = logits.device
    out = torch.empty(logits.shape[0], dtype=torch.int64, device=device)
    _epd_C.sample(
        out,
        logits,
        temperature.to(device=device, dtype=torch.float32).contiguous(),
        top_k.to(device=device, dtype=torch.int64).contiguous(),
        top_p.to(device=device, dtype=torch.float32).contiguous(),
        seeds.to(device=device, dtype=torch.int64).contiguous(),
        steps.to(device=device, dtype=torch.int64).contiguous(),
    )
    return out
