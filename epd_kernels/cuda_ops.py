"""The `cuda` backend: our kernels (epd_kernels._epd_C) behind the same function names as
epd_kernels/reference.py. linear / gate_up_silu run the small-batch GEMV kernels for decode (M <= 8)
and fall back to F.linear (cuBLAS) for other shapes."""

from __future__ import annotations

from epd_kernels.attn_varlen import attention_dense, paged_attention_decode, paged_attention_prefill
from epd_kernels.elementwise import embed_tokens, gelu, quick_gelu, silu_and_mul
from epd_kernels.gemv import gate_up_silu, linear
from epd_kernels.rmsnorm_rope import add_layer_norm, add_rms_norm, layer_norm, rms_norm, rope_and_cache_write
from epd_kernels.sampling import apply_penalties, record_tokens, sample

__all__ = [
    "add_layer_norm", "add_rms_norm", "apply_penalties", "attention_dense", "embed_tokens", "gate_up_silu", "gelu",
    "layer_norm", "linear", "paged_attention_decode", "paged_attention_prefill", "quick_gelu", "record_tokens",
    "rms_norm", "rope_and_cache_write", "sample", "silu_and_mul",
]
