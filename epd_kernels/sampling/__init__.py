"""Sampling CUDA ops: sample, apply_penalties, record_tokens. Same names and signatures as
epd_kernels/reference.py; outputs are allocated here and filled by epd_kernels._epd_C."""

from __future__ import annotations

import torch

from epd_kernels import _epd_C


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


def apply_penalties(
    logits: torch.Tensor,
    counts: torch.Tensor,
    prompt_mask: torch.Tensor,
    slots: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
    repetition: torch.Tensor,
) -> torch.Tensor:
    """Penalized copy of logits [B, V] (fp32; other float dtypes are upcast) -> [B, V] fp32.

    counts [S, V] int32 and prompt_mask [S, V] bool/uint8 (the runner's penalty state, last dim
    contiguous), slots [B] int64 (-1 or >= S: the row is copied unchanged), presence / frequency /
    repetition [B] fp32, all on logits' device. Bit-identical to epd_kernels/reference.py:apply_penalties.
    No host sync; graph-capturable.
    """
    logits = logits.float()
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    device = logits.device
    out = torch.empty_like(logits, memory_format=torch.contiguous_format)
    _epd_C.apply_penalties(
        out,
        logits,
        counts,
        prompt_mask,
        slots.to(device=device, dtype=torch.int64).contiguous(),
        presence.to(device=device, dtype=torch.float32).contiguous(),
        frequency.to(device=device, dtype=torch.float32).contiguous(),
        repetition.to(device=device, dtype=torch.float32).contiguous(),
    )
    return out


def record_tokens(counts: torch.Tensor, slots: torch.Tensor, tokens: torch.Tensor) -> None:
    """counts [S, V] int32 (in place): counts[slots[b], tokens[b]] += 1 where 0 <= slot < S and
    0 <= token < V. slots / tokens [B] int64 on counts' device. No host sync; graph-capturable."""
    device = counts.device
    _epd_C.record_tokens(counts, slots.to(device=device, dtype=torch.int64).contiguous(),
                         tokens.to(device=device, dtype=torch.int64).contiguous())
