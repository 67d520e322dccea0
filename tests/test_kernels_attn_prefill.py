"""CUDA paged prefill and dense attention vs the fp32 torch reference (epd_kernels/reference.py).

Pass criterion (flash-attention style): max |kernel - ref32| <= 2 * max |torch SDPA in the same
low precision - ref32| + 1e-5, on fresh random inputs, shuffled block tables, mixed lengths,
prior context, GQA and MHA; outputs are poisoned with NaN first and must be fully written.
"""

from __future__ import annotations

import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from epd_kernels import reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

try:
    from epd_kernels import _epd_C
except ImportError:  # extension not built: every test skips
    _epd_C = None

ROOT = Path(__file__).resolve().parents[1]
needs_ext = pytest.mark.skipif(_epd_C is None, reason="epd_kernels._epd_C is not built")

DTYPES = [torch.bfloat16, torch.float16]
HEAD_DIMS = [64, 80, 96, 128]
LENGTHS = [1, 7, 97, 577, 1025]


def _check(name: str, out: torch.Tensor, peer: torch.Tensor, ref: torch.Tensor) -> None:
    """Kernel error <= 2x the low-precision torch peer's error + 1e-5; every element written."""
    nan = torch.isnan(out)
    assert not nan.any(), f"{name}: {int(nan.sum())} elements not written (NaN), first at {nan.nonzero()[0].tolist()}"
    err = (out.float() - ref).abs()
    peer_err = (peer.float() - ref).abs().max().item()
    tol = 2 * peer_err + 1e-5
    worst = err.max().item()
    if worst > tol:
        idx = torch.topk(err.flatten(), min(5, err.numel())).indices
        lines = []
        for i in idx.tolist():
            pos = list(torch.unravel_index(torch.tensor(i), err.shape))
            lines.append(
                f"  at {[int(p) for p in pos]}: got {out.flatten()[i].item():.6f}, ref {ref.flatten()[i].item():.6f}"
            )
        raise AssertionError(
            f"{name}: max err {worst:.3e} > tol {tol:.3e} (peer err {peer_err:.3e})\n" + "\n".join(lines)
        )


# ----------------------------------------------------------------------------- paged prefill


def _make_prefill(
    seqs: list[tuple[int, int]], hq: int, hkv: int, d: int, dtype: torch.dtype, block_size: int, seed: int
) -> dict:
    """seqs = [(seq_len, q_len)]: a shuffled arena holding every sequence's K/V, and q for the new tokens."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    num_layers, layer = 2, 1
    blocks = [math.ceil(n / block_size) for n, _ in seqs]
    num_blocks = sum(blocks) + 3
    arena = torch.randn(num_blocks, num_layers, 2, block_size, hkv, d, generator=gen, device="cuda").to(dtype)
    perm = torch.randperm(num_blocks, generator=gen, device="cuda").to(torch.int32)
    tables = torch.full((len(seqs), max(blocks) + 2), -1, dtype=torch.int32, device="cuda")  # -1: never read
    start = 0
    for i, nb in enumerate(blocks):
        tables[i, :nb] = perm[start : start + nb]
        start += nb
    q_lens = [lq for _, lq in seqs]
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q = torch.randn(sum(q_lens), hq, d, generator=gen, device="cuda").to(dtype)
    seq_lens = torch.tensor([n for n, _ in seqs], dtype=torch.int32, device="cuda")
    return dict(
        q=q,
        kv_arena=arena,
        layer=layer,
        cu_seqlens_q=cu,
        seq_lens=seq_lens,
        block_tables=tables,
        scale=d**-0.5,
        max_seqlen_q=max(q_lens),
    )


def _sdpa_prefill(c: dict) -> torch.Tensor:
    """The low-precision torch peer: SDPA per sequence (bottom-right causal) on gathered K/V."""
    from torch.nn.attention.bias import causal_lower_right

    q = c["q"]
    out = torch.empty_like(q)
    cu, lens = c["cu_seqlens_q"].tolist(), c["seq_lens"].tolist()
    for i, n in enumerate(lens):
        k, v = reference.gather_kv(c["kv_arena"], c["layer"], c["block_tables"][i], n)
        group = q.shape[1] // k.shape[1]
        qi = q[cu[i] : cu[i + 1]].transpose(0, 1)[None]
        ki = k.repeat_interleave(group, dim=1).transpose(0, 1)[None]
        vi = v.repeat_interleave(group, dim=1).transpose(0, 1)[None]
        mask = causal_lower_right(qi.shape[2], n)
        out[cu[i] : cu[i + 1]] = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=c["scale"])[
            0
        ].transpose(0, 1)
    return out


def _run_prefill(name: str, c: dict) -> None:
    ref = reference.paged_attention_prefill(
        c["q"].float(),
        c["kv_arena"].float(),
        c["layer"],
        c["cu_seqlens_q"],
        c["seq_lens"],
        c["block_tables"],
        c["scale"],
    )
    out = torch.full_like(c["q"], float("nan"))
    _epd_C.paged_attention_prefill(
        out,
        c["q"],
        c["kv_arena"],
        c["layer"],
        c["cu_seqlens_q"],
        c["seq_lens"],
        c["block_tables"],
        c["scale"],
        c["max_seqlen_q"],
    )
    torch.cuda.synchronize()
    _check(name, out, _sdpa_prefill(c), ref)


def _mixed_seqs(batch: int, seed: int) -> list[tuple[int, int]]:
    """Lengths from LENGTHS; about half the sequences have prior context (q_len < seq_len)."""
    rng = random.Random(seed)
    seqs = []
    for _ in range(batch):
        n = rng.choice(LENGTHS)
        seqs.append((n, n if rng.random() < 0.5 else rng.randint(1, n)))
    return seqs


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("heads", [(32, 8), (32, 32)], ids=["gqa32/8", "mha32"])
def test_prefill_mixed_batch(dtype: torch.dtype, head_dim: int, heads: tuple[int, int]) -> None:
    for batch, seed in [(1, 1), (3, 2), (17, 3)]:
        seqs = _mixed_seqs(batch, seed + head_dim)
        c = _make_prefill(seqs, *heads, head_dim, dtype, block_size=16, seed=seed)
        _run_prefill(f"B={batch} seqs={seqs}", c)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(32, 8), (32, 32)], ids=["gqa32/8", "mha32"])
def test_prefill_long(dtype: torch.dtype, heads: tuple[int, int]) -> None:
    c = _make_prefill([(4096, 4096)], *heads, 128, dtype, block_size=16, seed=11)
    _run_prefill("4096 tokens", c)
    c = _make_prefill([(4096, 1000), (1, 1), (577, 577), (1025, 3)], *heads, 128, dtype, block_size=16, seed=12)
    _run_prefill("4096 with 3096 of context + mixed", c)


@needs_ext
@pytest.mark.parametrize("block_size", [8, 16, 32, 64, 128])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_prefill_block_sizes(block_size: int, head_dim: int) -> None:
    seqs = [(97, 97), (1025, 500), (7, 1), (577, 64), (130, 130)]
    c = _make_prefill(seqs, 8, 2, head_dim, torch.bfloat16, block_size, seed=block_size)
    _run_prefill(f"block_size={block_size}", c)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_single_query_rows(dtype: torch.dtype) -> None:
    """q_len 1 everywhere (a decode step through the prefill path), GQA group 4 and 8."""
    for hq, hkv in [(32, 8), (32, 4)]:
        seqs = [(n, 1) for n in [1, 7, 97, 577, 1025, 4096, 64, 65, 15, 16, 17, 128, 200, 31, 33, 1000, 2]]
        c = _make_prefill(seqs, hq, hkv, 128, dtype, block_size=16, seed=hq + hkv)
        _run_prefill(f"q_len=1 group={hq // hkv}", c)


@needs_ext
def test_prefill_wrapper_and_grid_bound() -> None:
    """The Python wrapper (max_seqlen_q computed there) and a generous host-side max_seqlen_q."""
    from epd_kernels import attn_varlen

    c = _make_prefill([(300, 200), (50, 50), (1025, 1)], 32, 8, 96, torch.float16, block_size=32, seed=5)
    args = [c[k] for k in ("q", "kv_arena", "layer", "cu_seqlens_q", "seq_lens", "block_tables", "scale")]
    ref = reference.paged_attention_prefill(c["q"].float(), c["kv_arena"].float(), *args[2:])
    peer = _sdpa_prefill(c)
    _check("wrapper, max_seqlen_q=None", attn_varlen.paged_attention_prefill(*args), peer, ref)
    _check("wrapper, max_seqlen_q=4096", attn_varlen.paged_attention_prefill(*args, 4096), peer, ref)


_BAD_INPUT = """
import torch
from epd_kernels import _epd_C
q = torch.randn(10, 4, 32, device="cuda", dtype=torch.bfloat16)  # head_dim 32: no kernel
arena = torch.randn(2, 1, 2, 16, 2, 32, device="cuda", dtype=torch.bfloat16)
i32 = dict(device="cuda", dtype=torch.int32)
cu, lens, tables = torch.tensor([0, 10], **i32), torch.tensor([10], **i32), torch.zeros(1, 1, **i32)
try:
    _epd_C.paged_attention_prefill(torch.empty_like(q), q, arena, 0, cu, lens, tables, 0.1, 10)
except RuntimeError as e:
    print("raised:", e)
"""


@needs_ext
def test_prefill_rejects_bad_input() -> None:
    """A bad argument raises RuntimeError naming it. Runs in a subprocess so that a crash while
    throwing (seen with JIT-built extensions on the device machine) fails this test only."""
    proc = subprocess.run([sys.executable, "-c", _BAD_INPUT], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0 and "raised:" in proc.stdout and "head_dim" in proc.stdout, (
        f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr[-2000:]}"
    )


# ----------------------------------------------------------------------------- dense (vision)


def _make_dense(b: int, n: int, h: int, d: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    """q, k, v [B, N, H, D] as views into one fused qkv [B, N, 3, H, D], as the CLIP layer makes them."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(b, n, 3, h, d, generator=gen, device="cuda").to(dtype)
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


def _run_dense(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> None:
    ref = reference.attention_dense(q.float(), k.float(), v.float(), scale)
    peer = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)
    _epd_C.attention_dense(out, q, k, v, scale)
    torch.cuda.synchronize()
    _check(name, out, peer.transpose(1, 2), ref)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_dense(dtype: torch.dtype, head_dim: int) -> None:
    for b, n, h in [(1, 577, 16), (3, 97, 16), (17, 7, 4), (2, 1, 3), (2, 1025, 8), (16, 577, 16)]:
        q, k, v = _make_dense(b, n, h, head_dim, dtype, seed=b * n + h)
        _run_dense(f"B={b} N={n} H={h}", q, k, v, head_dim**-0.5)


@needs_ext
def test_dense_wrapper_small_head_dim_falls_back() -> None:
    """head_dim 16 (tiny test model) runs the torch reference through the same wrapper."""
    from epd_kernels import attn_varlen

    q, k, v = _make_dense(2, 37, 4, 16, torch.bfloat16, seed=0)
    out = attn_varlen.attention_dense(q, k, v, 0.25)
    torch.testing.assert_close(out, reference.attention_dense(q, k, v, 0.25))
    q, k, v = _make_dense(2, 37, 4, 64, torch.bfloat16, seed=1)
    out = attn_varlen.attention_dense(q, k, v, 0.125)
    peer = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=0.125)
    _check("wrapper D=64", out, peer.transpose(1, 2), reference.attention_dense(q.float(), k.float(), v.float(), 0.125))
