"""Llama / Mistral decoder over the paged KV arena.

Weights are fused at load: qkv_proj = [q; k; v] rows, gate_up_proj = [gate; up] rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from engine.config import TextConfig


@dataclass
class AttentionMetadata:
    """Where each token of a batch lives in the paged KV arena."""

    is_prefill: bool
    slot_mapping: torch.Tensor  # [T] int64, block * block_size + offset; -1 = skip
    seq_lens: torch.Tensor  # [B] int32, tokens in the cache once this step is written
    block_tables: torch.Tensor  # [B, max_blocks] int32
    cu_seqlens_q: torch.Tensor | None = None  # [B+1] int32, prefill only
    max_seqlen_q: int = 1  # longest query run in the batch (host int; sizes the prefill grid)


def _weight(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class LlamaLayer(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.input_layernorm = _weight(cfg.hidden_size)
        self.qkv_proj = _weight(q_size + 2 * kv_size, cfg.hidden_size)
        self.o_proj = _weight(cfg.hidden_size, q_size)
        self.post_attention_layernorm = _weight(cfg.hidden_size)
        self.gate_up_proj = _weight(2 * cfg.intermediate_size, cfg.hidden_size)
        self.down_proj = _weight(cfg.hidden_size, cfg.intermediate_size)

    def forward(
        self,
        ops: ModuleType,
        layer: int,
        hidden: torch.Tensor,  # [T, H]
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        cos_sin: torch.Tensor,
        meta: AttentionMetadata,
        kv_arena: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        eps = cfg.rms_norm_eps
        if residual is None:
            residual, hidden = hidden, ops.rms_norm(hidden, self.input_layernorm, eps)
        else:
            hidden, residual = ops.add_rms_norm(hidden, residual, self.input_layernorm, eps)
        qkv = ops.linear(hidden, self.qkv_proj)
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, cfg.num_heads, cfg.head_dim)
        k = k.view(-1, cfg.num_kv_heads, cfg.head_dim)
        v = v.view(-1, cfg.num_kv_heads, cfg.head_dim)
        q = ops.rope_and_cache_write(q, k, v, positions, cos_sin, kv_arena, layer, meta.slot_mapping)
        scale = cfg.head_dim**-0.5
        if meta.is_prefill:
            attn = ops.paged_attention_prefill(
                q, kv_arena, layer, meta.cu_seqlens_q, meta.seq_lens, meta.block_tables, scale, meta.max_seqlen_q
            )
        else:
            attn = ops.paged_attention_decode(q, kv_arena, layer, meta.seq_lens, meta.block_tables, scale)
        hidden = ops.linear(attn.reshape(-1, q_size), self.o_proj)
        hidden, residual = ops.add_rms_norm(hidden, residual, self.post_attention_layernorm, eps)
        hidden = ops.linear(ops.gate_up_silu(hidden, self.gate_up_proj), self.down_proj)
        return hidden, residual


class LlamaModel(nn.Module):
    """Decoder stack + final norm + LM head."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = _weight(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = _weight(cfg.hidden_size)
        self.lm_head = self.embed_tokens if cfg.tie_word_embeddings else _weight(cfg.vocab_size, cfg.hidden_size)
        self.register_buffer("cos_sin", torch.empty(0), persistent=False)

    def init_rope(self, max_positions: int) -> None:
        from epd_kernels.reference import rope_cos_sin

        table = rope_cos_sin(self.cfg.rope.inv_freq(self.cfg.head_dim), max_positions)
        self.cos_sin = table.to(self.embed_tokens.device)

    def forward(
        self,
        ops: ModuleType,
        input_embeds: torch.Tensor,  # [T, H]
        positions: torch.Tensor,  # [T] int64
        meta: AttentionMetadata,
        kv_arena: torch.Tensor,
        after_layer: Callable[[int], None] | None = None,  # called with each layer's index once it is launched
    ) -> torch.Tensor:
        """Returns the final-normed hidden states [T, H]."""
        hidden, residual = input_embeds, None
        for i, layer in enumerate(self.layers):
            hidden, residual = layer(ops, i, hidden, residual, positions, self.cos_sin, meta, kv_arena)
            if after_layer is not None:
                after_layer(i)
        hidden, _ = ops.add_rms_norm(hidden, residual, self.norm, self.cfg.rms_norm_eps)
        return hidden

    def compute_logits(self, ops: ModuleType, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, H] -> fp32 logits [B, V]."""
        return ops.linear(hidden, self.lm_head).float()
