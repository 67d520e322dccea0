"""CUDA image kernels (epd_kernels/image) against the numpy reference and PIL: bit-exact resize passes and
crop + normalize, over awkward sizes, every filter, strided (CHW-permuted) inputs and mixed batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from epd_kernels.image import reference as ref

try:
    from epd_kernels import _epd_C
    from epd_kernels.image import cuda as image_ops
except ImportError:
    _epd_C = image_ops = None

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(_epd_C is None, reason="epd_kernels._epd_C is not built"),
]

FILTERS = [ref.BICUBIC, ref.BILINEAR, ref.LANCZOS, ref.BOX, ref.HAMMING]
# downscales, upscales, one axis, no-op, 1 pixel, and both pass orders (vertical first: (324, 35) -> (90, 119))
RESIZES = [((1080, 1920), (336, 597)), ((3024, 4032), (336, 448)), ((1000, 37), (9081, 336)),
           ((336, 336), (336, 336)), ((1, 1), (336, 336)), ((5, 7), (3, 2)), ((100, 100), (100, 37)),
           ((100, 100), (37, 100)), ((333, 500), (336, 504)), ((324, 35), (90, 119)), ((221, 82), (82, 18)),
           ((2, 999), (1, 17))]


def random_pixels(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def assert_equal(name: str, got: torch.Tensor | np.ndarray, expected: np.ndarray) -> None:
    got = got.cpu().numpy() if isinstance(got, torch.Tensor) else got
    assert got.shape == expected.shape, f"{name}: shape {got.shape} != {expected.shape}"
    bad = np.argwhere(got != expected)
    if len(bad):
        lines = [f"  at {tuple(int(v) for v in i)}: got {got[tuple(i)]}, expected {expected[tuple(i)]}"
                 for i in bad[:5]]
        raise AssertionError(f"{name}: {len(bad)} values differ\n" + "\n".join(lines))


def chw_view(x: np.ndarray) -> torch.Tensor:
    """[H, W, 3] as a permuted view of a contiguous [3, H, W] CUDA tensor: nvjpeg's layout."""
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))).cuda().permute(1, 2, 0)


@pytest.mark.parametrize("in_hw,out_hw", RESIZES)
def test_resize_equals_pil(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> None:
    x = random_pixels(*in_hw, seed=in_hw[0] * 31 + in_hw[1])
    expected = np.asarray(Image.fromarray(x).resize((out_hw[1], out_hw[0]), resample=ref.BICUBIC))
    assert_equal(f"{in_hw}->{out_hw} HWC", image_ops.resize(torch.from_numpy(x).cuda(), out_hw), expected)
    assert_equal(f"{in_hw}->{out_hw} CHW view", image_ops.resize(chw_view(x), out_hw), expected)


@pytest.mark.parametrize("resample", FILTERS)
def test_resize_random_sizes_equal_reference(resample: int) -> None:
    rng = np.random.default_rng(100 + resample)
    for _ in range(20):
        in_hw = tuple(int(v) for v in rng.integers(1, 700, 2))
        out_hw = tuple(int(v) for v in rng.integers(1, 700, 2))
        x = random_pixels(*in_hw, seed=int(rng.integers(1 << 30)))
        expected = ref.resize(x, out_hw, resample)
        assert_equal(f"filter {resample} {in_hw}->{out_hw}", image_ops.resize(chw_view(x), out_hw, resample), expected)


def test_resample_passes_with_offset_equal_reference() -> None:
    """Each pass alone over a slice of the image (the first pass of a resize reads only a span)."""
    x = random_pixels(301, 403, seed=7)
    for resample in [ref.BICUBIC, ref.LANCZOS]:
        hb, hk = ref.resample_coeffs(403, 97, resample)
        vb, vk = ref.resample_coeffs(301, 55, resample)
        c0, c1 = ref.row_span(hb)
        r0, r1 = ref.row_span(vb)
        xd = torch.from_numpy(x).cuda()
        dhb, dhk = image_ops.device_coeffs(403, 97, resample, xd.device)
        dvb, dvk = image_ops.device_coeffs(301, 55, resample, xd.device)
        assert_equal("horizontal", image_ops.resample_horizontal(xd[:, c0:c1], dhb, dhk, offset=c0),
                     ref.resample_pass(x[:, c0:c1], hb, hk, axis=1, offset=c0))
        assert_equal("vertical", image_ops.resample_vertical(xd[r0:r1], dvb, dvk, offset=r0),
                     ref.resample_pass(x[r0:r1], vb, vk, axis=0, offset=r0))


def test_resize_into_flat_buffer_slice() -> None:
    x = random_pixels(480, 640, seed=9)
    flat = torch.full((10 + 336 * 448 * 3,), 7, dtype=torch.uint8, device="cuda")
    dst = flat[10:].view(336, 448, 3)
    image_ops.resize(torch.from_numpy(x).cuda(), (336, 448), out=dst)
    assert_equal("flat slice", dst, ref.resize(x, (336, 448)))
    assert (flat[:10] == 7).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_crop_normalize_batch_equals_reference(dtype: torch.dtype) -> None:
    size = 336
    lut = ref.normalize_lut(1 / 255, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    hws = [(336, 597), (597, 336), (336, 336), (100, 500), (7, 9), (337, 338), (1, 1), (900, 1200)]
    imgs = [random_pixels(h, w, seed=h * 13 + w) for h, w in hws]
    offsets = np.cumsum([0] + [x.size for x in imgs])
    flat = torch.from_numpy(np.concatenate([x.reshape(-1) for x in imgs])).cuda()
    meta = torch.tensor([[int(o), h, w] for o, (h, w) in zip(offsets, hws)], dtype=torch.int64, device="cuda")
    got = image_ops.crop_normalize(flat, meta, torch.from_numpy(lut).cuda(), size, dtype)
    assert got.shape == (len(hws), 3, size, size) and got.dtype == dtype
    for i, x in enumerate(imgs):
        expected = torch.from_numpy(ref.crop_normalize(x, size, lut)).to(dtype)
        assert torch.equal(got[i].cpu(), expected), f"image {i} {hws[i]}: max diff " \
            f"{(got[i].cpu().float() - expected.float()).abs().max().item()}"


def test_crop_normalize_out_of_range_meta_reads_zero() -> None:
    """meta past the buffer never reads out of bounds: those pixels are level 0 (lut[c][0])."""
    lut = torch.arange(768, dtype=torch.float32, device="cuda").view(3, 256)
    flat = torch.full((12,), 5, dtype=torch.uint8, device="cuda")
    meta = torch.tensor([[0, 2, 2], [6, 2, 2]], dtype=torch.int64, device="cuda")  # image 1 runs past the end
    got = image_ops.crop_normalize(flat, meta, lut, 2)
    assert (got[0, 0] == 5).all() and (got[0, 2] == 512 + 5).all()
    assert got[1, 0, 0, 0].item() == 5 and got[1, 0, 1, 1].item() == 0  # inside / past the buffer


def test_errors() -> None:
    x = torch.zeros((4, 4, 3), dtype=torch.uint8, device="cuda")
    b, k = image_ops.device_coeffs(4, 2, ref.BICUBIC, x.device)
    with pytest.raises(RuntimeError, match="src must be uint8"):
        image_ops.resample_horizontal(x.float(), b, k)
    with pytest.raises(RuntimeError, match=r"must be \[H, W, 3\]"):
        image_ops.resample_horizontal(x[..., :2], b, k)
    with pytest.raises(RuntimeError, match="out must be"):
        _epd_C.resample_vertical(torch.empty((3, 4, 3), dtype=torch.uint8, device="cuda"), x, b, k, 0)
    with pytest.raises(RuntimeError, match="bounds must be"):
        image_ops.resample_horizontal(x, b.long(), k)
    lut = torch.zeros((3, 256), device="cuda")
    meta = torch.zeros((1, 3), dtype=torch.int64, device="cuda")
    with pytest.raises(RuntimeError, match="lut must be"):
        image_ops.crop_normalize(x.view(-1), meta, lut[:, :255].contiguous(), 4)
    with pytest.raises(RuntimeError, match="out must be float32"):
        image_ops.crop_normalize(x.view(-1), meta, lut, 4, torch.float64)
    with pytest.raises(ValueError, match="not supported"):
        image_ops.resize(x, (2, 2), resample=0)
