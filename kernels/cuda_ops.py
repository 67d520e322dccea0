"""The `cuda` backend: our kernels (kernels._epd_C) behind the same function names as
kernels/reference.py. GEMMs stay in the model (F.linear -> cuBLAS)."""

from __future__ import annotations

from kernels.attn_varlen import attention_dense, paged_attention_decode, paged_attention_prefill
from kernels.elementwise import embed_tokens, gelu, quick_gelu, silu_and_mul
from kernels.rmsnorm_rope import add_rms_norm, layer_norm, rms_norm, rope_and_cache_write
from kernels.sampling import sample

__all__ = [
    "add_rms_norm", "attention_dense", "embed_tokens", "gelu", "layer_norm", "paged_attention_decode",
    "paged_attention_prefill", "quick_gelu", "rms_norm", "rope_and_cache_write", "sample", "silu_and_mul",
]
