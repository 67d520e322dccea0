"""CUDA rms_norm / add_rms_norm / layer_norm / add_layer_norm / rope_and_cache_write against epd_kernels/reference.py.

Each case: fresh seeded random inputs, outputs poisoned with NaN, the kernel compared with the fp32
reference on upcast inputs (abs + rel tolerance, first failures printed) and its worst error held
to <= 2x the error of the same reference run in the low-precision dtype (the torch peer) + 1e-5.
"""

from __future__ import annotations

import math

import pytest
import torch

from epd_kernels import reference as ref

try:
    from epd_kernels import _epd_C
except ImportError:
    _epd_C = None

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(_epd_C is None, reason="epd_kernels._epd_C is not built"),
]

DTYPES = [torch.bfloat16, torch.float16]
TOKENS = [1, 7, 97, 577, 1025]
# 64: many rows per warp; 512: a warp per row; 1024-5120: a block per row (2 vectors per thread);
# 12288: 4 vectors per thread; 100: not a multiple of 8 -> the one-element-per-access path.
HIDDEN = [64, 100, 512, 1024, 4096, 5120, 12288]
HEAD_DIMS = [64, 80, 96, 128]
HEADS = [(32, 32), (32, 8), (12, 4)]  # (Hq, Hkv): MHA and GQA


def unit_roundoff(dtype: torch.dtype) -> float:
    return 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11


def generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


def randn(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator, scale: float = 1.0, shift: float = 0.0):
    return (torch.randn(shape, generator=gen, device="cuda") * scale + shift).to(dtype)


def poisoned(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device="cuda")


def check_close(
    name: str, out: torch.Tensor, ref32: torch.Tensor, peer: torch.Tensor, atol: float | torch.Tensor, rtol: float
) -> None:
    """Elementwise |out - ref32| <= atol + rtol * |ref32|, no NaN (every element written), and the
    worst error at most 2x the torch peer's worst error + 1e-5."""
    if out.numel() == 0:
        return
    out32 = out.float()
    unwritten = torch.isnan(out32)
    assert not unwritten.any(), f"{name}: {int(unwritten.sum())} elements not written (NaN), first at " + str(
        unwritten.nonzero()[:4].tolist()
    )
    err = (out32 - ref32).abs()
    tol = atol + rtol * ref32.abs()
    bad = err > tol
    if bad.any():
        lines = [f"{name}: {int(bad.sum())} / {out.numel()} elements out of tolerance; first failures:"]
        for idx in bad.nonzero()[:8].tolist():
            i = tuple(idx)
            lines.append(f"  {i}: got {out32[i].item():.6g}, ref {ref32[i].item():.6g}, tol {tol[i].item():.3g}")
        raise AssertionError("\n".join(lines))
    worst, peer_worst = err.max().item(), (peer.float() - ref32).abs().max().item()
    assert worst <= 2 * peer_worst + 1e-5, f"{name}: max error {worst:.3g} > 2 x torch peer's {peer_worst:.3g} + 1e-5"


# ----------------------------------------------------------------------------- rms_norm


def norm_input(tokens: int, hidden: int, dtype: torch.dtype, gen: torch.Generator, layout: str, scale: float = 1.0):
    """[T, H] in one of three layouts: contiguous, rows inside a wider buffer (row stride H + 64),
    or a buffer shifted by one element (not 16-byte aligned -> the scalar path)."""
    if layout == "contiguous":
        return randn((tokens, hidden), dtype, gen, scale)
    wide = randn((tokens, hidden + 64), dtype, gen, scale)
    return wide[:, :hidden] if layout == "row_stride" else wide[:, 1 : hidden + 1]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("hidden", HIDDEN)
def test_rms_norm(dtype: torch.dtype, tokens: int, hidden: int) -> None:
    gen = generator(1000 * tokens + hidden)
    x = randn((tokens, hidden), dtype, gen, scale=3.0)
    weight = randn((hidden,), dtype, gen)
    out = poisoned((tokens, hidden), dtype)
    _epd_C.rms_norm(out, x, weight, 1e-5)
    u = unit_roundoff(dtype)
    ref32 = ref.rms_norm(x.float(), weight.float(), 1e-5)
    check_close("rms_norm", out, ref32, ref.rms_norm(x, weight, 1e-5), atol=1e-5, rtol=2.5 * u)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["row_stride", "misaligned"])
@pytest.mark.parametrize("tokens,hidden", [(1, 4096), (97, 4096), (577, 1024), (7, 64), (33, 5120)])
def test_rms_norm_layouts(dtype: torch.dtype, layout: str, tokens: int, hidden: int) -> None:
    gen = generator(7 * tokens + hidden)
    x = norm_input(tokens, hidden, dtype, gen, layout)
    weight = randn((hidden,), dtype, gen)
    out = poisoned((tokens, hidden), dtype)
    _epd_C.rms_norm(out, x, weight, 1e-6)
    ref32 = ref.rms_norm(x.float(), weight.float(), 1e-6)
    check_close(f"rms_norm[{layout}]", out, ref32, ref.rms_norm(x, weight, 1e-6), 1e-5, 2.5 * unit_roundoff(dtype))


# ----------------------------------------------------------------------------- add_rms_norm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("hidden", HIDDEN)
def test_add_rms_norm(dtype: torch.dtype, tokens: int, hidden: int) -> None:
    gen = generator(3000 * tokens + hidden)
    x = randn((tokens, hidden), dtype, gen)
    residual = randn((tokens, hidden), dtype, gen, scale=4.0)
    weight = randn((hidden,), dtype, gen)
    out = poisoned((tokens, hidden), dtype)
    new_residual = residual.clone()
    _epd_C.add_rms_norm(out, new_residual, x, weight, 1e-5)
    # The residual sum is rounded once, exactly like torch's low-precision add.
    expected_residual = x + residual
    assert torch.equal(new_residual, expected_residual), (
        f"residual: {int((new_residual != expected_residual).sum())} elements differ from x + residual"
    )
    ref32, _ = ref.add_rms_norm(x.float(), residual.float(), weight.float(), 1e-5)
    peer, _ = ref.add_rms_norm(x, residual, weight, 1e-5)
    check_close("add_rms_norm", out, ref32, peer, atol=1e-5, rtol=3.5 * unit_roundoff(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["row_stride", "misaligned"])
def test_add_rms_norm_layouts(dtype: torch.dtype, layout: str) -> None:
    gen = generator(11)
    tokens, hidden = 97, 4096
    x = norm_input(tokens, hidden, dtype, gen, layout)
    residual = norm_input(tokens, hidden, dtype, gen, layout, scale=4.0)
    weight = randn((hidden,), dtype, gen)
    expected_residual = x + residual
    out = poisoned((tokens, hidden), dtype)
    _epd_C.add_rms_norm(out, residual, x, weight, 1e-5)
    assert torch.equal(residual, expected_residual)
    ref32 = ref.rms_norm(expected_residual.float(), weight.float(), 1e-5)
    peer = ref.rms_norm(expected_residual, weight, 1e-5)
    check_close(f"add_rms_norm[{layout}]", out, ref32, peer, atol=1e-5, rtol=2.5 * unit_roundoff(dtype))


def test_add_rms_norm_wrapper_is_in_place() -> None:
    from epd_kernels import rmsnorm_rope as ops

    gen = generator(5)
    x = randn((7, 4096), torch.bfloat16, gen)
    residual = randn((7, 4096), torch.bfloat16, gen)
    weight = randn((4096,), torch.bfloat16, gen)
    expected_out, expected_residual = ref.add_rms_norm(x, residual, weight, 1e-5)
    out, new_residual = ops.add_rms_norm(x, residual, weight, 1e-5)
    assert new_residual.data_ptr() == residual.data_ptr(), "new_residual should reuse residual's memory"
    assert torch.equal(new_residual, expected_residual)
    check_close("add_rms_norm wrapper", out, expected_out.float(), expected_out, 1e-5, 2.5 * 2.0**-8)


# ----------------------------------------------------------------------------- layer_norm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("hidden", HIDDEN)
def test_layer_norm(dtype: torch.dtype, tokens: int, hidden: int) -> None:
    gen = generator(5000 * tokens + hidden)
    x = randn((tokens, hidden), dtype, gen, scale=2.0, shift=3.0)  # an offset mean tests the two-pass variance
    weight, bias = randn((hidden,), dtype, gen), randn((hidden,), dtype, gen)
    out = poisoned((tokens, hidden), dtype)
    _epd_C.layer_norm(out, x, weight, bias, 1e-5)
    ref32 = ref.layer_norm(x.float(), weight.float(), bias.float(), 1e-5)
    peer = ref.layer_norm(x, weight, bias, 1e-5)
    check_close("layer_norm", out, ref32, peer, atol=1e-4, rtol=1.5 * unit_roundoff(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("length", [1, 7, 97, 577])
@pytest.mark.parametrize("hidden", [64, 1024])
def test_layer_norm_wrapper_3d(dtype: torch.dtype, batch: int, length: int, hidden: int) -> None:
    from epd_kernels import rmsnorm_rope as ops

    gen = generator(100 * batch + length + hidden)
    x = randn((batch, length, hidden), dtype, gen, scale=2.0, shift=-1.0)
    weight, bias = randn((hidden,), dtype, gen), randn((hidden,), dtype, gen)
    out = ops.layer_norm(x, weight, bias, 1e-5)
    assert out.shape == x.shape and out.dtype == dtype
    ref32 = ref.layer_norm(x.float(), weight.float(), bias.float(), 1e-5)
    check_close("layer_norm 3d", out, ref32, ref.layer_norm(x, weight, bias, 1e-5), 1e-4, 1.5 * unit_roundoff(dtype))


# (layout, tokens, hidden): every shape contiguous, a few in the strided and misaligned layouts
ADD_LAYER_NORM_CASES = [("contiguous", t, h) for t in TOKENS for h in HIDDEN] + [
    (layout, t, h) for layout in ("row_stride", "misaligned") for t, h in [(97, 1024), (577, 4096), (7, 100)]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("layout", "tokens", "hidden"), ADD_LAYER_NORM_CASES)
def test_add_layer_norm_is_the_add_then_layer_norm_bit_for_bit(
    dtype: torch.dtype, layout: str, tokens: int, hidden: int
) -> None:
    """add_layer_norm (the vision tower's residual add fused into the LayerNorm after it): residual
    becomes round(x + residual) in place, out is the layer_norm kernel's output on that sum, bit
    for bit, in every layout (the vectorized and the scalar paths)."""
    gen = generator(7000 * tokens + hidden)
    x = norm_input(tokens, hidden, dtype, gen, layout, scale=2.0)
    residual = norm_input(tokens, hidden, dtype, gen, layout, scale=4.0)
    weight, bias = randn((hidden,), dtype, gen), randn((hidden,), dtype, gen)
    expected_residual = x + residual
    same_layout = norm_input(tokens, hidden, dtype, gen, layout)  # the same path (vector or scalar) as below
    same_layout.copy_(expected_residual)
    expected = poisoned((tokens, hidden), dtype)
    _epd_C.layer_norm(expected, same_layout, weight, bias, 1e-5)
    out = poisoned((tokens, hidden), dtype)
    _epd_C.add_layer_norm(out, residual, x, weight, bias, 1e-5)
    assert torch.equal(residual, expected_residual), "residual is not round(x + residual)"
    assert torch.equal(out, expected), f"{int((out != expected).sum())} outputs differ from layer_norm(x + residual)"
    ref32 = ref.layer_norm(expected_residual.float(), weight.float(), bias.float(), 1e-5)
    check_close("add_layer_norm", out, ref32, ref.layer_norm(expected_residual, weight, bias, 1e-5), 1e-4,
                1.5 * unit_roundoff(dtype))


def test_add_layer_norm_wrapper_is_in_place_and_matches_reference() -> None:
    from epd_kernels import rmsnorm_rope as ops

    gen = generator(9)
    x = randn((3, 577, 1024), torch.bfloat16, gen)
    residual = randn((3, 577, 1024), torch.bfloat16, gen, scale=3.0)
    weight, bias = randn((1024,), torch.bfloat16, gen), randn((1024,), torch.bfloat16, gen)
    want_out, want_residual = ref.add_layer_norm(x, residual, weight, bias, 1e-5)
    out, new_residual = ops.add_layer_norm(x, residual, weight, bias, 1e-5)
    assert new_residual.data_ptr() == residual.data_ptr(), "new_residual should reuse residual's memory"
    assert new_residual.shape == x.shape and torch.equal(new_residual, want_residual)
    check_close("add_layer_norm wrapper", out, ref.layer_norm(want_residual.float(), weight.float(), bias.float(),
                                                              1e-5), want_out, 1e-4, 1.5 * 2.0**-8)


def test_layer_norm_statistics_fp32() -> None:
    """Before the final rounding the kernel matches F.layer_norm in fp32 to ~1e-5 relative: with
    weight 1 and bias 0, every output is within half a bf16 ulp (+2e-5 relative) of torch's fp32
    result, and nearly all equal it rounded to bf16 (ties aside). Offset inputs stress the variance."""
    gen = generator(17)
    x = randn((577 * 8, 1024), torch.bfloat16, gen, scale=5.0, shift=20.0)
    weight = torch.ones(1024, dtype=torch.bfloat16, device="cuda")
    bias = torch.zeros(1024, dtype=torch.bfloat16, device="cuda")
    out = poisoned(tuple(x.shape), torch.bfloat16)
    _epd_C.layer_norm(out, x, weight, bias, 1e-5)
    ref32 = torch.nn.functional.layer_norm(x.float(), (1024,), eps=1e-5)
    check_close("layer_norm fp32 statistics", out, ref32, ref32.to(torch.bfloat16), 1e-6, 2.0**-8 + 2e-5)
    mismatched = (out != ref32.to(torch.bfloat16)).float().mean().item()
    assert mismatched < 1e-2, f"{mismatched:.2%} of outputs differ from fp32 layer_norm rounded to bf16"


# ----------------------------------------------------------------------------- rope_and_cache_write


def rope_case(
    tokens: int, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int, positions_kind: str
):
    """q/k/v as column slices of one fused qkv output, a NaN-filled arena, out-of-order slots with -1s."""
    gen = generator(seed)
    qkv = randn((tokens, (num_q_heads + 2 * num_kv_heads) * head_dim), dtype, gen, scale=2.0)
    q, k, v = qkv.split([num_q_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q = q.view(tokens, num_q_heads, head_dim)
    k = k.view(tokens, num_kv_heads, head_dim)
    v = v.view(tokens, num_kv_heads, head_dim)
    max_positions = 8192
    if positions_kind == "prior_context":  # one sequence continuing after 1000 cached tokens
        positions = torch.arange(1000, 1000 + tokens, device="cuda")
    else:  # tokens of many sequences at unrelated positions
        positions = torch.randint(0, max_positions, (tokens,), generator=gen, device="cuda")
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    cos_sin = ref.rope_cos_sin(inv_freq, max_positions).cuda()
    block_size, num_layers, layer = 16, 3, 1
    num_blocks = math.ceil(2 * tokens / block_size) + 1
    kv_arena = torch.full(
        (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype, device="cuda"
    )
    slot_mapping = torch.randperm(num_blocks * block_size, generator=gen, device="cuda")[:tokens]
    skip = torch.rand(tokens, generator=gen, device="cuda") < 0.15
    if tokens >= 7:
        skip[tokens // 2] = True  # at least one padded token
    slot_mapping = torch.where(skip, -1, slot_mapping)
    return q, k, v, positions, cos_sin, kv_arena, layer, slot_mapping


def rope_tolerance(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bound for rounding cos/sin to dtype: u (|x_i| + |x_partner|), doubled for slack."""
    half = x.shape[-1] // 2
    partner = torch.cat([x[..., half:], x[..., :half]], dim=-1)
    return 2 * unit_roundoff(dtype) * (x.float().abs() + partner.float().abs()) + 1e-5


def check_rope(q, k, v, positions, cos_sin, kv_arena, layer, slot_mapping, q_rot, dtype) -> None:
    u = unit_roundoff(dtype)
    q_ref32 = ref.apply_rope(q.float(), positions, cos_sin)
    check_close("q_rot", q_rot, q_ref32, ref.apply_rope(q, positions, cos_sin), rope_tolerance(q, dtype), 1.5 * u)

    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    block_size = kv_arena.shape[3]
    blocks, offsets = slots // block_size, slots % block_size
    k_ref32 = ref.apply_rope(k.float(), positions, cos_sin)[keep]
    k_peer = ref.apply_rope(k, positions, cos_sin)[keep]
    k_got = kv_arena[blocks, layer, 0, offsets]
    check_close("arena k", k_got, k_ref32, k_peer, rope_tolerance(k[keep], dtype), 1.5 * u)
    v_got = kv_arena[blocks, layer, 1, offsets]
    assert torch.equal(v_got, v[keep]), f"arena v: {int((v_got != v[keep]).sum())} elements differ from v"

    written = torch.zeros(kv_arena.shape[:4], dtype=torch.bool, device="cuda")
    written[blocks, layer, :, offsets] = True
    untouched = kv_arena[~written]
    assert torch.isnan(untouched).all(), (
        f"{int((~torch.isnan(untouched)).sum())} arena elements outside slot_mapping were overwritten"
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("positions_kind", ["prior_context", "random"])
def test_rope_and_cache_write(
    dtype: torch.dtype, tokens: int, head_dim: int, heads: tuple[int, int], positions_kind: str
) -> None:
    num_q_heads, num_kv_heads = heads
    case = rope_case(
        tokens, num_q_heads, num_kv_heads, head_dim, dtype, tokens * 131 + head_dim + num_kv_heads, positions_kind
    )
    q, k, v, positions, cos_sin, kv_arena, layer, slot_mapping = case
    q_rot = poisoned(tuple(q.shape), dtype)
    _epd_C.rope_and_cache_write(q_rot, q, k, v, positions, cos_sin, kv_arena, layer, slot_mapping)
    check_rope(q, k, v, positions, cos_sin, kv_arena, layer, slot_mapping, q_rot, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 97])
def test_rope_wrapper_contiguous_inputs_match_reference_bitwise(dtype: torch.dtype, tokens: int) -> None:
    """Separate contiguous q/k/v through the Python wrapper. The kernel rounds each fp32 op like
    torch's eager reference (no FMA), so q_rot and the whole arena equal the reference bit for bit."""
    from epd_kernels import rmsnorm_rope as ops

    q, k, v, positions, cos_sin, kv_arena, layer, slot_mapping = rope_case(
        tokens, 32, 8, 128, dtype, 99 + tokens, "random"
    )
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    arena_ref = kv_arena.clone()
    q_ref = ref.rope_and_cache_write(q, k, v, positions, cos_sin, arena_ref, layer, slot_mapping)
    q_rot = ops.rope_and_cache_write(q, k, v, positions, cos_sin, kv_arena, layer, slot_mapping)
    assert q_rot.shape == q.shape and q_rot.is_contiguous()
    torch.testing.assert_close(q_rot, q_ref, rtol=0, atol=0)
    torch.testing.assert_close(kv_arena, arena_ref, rtol=0, atol=0, equal_nan=True)


def test_rope_rejects_bad_layouts() -> None:
    q, k, v, positions, cos_sin, kv_arena, layer, slot_mapping = rope_case(7, 8, 8, 128, torch.bfloat16, 3, "random")
    q_rot = poisoned(tuple(q.shape), torch.bfloat16)
    with pytest.raises(RuntimeError, match="head_dim"):
        _epd_C.rope_and_cache_write(
            q_rot[..., :72], q[..., :72], k[..., :72], v[..., :72], positions, cos_sin, kv_arena, layer, slot_mapping
        )
    with pytest.raises(RuntimeError, match="int64"):
        _epd_C.rope_and_cache_write(q_rot, q, k, v, positions.int(), cos_sin, kv_arena, layer, slot_mapping)
    with pytest.raises(RuntimeError, match="layer"):
        _epd_C.rope_and_cache_write(q_rot, q, k, v, positions, cos_sin, kv_arena, 3, slot_mapping)
    with pytest.raises(RuntimeError, match="contiguous heads"):
        _epd_C.rope_and_cache_write(
            q_rot,
            q.transpose(0, 1).contiguous().transpose(0, 1),
            k,
            v,
            positions,
            cos_sin,
            kv_arena,
            layer,
            slot_mapping,
        )
