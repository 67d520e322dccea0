"""Torch reference implementations of every op the model calls (the `torch` backend).

These are the oracle for the CUDA kernels and the CI path. Math runs in fp32 and the
result is rounded once to the input dtype, except where HF rounds in between (noted),
which we mirror so that bf16 results stay close to HF's.

KV arena layout (block-major): [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------- norms


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, H], weight [H] -> [T, H]. HF order: normalise in fp32, round, then scale."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual); the sum is rounded to x.dtype first."""
    new_residual = x + residual
    return rms_norm(new_residual, weight, eps), new_residual


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., H] -> [..., H]; statistics in fp32."""
    return F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps).to(x.dtype)


def add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (layer_norm(x + residual), x + residual); the sum is rounded to x.dtype first."""
    new_residual = x + residual
    return layer_norm(new_residual, weight, bias, eps), new_residual


# ----------------------------------------------------------------------------- activations


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] = gate | up -> silu(gate) * up, [T, I]. HF rounds silu(gate) before the product."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate.float()).to(x.dtype) * up


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU."""
    return F.gelu(x.float()).to(x.dtype)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's x * sigmoid(1.702 x)."""
    xf = x.float()
    return (xf * torch.sigmoid(1.702 * xf)).to(x.dtype)


# ----------------------------------------------------------------------------- embeddings


def embed_tokens(
    input_ids: torch.Tensor, weight: torch.Tensor, image_index: torch.Tensor | None, image_embeds: torch.Tensor | None
) -> torch.Tensor:
    """input_ids [T] -> [T, H]. Rows with image_index[t] >= 0 take image_embeds[image_index[t]] ([N, H])."""
    out = weight[input_ids]
    if image_index is not None and image_embeds is not None:
        rows = image_index >= 0
        out[rows] = image_embeds[image_index[rows]].to(out.dtype)
    return out


# ----------------------------------------------------------------------------- rope + cache write


def rope_cos_sin(inv_freq: torch.Tensor, max_positions: int) -> torch.Tensor:
    """[max_positions, head_dim] fp32 table: cos in the first half, sin in the second."""
    freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq.float()[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x [T, heads, D], positions [T] -> [T, heads, D].

    cos/sin are rounded to x.dtype first, as HF does."""
    half = x.shape[-1] // 2
    table = cos_sin[positions].to(x.dtype).float()  # [T, D]
    cos = torch.cat([table[:, :half]] * 2, dim=-1)[:, None, :]
    sin = torch.cat([table[:, half:]] * 2, dim=-1)[:, None, :]
    xf = x.float()
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


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
    """Apply RoPE to q and k, write rotated k and v into the arena; return rotated q.

    q [T, Hq, D], k/v [T, Hkv, D], positions [T] int64, slot_mapping [T] int64
    (slot = block * block_size + offset; -1 = skip), kv_arena as in the module doc.
    """
    q_rot = apply_rope(q, positions, cos_sin)
    k_rot = apply_rope(k, positions, cos_sin)
    block_size = kv_arena.shape[3]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    blocks, offsets = slots // block_size, slots % block_size
    kv_arena[blocks, layer, 0, offsets] = k_rot[keep].to(kv_arena.dtype)
    kv_arena[blocks, layer, 1, offsets] = v[keep].to(kv_arena.dtype)
    return q_rot


# ----------------------------------------------------------------------------- attention


def gather_kv(
    kv_arena: torch.Tensor, layer: int, block_table: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's K and V, each [seq_len, Hkv, D], read through its block table."""
    block_size = kv_arena.shape[3]
    num_blocks = (seq_len + block_size - 1) // block_size
    kv = kv_arena[block_table[:num_blocks].long(), layer]  # [nb, 2, bs, Hkv, D]
    k = kv[:, 0].reshape(-1, *kv.shape[-2:])[:seq_len]
    v = kv[:, 1].reshape(-1, *kv.shape[-2:])[:seq_len]
    return k, v


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """q [Lq, Hq, D], k/v [Lk, Hkv, D] -> [Lq, Hq, D] in fp32. Causal: the queries are the last Lq keys."""
    group = q.shape[1] // k.shape[1]
    qf = q.float().transpose(0, 1)  # [Hq, Lq, D]
    kf = k.float().repeat_interleave(group, dim=1).transpose(0, 1)
    vf = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = torch.matmul(qf, kf.transpose(1, 2)) * scale  # [Hq, Lq, Lk]
    if causal:
        lq, lk = q.shape[0], k.shape[0]
        q_pos = torch.arange(lk - lq, lk, device=q.device)[:, None]
        scores = scores.masked_fill(torch.arange(lk, device=q.device)[None, :] > q_pos, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), vf).transpose(0, 1)


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
    """Varlen causal attention over the paged cache, prior context included.

    q [T, Hq, D] packs B sequences (cu_seqlens_q [B+1]); sequence i's queries are the last
    cu_seqlens_q[i+1]-cu_seqlens_q[i] of its seq_lens[i] tokens, whose K/V are already in the
    arena. block_tables [B, max_blocks] int32. max_seqlen_q (host int) sizes a kernel's grid;
    unused here, as is invariant (one sequence at a time is batch-invariant already). Returns [T, Hq, D].
    """
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    for i in range(len(lens)):
        k, v = gather_kv(kv_arena, layer, block_tables[i], lens[i])
        out[cu[i] : cu[i + 1]] = _attend(q[cu[i] : cu[i + 1]], k, v, scale, causal=True).to(q.dtype)
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
    """One query per sequence. q [B, Hq, D], seq_lens [B] (0 = padded row, output zeros) -> [B, Hq, D].
    invariant: the kernels' batch-invariant splits; one sequence at a time here is invariant already."""
    out = torch.zeros_like(q)
    for i, n in enumerate(seq_lens.tolist()):
        if n > 0:
            k, v = gather_kv(kv_arena, layer, block_tables[i], n)
            out[i] = _attend(q[i : i + 1], k, v, scale, causal=False)[0].to(q.dtype)
    return out


def attention_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Non-causal attention for the vision tower. q/k/v [B, N, H, D] -> [B, N, H, D]."""
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))  # [B, H, N, D]
    probs = torch.softmax(torch.matmul(qf, kf.transpose(-1, -2)) * scale, dim=-1)
    return torch.matmul(probs, vf).transpose(1, 2).to(q.dtype)


# ----------------------------------------------------------------------------- sampling


_MASK32 = 0xFFFFFFFF


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3 finaliser on uint32 values held in int64 (products wrap; the low 32 bits are exact)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def random_uniform(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Counter-based uniform in [0, 1) from (seed, step), int64 tensors [B] -> fp32 [B].

    The same function runs in the CUDA sampler, so a request's draws depend only on its
    seed and its step, never on the batch it shares."""
    s = seeds.long()
    seed32 = (s & _MASK32) ^ _fmix32((s >> 32) & _MASK32)
    x = _fmix32(seed32 ^ _fmix32((steps.long() + 0x9E3779B9) & _MASK32))
    return (x >> 8).float() * (1.0 / (1 << 24))


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    steps: torch.Tensor,
) -> torch.Tensor:
    """logits [B, V] -> token ids [B] int64.

    Per row: temperature 0 = greedy (argmax, first index on ties); otherwise softmax(logits / T),
    keep the top_k most likely (0 = all), then the smallest prefix whose mass reaches top_p,
    and draw by inverse CDF with random_uniform(seed, step).
    """
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    temp = temperature.float().clamp_min(1e-5)[:, None]
    probs = torch.softmax(logits / temp, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(probs.shape[1], device=probs.device)[None, :]
    k = torch.where(top_k > 0, top_k, probs.shape[1]).to(rank.device)[:, None]
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep = (rank < k) & ((mass_before < top_p.float()[:, None]) | (rank == 0))
    kept = torch.where(keep, sorted_probs, 0.0)
    cdf = kept.cumsum(dim=-1)
    u = random_uniform(seeds, steps).to(cdf.device)[:, None] * cdf[:, -1:]
    idx = (cdf <= u).sum(dim=-1, keepdim=True).clamp_max(probs.shape[1] - 1)
    # Never land on a dropped entry (u rounding at the end of the cdf).
    idx = torch.minimum(idx, keep.sum(dim=-1, keepdim=True) - 1)
    drawn = order.gather(1, idx)[:, 0]
    return torch.where(temperature > 0, drawn, greedy)


def apply_penalties(
    logits: torch.Tensor,
    counts: torch.Tensor,
    prompt_mask: torch.Tensor,
    slots: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
    repetition: torch.Tensor,
) -> torch.Tensor:
    """Penalized copy of logits [B, V] fp32 (vLLM's order; HF's repetition penalty).

    counts [S, V] int32 (how often each token was generated) and prompt_mask [S, V] bool/uint8
    (token occurs in the prompt) are the state of slot slots[b] ([B] int64); a row whose slot is
    -1 (or >= S) is returned unchanged. presence / frequency / repetition [B] fp32. Per row, for
    a token seen in the prompt or the output: x > 0 ? x / repetition : x * repetition; then
    x -= frequency * count and x -= presence * (count > 0).
    """
    if not bool(((slots >= 0) & (slots < counts.shape[0])).any()):
        return logits  # no row uses penalties: nothing to compute or copy
    logits = logits.float()
    valid = ((slots >= 0) & (slots < counts.shape[0]))[:, None]
    rows = torch.where(valid[:, 0], slots, 0)
    row_counts = counts[rows]  # [B, V]
    generated = row_counts > 0
    seen = prompt_mask[rows].bool() | generated
    rep = repetition.float()[:, None]
    out = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    out = out - frequency.float()[:, None] * row_counts.float()
    out = out - presence.float()[:, None] * generated.float()
    return torch.where(valid, out, logits)


def record_tokens(counts: torch.Tensor, slots: torch.Tensor, tokens: torch.Tensor) -> None:
    """counts[slots[b], tokens[b]] += 1 (in place) for every row with 0 <= slot < S and 0 <= token < V.

    counts [S, V] int32, slots [B] int64 (-1 = no penalty state), tokens [B] int64."""
    valid = (slots >= 0) & (slots < counts.shape[0]) & (tokens >= 0) & (tokens < counts.shape[1])
    if not bool(valid.any()):
        return
    index = (torch.where(valid, slots, 0), torch.where(valid, tokens, 0))
    counts.index_put_(index, valid.to(counts.dtype), accumulate=True)


# ----------------------------------------------------------------------------- linear (decode GEMMs)


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ w [N, K]^T (+ bias [N]) -> [..., N]: F.linear, i.e. cuBLAS on a GPU."""
    return F.linear(x, w, bias)


def gate_up_silu(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Fused gate | up projection and activation: silu_and_mul(linear(x, w)), w [2I, K] -> [..., I].

    gate and up are rounded to x.dtype (the GEMM's output), then silu_and_mul rounds as above."""
    return silu_and_mul(F.linear(x, w))
