"""Benchmarks of paged prefill and dense (vision) attention at LLaVA-1.5-7B shapes vs torch SDPA.

    python -m epd_kernels.attn_varlen.bench      # measures its own GEMM ceiling and prints the table

FLOPs: 4 * Lq * Lk * D * H per sequence (two GEMMs), halved for causal prefill (Lq = Lk).
The peer is SDPA (flash) on contiguous K/V; ours reads K/V through a shuffled block table.
Seen on one H100 (bf16, rotated inputs; ours vs SDPA flash in the same run): causal prefill 1x640
59 TFLOP/s (1.02x), 8x640 125 TFLOP/s (0.83x); vision 1x577 53 TFLOP/s (1.7x), 16x577 159 TFLOP/s (1.0x).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from epd_kernels import _epd_C
from epd_kernels.bench_utils import gemm_tflops, num_sets, require_cuda, time_isolated_ms


def _prefill_case(batch: int, seq: int, heads: int, head_dim: int, block_size: int = 16) -> tuple[list, list]:
    """(ours, peer) closures over rotated random inputs for `batch` fresh prompts of `seq` tokens."""
    dt = torch.bfloat16
    tokens = batch * seq
    blocks = batch * math.ceil(seq / block_size)
    set_bytes = 2 * (tokens * heads * head_dim * 3)
    ours, peer = [], []
    for _ in range(num_sets(set_bytes, cap=8)):
        q = torch.randn(tokens, heads, head_dim, device="cuda", dtype=dt)
        arena = torch.randn(blocks, 1, 2, block_size, heads, head_dim, device="cuda", dtype=dt)
        tables = torch.randperm(blocks, device="cuda", dtype=torch.int32).view(batch, -1)
        cu = torch.arange(0, tokens + 1, seq, device="cuda", dtype=torch.int32)
        lens = torch.full((batch,), seq, device="cuda", dtype=torch.int32)
        out = torch.empty_like(q)
        scale = head_dim**-0.5
        ours.append(
            lambda o=out, q=q, a=arena, c=cu, n=lens, t=tables, s=scale: _epd_C.paged_attention_prefill(
                o, q, a, 0, c, n, t, s, seq
            )
        )
        qp = q.view(batch, seq, heads, head_dim).transpose(1, 2)
        kp = torch.randn_like(qp)
        vp = torch.randn_like(qp)
        peer.append(lambda q=qp, k=kp, v=vp, s=scale: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=s))
    return ours, peer


def _dense_case(batch: int, n: int, heads: int, head_dim: int) -> tuple[list, list]:
    dt = torch.bfloat16
    set_bytes = 2 * batch * n * heads * head_dim * 4
    ours, peer = [], []
    for _ in range(num_sets(set_bytes, cap=8)):
        qkv = torch.randn(batch, n, 3, heads, head_dim, device="cuda", dtype=dt)
        q, k, v = qkv.unbind(2)
        out = torch.empty(q.shape, device="cuda", dtype=dt)
        scale = head_dim**-0.5
        ours.append(lambda o=out, q=q, k=k, v=v, s=scale: _epd_C.attention_dense(o, q, k, v, s))
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        peer.append(lambda q=qt, k=kt, v=vt, s=scale: F.scaled_dot_product_attention(q, k, v, scale=s))
    return ours, peer


def run(ceilings: dict) -> list[dict]:
    """Rows {case, ms, achieved, unit, ceiling, pct, peer_ms, peer} at LLaVA-1.5-7B shapes."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ceiling = ceilings["gemm_TFLOPs"]
    rows = []
    cases = [
        ("prefill causal 1x640 H32 D128 (paged, bs16)", 640 * 640 * 128 * 32 * 2, _prefill_case(1, 640, 32, 128)),
        ("prefill causal 8x640 H32 D128 (paged, bs16)", 8 * 640 * 640 * 128 * 32 * 2, _prefill_case(8, 640, 32, 128)),
        ("vision dense 1x577 H16 D64", 577 * 577 * 64 * 16 * 4, _dense_case(1, 577, 16, 64)),
        ("vision dense 8x577 H16 D64", 8 * 577 * 577 * 64 * 16 * 4, _dense_case(8, 577, 16, 64)),
        ("vision dense 16x577 H16 D64", 16 * 577 * 577 * 64 * 16 * 4, _dense_case(16, 577, 16, 64)),
    ]
    # peers: SDPA's flash backend (FlashAttention-2), and its cuDNN backend where this torch has it
    # (on Hopper the candidate to beat: the tower's attention is 22% of its time, docs/benchmarks.md)
    backends = [("torch SDPA flash", SDPBackend.FLASH_ATTENTION)]
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        backends.append(("torch SDPA cuDNN", SDPBackend.CUDNN_ATTENTION))
    for name, flops, (ours, peer) in cases:
        ms = time_isolated_ms(ours, reps=30)
        achieved = flops / ms / 1e9
        for label, backend in backends:
            try:
                with sdpa_kernel(backend):
                    peer_ms = time_isolated_ms(peer, reps=30)
            except RuntimeError as e:  # this backend does not take the case (or is not built in)
                print(f"{name}: {label} unavailable: {str(e).splitlines()[0][:120]}")
                continue
            rows.append(dict(case=name, ms=ms, achieved=achieved, unit="TFLOP/s", ceiling=ceiling,
                             pct=100 * achieved / ceiling, peer_ms=peer_ms, peer=label))
    return rows


if __name__ == "__main__":
    require_cuda()
    table = run({"gemm_TFLOPs": gemm_tflops()})
    print(f"{'case':46s} {'ms':>8s} {'TFLOP/s':>8s} {'%ceil':>6s} {'peer ms':>8s} {'vs peer':>7s}  peer")
    for r in table:
        print(
            f"{r['case']:46s} {r['ms']:8.4f} {r['achieved']:8.1f} {r['pct']:6.1f} {r['peer_ms']:8.4f} "
            f"{r['peer_ms'] / r['ms']:7.2f}x  {r['peer']}"
        )
