"""Small-batch GEMV kernels (linear, gate_up_silu) against epd_kernels/reference.py and torch.

Accuracy metric (linear): the truth is x @ w^T in float64. Both the kernel's max abs error and its
relative Frobenius error (||got - truth|| / ||truth||) must be at most 2x those of torch's own F.linear
in the same dtype, + 1e-5 (relative to max(|truth|, 1) for the max-abs error). Both errors are
dominated by the final rounding to the dtype, so the ratio sits near 1.
gate_up_silu must equal silu_and_mul(linear(x, w)) run by our own kernels within 1 ulp (the kernel
forms gate and up in the same order as linear, so it is bitwise equal in practice), and be as close to
the float64 truth as torch's unfused version. Calls the kernels do not take return the torch result.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from epd_kernels import reference

try:
    from epd_kernels import _epd_C, gemv
    from epd_kernels import elementwise as ew
except ImportError:
    _epd_C = ew = gemv = None


def gpu(fn):
    """Mark a test as needing the GPU and the built extension (the CPU tests here run anywhere)."""
    fn = pytest.mark.skipif(_epd_C is None, reason="epd_kernels._epd_C is not built")(fn)
    fn = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(fn)
    return pytest.mark.gpu(fn)


DTYPES = [torch.bfloat16, torch.float16]
ROWS = [1, 2, 3, 5, 8]
# (N, K): tiny, awkward (N % 16 != 0, K % 32 != 0), and LLaVA-1.5-7B's decode GEMMs.
SHAPES = [(1, 8), (97, 1032), (4096, 4096), (12288, 4096), (4096, 11008), (22016, 4096), (32064, 4096)]
# (I, K) of gate_up_silu, w [2I, K]: a CTA takes 8 gate rows and their 8 up rows; I % 8 != 0 masks
# part of the last tile (1, 97, 83), I < 8 leaves most of it empty.
GATE_UP_SHAPES = [(1, 8), (97, 1032), (83, 200), (344, 4096), (11008, 4096)]


def randn(shape: tuple[int, ...], dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(shape, generator=gen, device="cuda") * scale).to(dtype)


def inputs(m: int, n: int, k: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [m, k] ~ N(0, 1) and w [n, k] ~ N(0, 1/k): outputs of order 1, as in a trained model."""
    return randn((m, k), dtype, seed), randn((n, k), dtype, seed + 1, scale=k**-0.5)


def truth_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.double() @ w.double().T


def check_accuracy(name: str, got: torch.Tensor, truth: torch.Tensor, peer: torch.Tensor) -> None:
    """got / peer (low precision) vs truth (float64): no NaN; max abs and relative norm errors <= 2x peer's + 1e-5."""
    assert got.shape == truth.shape, f"{name}: shape {tuple(got.shape)} != {tuple(truth.shape)}"
    assert not torch.isnan(got).any(), f"{name}: NaN in output (element not written?)"
    got_d, peer_d = got.double(), peer.double()
    scale = truth.abs().max().clamp_min(1.0).item()
    err, peer_err = (got_d - truth).abs().max().item(), (peer_d - truth).abs().max().item()
    assert err <= 2 * peer_err + 1e-5 * scale, (
        f"{name}: max abs error {err:.3e} > 2 x torch-{got.dtype} error {peer_err:.3e} + 1e-5 x {scale:.3g}"
    )
    norm = truth.norm().clamp_min(1e-30).item()
    rel, peer_rel = (got_d - truth).norm().item() / norm, (peer_d - truth).norm().item() / norm
    assert rel <= 2 * peer_rel + 1e-5, f"{name}: relative error {rel:.3e} > 2 x torch-{got.dtype} {peer_rel:.3e}"


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units in the last place of the 16-bit dtype (monotone integer map of the bit patterns)."""

    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return (ordered(a) - ordered(b)).abs()


# ----------------------------------------------------------------------------- linear


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("n,k", SHAPES)
def test_linear(dtype: torch.dtype, m: int, n: int, k: int) -> None:
    x, w = inputs(m, n, k, dtype, seed=m * 1000003 + n * 7 + k)
    out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
    _epd_C.linear(out, x, w)
    check_accuracy(f"linear[M={m} N={n} K={k} {dtype}]", out, truth_linear(x, w), F.linear(x, w))
    # The wrapper takes the kernel path for these shapes, and the kernel is deterministic.
    assert torch.equal(gemv.linear(x, w), out)


@gpu
def test_linear_leading_dims_and_vector() -> None:
    """x [2, 3, K] (6 rows) and x [K] go through the kernel, flattened; results match the 2-D call."""
    x, w = inputs(6, 200, 512, torch.bfloat16, seed=11)
    got = gemv.linear(x.view(2, 3, 512), w)
    assert got.shape == (2, 3, 200)
    assert torch.equal(got.view(6, 200), gemv.linear(x, w))
    got1 = gemv.linear(x[0], w)
    assert got1.shape == (200,)
    assert torch.equal(got1, gemv.linear(x[:1], w)[0])


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_fallbacks(dtype: torch.dtype) -> None:
    """Shapes and layouts the kernel does not take return F.linear's result exactly."""
    x, w = inputs(9, 97, 1032, dtype, seed=21)
    assert torch.equal(gemv.linear(x, w), F.linear(x, w))  # M = 9 > 8
    x12, w12 = inputs(3, 97, 12, dtype, seed=22)
    assert torch.equal(gemv.linear(x12, w12), F.linear(x12, w12))  # K % 8 != 0
    xt = randn((1032, 3), dtype, seed=23).t()  # non-contiguous x
    assert torch.equal(gemv.linear(xt, w), F.linear(xt, w))
    wt = randn((1032, 97), dtype, seed=24).t()  # non-contiguous w
    assert torch.equal(gemv.linear(x[:3], wt), F.linear(x[:3], wt))
    xm = randn((3 * 1032 + 4,), dtype, seed=25)[4:].view(3, 1032)  # contiguous but 8 bytes off 16-byte alignment
    assert xm.data_ptr() % 16
    assert torch.equal(gemv.linear(xm, w), F.linear(xm, w))
    x32, w32 = x[:3].float(), w.float()  # fp32
    assert torch.equal(gemv.linear(x32, w32), F.linear(x32, w32))
    x0 = torch.empty((0, 1032), dtype=dtype, device="cuda")  # no rows
    assert gemv.linear(x0, w).shape == (0, 97)


@gpu
def test_linear_graph_capture() -> None:
    x, w = inputs(5, 4096, 4096, torch.bfloat16, seed=31)
    gemv.linear(x, w)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gemv.linear(x, w)
    x.copy_(randn((5, 4096), torch.bfloat16, seed=32))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, gemv.linear(x, w))


@gpu
@pytest.mark.parametrize("graph", [False, True])
def test_chained_gemvs_read_their_predecessors_output(graph: bool) -> None:
    """A chain of 12 GEMVs, each reading the one before's output, eager back to back and replayed
    from a CUDA graph with new inputs, equals the same chain run one op at a time with a device
    synchronize between ops (a kernel that read x before its predecessor was done would not: the
    check that kept programmatic dependent launch honest while it was tried, session 13)."""
    k, inter = 1024, 688
    ws = []
    for i in range(4):
        ws += [randn((k, k), torch.bfloat16, 40 + 3 * i, scale=k**-0.5),
               randn((2 * inter, k), torch.bfloat16, 41 + 3 * i, scale=k**-0.5),
               randn((k, inter), torch.bfloat16, 42 + 3 * i, scale=inter**-0.5)]

    def chain(x: torch.Tensor, sync: bool = False) -> torch.Tensor:
        for i in range(0, len(ws), 3):
            x = gemv.linear(x, ws[i])
            torch.cuda.synchronize() if sync else None
            x = gemv.gate_up_silu(x, ws[i + 1])
            torch.cuda.synchronize() if sync else None
            x = gemv.linear(x, ws[i + 2])
            torch.cuda.synchronize() if sync else None
        return x

    x = randn((3, k), torch.bfloat16, seed=50)
    if graph:
        chain(x)  # warm-up outside the capture
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = chain(x)
    for seed in range(51, 56):
        x.copy_(randn((3, k), torch.bfloat16, seed=seed))
        if graph:
            g.replay()
        else:
            out = chain(x)
        torch.cuda.synchronize()
        assert torch.equal(out, chain(x.clone(), sync=True)), f"inputs of seed {seed}"


@gpu
def test_linear_errors() -> None:
    x, w = inputs(3, 64, 256, torch.bfloat16, seed=41)
    out = torch.empty((3, 64), dtype=torch.bfloat16, device="cuda")
    with pytest.raises(RuntimeError, match="the limit is 8"):
        _epd_C.linear(torch.empty((9, 64), dtype=torch.bfloat16, device="cuda"), x.repeat(3, 1), w)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        _epd_C.linear(out, x[:, :12].contiguous(), w[:, :12].contiguous())
    with pytest.raises(RuntimeError, match="w must have x's K"):
        _epd_C.linear(out, x, w[:, :128].contiguous())
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        _epd_C.linear(out, randn((256, 3), torch.bfloat16, seed=42).t(), w)
    with pytest.raises(RuntimeError, match="out must be a contiguous"):
        _epd_C.linear(torch.empty((3, 63), dtype=torch.bfloat16, device="cuda"), x, w)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        _epd_C.linear(out.float(), x.float(), w.float())
    with pytest.raises(RuntimeError, match="w must have x's dtype"):
        _epd_C.linear(out, x, w.half())


# ----------------------------------------------------------------------------- gate_up_silu


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("inter,k", GATE_UP_SHAPES)
def test_gate_up_silu(dtype: torch.dtype, m: int, inter: int, k: int) -> None:
    x, w = inputs(m, 2 * inter, k, dtype, seed=m * 1000003 + inter * 7 + k + 5)
    out = torch.full((m, inter), float("nan"), dtype=dtype, device="cuda")
    _epd_C.gate_up_silu(out, x, w)
    assert not torch.isnan(out).any(), "NaN in output (element not written?)"
    unfused = ew.silu_and_mul(gemv.linear(x, w))
    ulps = ulp_distance(out, unfused)
    assert ulps.max().item() <= 1, (
        f"{ulps.gt(1).sum().item()} elements differ from silu_and_mul(linear(x, w)) by more than 1 ulp "
        f"(max {ulps.max().item()})"
    )
    check_accuracy(f"gate_up_silu[M={m} I={inter} K={k} {dtype}]", out,
                   reference.silu_and_mul(truth_linear(x, w)), reference.gate_up_silu(x, w))
    assert torch.equal(gemv.gate_up_silu(x, w), out)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gate_up_silu_fallbacks(dtype: torch.dtype) -> None:
    """Calls the kernel does not take return silu_and_mul(F.linear(x, w)) run by torch + our silu_and_mul."""
    x, w = inputs(9, 194, 1032, dtype, seed=51)
    cases = [
        (x, w),  # M = 9 > 8
        inputs(3, 194, 12, dtype, seed=52),  # K % 8 != 0
        (randn((1032, 3), dtype, seed=53).t(), w),  # non-contiguous x
        (x[:3].float(), w.float()),  # fp32
    ]
    for xc, wc in cases:
        expected = ew.silu_and_mul(F.linear(xc, wc))
        assert torch.equal(gemv.gate_up_silu(xc, wc), expected)
    x3 = x[:6].view(2, 3, 1032)  # leading dims: kernel path, flattened
    assert torch.equal(gemv.gate_up_silu(x3, w).view(6, 97), gemv.gate_up_silu(x[:6], w))


@gpu
def test_gate_up_silu_errors() -> None:
    x, w = inputs(3, 64, 256, torch.bfloat16, seed=61)
    with pytest.raises(RuntimeError, match="gate \\| up"):
        _epd_C.gate_up_silu(torch.empty((3, 32), dtype=torch.bfloat16, device="cuda"), x, w[:63])
    with pytest.raises(RuntimeError, match="out must be a contiguous"):
        _epd_C.gate_up_silu(torch.empty((3, 64), dtype=torch.bfloat16, device="cuda"), x, w)


# ----------------------------------------------------------------------------- reference (CPU)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_definitions(dtype: torch.dtype) -> None:
    """The torch backend's linear / gate_up_silu are F.linear and silu_and_mul(F.linear) (runs on CPU)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((3, 5, 24), generator=gen).to(dtype)
    w = torch.randn((2 * 7, 24), generator=gen).to(dtype)
    assert torch.equal(reference.linear(x, w), F.linear(x, w))
    fused = reference.gate_up_silu(x, w)
    assert fused.shape == (3, 5, 7)
    assert torch.equal(fused, reference.silu_and_mul(F.linear(x, w)))
    gate, up = F.linear(x, w).chunk(2, dim=-1)
    assert torch.equal(fused, F.silu(gate.float()).to(dtype) * up)
