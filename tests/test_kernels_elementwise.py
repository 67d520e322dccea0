"""CUDA elementwise kernels (silu_and_mul, gelu, quick_gelu, embed_tokens) against epd_kernels/reference.py.

Activations: the kernel's error against the fp32 reference must be at most 2x that of the same op run
by torch in the low-precision dtype (+1e-5), and within ~2 ulp elementwise. Embedding is a copy: exact.
"""

from __future__ import annotations

import pytest
import torch

from epd_kernels import reference

try:
    from epd_kernels import _epd_C
    from epd_kernels import elementwise as ew
except ImportError:
    _epd_C = ew = None

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(_epd_C is None, reason="epd_kernels._epd_C is not built"),
]

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# Elementwise relative tolerance: two roundings of the dtype (silu_and_mul rounds twice).
RTOL = {torch.bfloat16: 2.0**-6, torch.float16: 2.0**-9, torch.float32: 1e-5}


def randn(shape: tuple[int, ...], dtype: torch.dtype, seed: int, scale: float = 3.0) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(shape, generator=gen, device="cuda") * scale).to(dtype)


def check_close(name: str, got: torch.Tensor, truth: torch.Tensor, peer: torch.Tensor) -> None:
    """got/peer (low precision) vs truth (fp32): no NaN, max error <= 2x peer's + 1e-5, elementwise ~2 ulp."""
    assert not torch.isnan(got).any(), f"{name}: NaN in output (element not written?)"
    got_f, peer_f, truth_f = got.float(), peer.float(), truth.float()
    err = (got_f - truth_f).abs()
    peer_err = (peer_f - truth_f).abs()
    scale = truth_f.abs().max().clamp_min(1.0).item()  # fp32 outputs: the peer is exact, allow 1e-5 relative
    assert err.max() <= 2 * peer_err.max() + 1e-5 * scale, (
        f"{name}: max error {err.max().item():.3e} > 2 x torch-{got.dtype} error {peer_err.max().item():.3e}"
        f" + 1e-5 x {scale:.3g}"
    )
    tol = RTOL[got.dtype] * truth_f.abs() + 1e-5 * scale
    bad = (err > tol).nonzero()
    if len(bad):
        lines = [
            f"  at {tuple(i.tolist())}: got {got_f[tuple(i)].item():.6g}, ref {truth_f[tuple(i)].item():.6g}"
            for i in bad[:5]
        ]
        raise AssertionError(f"{name}: {len(bad)} elements off\n" + "\n".join(lines))


# ----------------------------------------------------------------------------- silu_and_mul


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 3, 17, 97])
@pytest.mark.parametrize("inter", [5, 352, 1376, 11008])
def test_silu_and_mul(dtype: torch.dtype, tokens: int, inter: int) -> None:
    x = randn((tokens, 2 * inter), dtype, seed=tokens * 100003 + inter)
    out = torch.full((tokens, inter), float("nan"), dtype=dtype, device="cuda")
    _epd_C.silu_and_mul(out, x)
    truth = reference.silu_and_mul(x.float())
    check_close(f"silu_and_mul[{tokens}x{inter} {dtype}]", out, truth, reference.silu_and_mul(x))
    if dtype != torch.float32:
        # The HF rounding of silu(gate) is mirrored, so the kernel agrees with the reference almost everywhere
        # (without the intermediate rounding, 10-30% of the elements would differ by an ulp).
        mismatch = (out.float() != reference.silu_and_mul(x).float()).float().mean().item()
        assert mismatch < 1e-2, f"{mismatch:.2%} of elements differ from the reference's rounding"
    assert torch.equal(ew.silu_and_mul(x), out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_silu_and_mul_strided_rows(dtype: torch.dtype) -> None:
    """Rows with a gap (x is a column slice): the vector path when the stride allows, scalar otherwise."""
    for inter, pad in [(352, 8), (352, 3), (11008, 16)]:
        full = randn((7, 2 * inter + pad), dtype, seed=inter + pad)
        x = full[:, : 2 * inter]
        out = torch.full((7, inter), float("nan"), dtype=dtype, device="cuda")
        _epd_C.silu_and_mul(out, x)
        check_close(f"silu_and_mul strided pad={pad}", out, reference.silu_and_mul(x.float()),
                    reference.silu_and_mul(x))


def test_silu_and_mul_empty() -> None:
    x = torch.empty((0, 64), dtype=torch.bfloat16, device="cuda")
    assert ew.silu_and_mul(x).shape == (0, 32)


def test_silu_and_mul_errors() -> None:
    x = randn((3, 10), torch.bfloat16, seed=0)
    with pytest.raises(RuntimeError, match="out must be"):
        _epd_C.silu_and_mul(torch.empty((3, 4), dtype=torch.bfloat16, device="cuda"), x)
    with pytest.raises(RuntimeError, match="even"):
        _epd_C.silu_and_mul(torch.empty((3, 4), dtype=torch.bfloat16, device="cuda"), x[:, :9])
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        ew.silu_and_mul(x.double())


# ----------------------------------------------------------------------------- gelu / quick_gelu

ACTIVATIONS = [("gelu", reference.gelu), ("quick_gelu", reference.quick_gelu)]
SHAPES = [(1,), (7,), (97, 13), (3, 577, 64), (17, 4096), (577, 4097)]


@pytest.mark.parametrize("name,ref", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_activation(name: str, ref, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = randn(shape, dtype, seed=sum(shape) * 31 + len(shape))
    out = torch.full(shape, float("nan"), dtype=dtype, device="cuda")
    getattr(_epd_C, name)(out, x)
    check_close(f"{name}{list(shape)} {dtype}", out, ref(x.float()), ref(x))
    assert torch.equal(getattr(ew, name)(x), out)


@pytest.mark.parametrize("name,ref", ACTIVATIONS)
def test_activation_misaligned_and_noncontiguous(name: str, ref) -> None:
    """A view starting 2 bytes into its storage (scalar path) and a transposed input (wrapper copies)."""
    base = randn((4099,), torch.bfloat16, seed=5)
    x = base[1:]
    out = torch.full_like(x, float("nan"))
    getattr(_epd_C, name)(out, x)
    check_close(f"{name} misaligned", out, ref(x.float()), ref(x))
    xt = randn((64, 97), torch.float16, seed=6).t()
    got = getattr(ew, name)(xt)
    assert got.shape == xt.shape
    check_close(f"{name} transposed", got, ref(xt.float()), ref(xt))


def test_activation_extremes() -> None:
    x = torch.tensor([0.0, -0.0, 1e-6, -1e-6, 30.0, -30.0, 1e4, -1e4, 65000.0, -65000.0], device="cuda")
    for dtype in [torch.bfloat16, torch.float16, torch.float32]:
        xd = x.to(dtype)
        for name, ref in ACTIVATIONS:
            got = getattr(ew, name)(xd)
            check_close(f"{name} extremes {dtype}", got, ref(xd.float()), ref(xd))


# ----------------------------------------------------------------------------- embed_tokens


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 7, 97, 640])
@pytest.mark.parametrize("hidden", [40, 1028, 4096])
@pytest.mark.parametrize("images", [False, True])
def test_embed_tokens(dtype: torch.dtype, tokens: int, hidden: int, images: bool) -> None:
    vocab, rows = 1000, 576
    gen = torch.Generator(device="cuda").manual_seed(tokens * 7 + hidden)
    weight = randn((vocab, hidden), dtype, seed=hidden)
    ids = torch.randint(0, vocab, (tokens,), generator=gen, device="cuda")
    index = embeds = None
    if images:
        embeds = randn((rows, hidden), dtype, seed=hidden + 1)
        index = torch.randint(0, rows, (tokens,), generator=gen, device="cuda")
        index[torch.rand(tokens, generator=gen, device="cuda") < 0.3] = -1
    out = torch.full((tokens, hidden), float("nan"), dtype=dtype, device="cuda")
    _epd_C.embed_tokens(out, ids, weight, index, embeds)
    expected = reference.embed_tokens(ids, weight, index, embeds)
    assert torch.equal(out, expected)
    assert torch.equal(ew.embed_tokens(ids, weight, index, embeds), expected)


def test_embed_tokens_out_of_range_rows_are_zero() -> None:
    vocab, hidden = 50, 64
    weight = randn((vocab, hidden), torch.bfloat16, seed=1)
    embeds = randn((4, hidden), torch.bfloat16, seed=2)
    ids = torch.tensor([0, -1, vocab, vocab + 7, 49, 3, 3, 2**40], device="cuda")
    index = torch.tensor([-1, -1, -1, -1, -1, 3, 4, -5], device="cuda")
    got = ew.embed_tokens(ids, weight, index, embeds)
    assert torch.equal(got[0], weight[0]) and torch.equal(got[4], weight[49])
    assert torch.equal(got[5], embeds[3])
    for t in [1, 2, 3, 6, 7]:
        assert torch.equal(got[t], torch.zeros_like(got[t])), f"row {t} should be zeros"


def test_embed_tokens_casts_image_embeds() -> None:
    weight = randn((100, 256), torch.bfloat16, seed=3)
    embeds = randn((10, 256), torch.float32, seed=4)
    ids = torch.arange(20, device="cuda")
    index = torch.tensor([-1] * 10 + list(range(10)), device="cuda")
    assert torch.equal(ew.embed_tokens(ids, weight, index, embeds), reference.embed_tokens(ids, weight, index, embeds))


def test_embed_tokens_graph_capture() -> None:
    weight = randn((1000, 4096), torch.bfloat16, seed=7)
    embeds = randn((576, 4096), torch.bfloat16, seed=8)
    ids = torch.randint(0, 1000, (640,), device="cuda")
    index = torch.randint(-1, 576, (640,), device="cuda")
    ew.embed_tokens(ids, weight, index, embeds)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ew.embed_tokens(ids, weight, index, embeds)
    ids.copy_(torch.randint(0, 1000, (640,), device="cuda"))
    index.copy_(torch.randint(-1, 576, (640,), device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, reference.embed_tokens(ids, weight, index, embeds))


def test_embed_tokens_errors() -> None:
    weight = randn((10, 16), torch.bfloat16, seed=9)
    with pytest.raises(RuntimeError, match="input_ids must be"):
        ew.embed_tokens(torch.zeros(3, dtype=torch.int32, device="cuda"), weight, None, None)
    with pytest.raises(RuntimeError, match="image_embeds must be"):
        ew.embed_tokens(torch.zeros(3, dtype=torch.int64, device="cuda"), weight,
                        torch.zeros(3, dtype=torch.int64, device="cuda"), randn((2, 8), torch.bfloat16, seed=1))
