"""Benchmark of split-KV paged decode attention at LLaVA-1.5-7B shapes (32 heads x 128) vs torch SDPA.

    python -m epd_kernels.attn_varlen.decode_bench     # measures its own copy ceiling and prints the table

Bytes: the K/V actually read (seq_len * Hkv * D * 2 (K and V) * 2 bytes per sequence) + q + out.
Napkin math: decode is a stream over K/V, so at the copy ceiling (~2.95 TB/s on H100) B=8 x 2048
tokens x 32 heads x 128 (268 MB) takes ~91 us and B=1 x 640 (10.5 MB) ~3.6 us; the short cases
cannot reach the ceiling because launch + pipeline fill (~3-5 us) and the split reduction dominate.
The peer is SDPA on contiguous K/V of the same sizes (no paging); ours reads through a shuffled table.
Both are timed as CUDA-graph replays (decode runs under graphs), so host launch overhead is excluded.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from epd_kernels import _epd_C
from epd_kernels.bench_utils import copy_bandwidth_GBps, num_sets, require_cuda, row, time_graph_ms

HEAD_DIM = 128
BLOCK_SIZE = 16


def _decode_case(batch: int, ctx: int, hq: int, hkv: int) -> tuple[list, list, int]:
    """(ours, peer, bytes) over rotated random inputs: `batch` sequences of `ctx` cached tokens."""
    dt, d = torch.bfloat16, HEAD_DIM
    blocks = batch * math.ceil(ctx / BLOCK_SIZE)
    kv_bytes = batch * ctx * hkv * d * 2 * 2
    nbytes = kv_bytes + 2 * batch * hq * d * 2
    sets = num_sets(kv_bytes, cap=16)
    scale = d**-0.5
    arena = torch.randn(sets * blocks, 1, 2, BLOCK_SIZE, hkv, d, device="cuda", dtype=dt)
    lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    ours, peer = [], []
    for i in range(sets):
        q = torch.randn(batch, hq, d, device="cuda", dtype=dt)
        out = torch.empty_like(q)
        tables = (i * blocks + torch.randperm(blocks, device="cuda", dtype=torch.int32)).view(batch, -1)
        ours.append(lambda o=out, q=q, t=tables: _epd_C.paged_attention_decode(o, q, arena, 0, lens, t, scale))
        qp = q[:, :, None]  # [B, Hq, 1, D]
        kp = torch.randn(batch, hkv, ctx, d, device="cuda", dtype=dt)
        vp = torch.randn_like(kp)
        peer.append(lambda q=qp, k=kp, v=vp: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=hq != hkv))
    return ours, peer, nbytes


def run(ceilings: dict) -> list[dict]:
    """Rows {case, ms, achieved, unit, ceiling, pct, peer_ms, peer}; bytes = K/V read + q + out."""
    shapes = [(b, ctx, 32, 32) for b in (1, 8, 32) for ctx in (640, 2048)] + [(8, 2048, 32, 8)]
    rows = []
    for batch, ctx, hq, hkv in shapes:
        ours, peer, nbytes = _decode_case(batch, ctx, hq, hkv)
        ms = time_graph_ms(ours, repeats=20, min_calls=32)
        peer_ms = time_graph_ms(peer, repeats=20, min_calls=32)
        case = f"decode B={batch} ctx={ctx} H={hq}/{hkv} D={HEAD_DIM} (paged, bs{BLOCK_SIZE})"
        rows.append(row(case, ms, nbytes, ceilings, peer_ms, "torch SDPA (contiguous K/V)"))
        del ours, peer
        torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    require_cuda()
    copy = copy_bandwidth_GBps()
    print(f"copy ceiling {copy:.0f} GB/s")
    print(f"{'case':52s} {'ms':>8s} {'GB/s':>7s} {'%ceil':>6s} {'napkin ms':>9s} {'peer ms':>8s} {'vs peer':>7s}")
    for r in run({"copy_GBps": copy}):
        napkin = r["achieved"] * r["ms"] / copy  # bytes / ceiling, in ms
        print(
            f"{r['case']:52s} {r['ms']:8.4f} {r['achieved']:7.0f} {r['pct']:6.1f} {napkin:9.4f} "
            f"{r['peer_ms']:8.4f} {r['peer_ms'] / r['ms']:7.2f}x"
        )
