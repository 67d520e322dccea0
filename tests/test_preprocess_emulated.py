"""The Python glue of the GPU image path, on the CPU: epd_kernels/image/cuda.py (pass order, first-pass
spans, offsets, strided input, flat output slices) and GpuImagePreprocessor.resize_normalize (packing,
meta, LUT), run against an emulation of the three _epd_C image ops that follows the kernels' index
math (epd_kernels/image/resample.cu, crop_normalize.cu). The kernels themselves are tested on the GPU
(tests/test_kernels_image.py); this catches glue bugs in CI. Also GpuAnyresPreprocessor (LLaVA-NeXT tiles)
against AnyresImageProcessor on the same emulation."""

from __future__ import annotations

import importlib.util
import io
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import epd_kernels
from engine.config import DEFAULT_PINPOINTS
from engine.images import ImageProcessor, ImageProcessorConfig
from engine.images_anyres import AnyresImageProcessor, image_processor_for
from engine.preprocess import GpuImagePreprocessor
from engine.preprocess_anyres import GpuAnyresPreprocessor
from epd_kernels.image import reference as ref

ROOT = Path(__file__).resolve().parents[1]


def _resample(out: torch.Tensor, src: torch.Tensor, bounds: torch.Tensor, coeffs: torch.Tensor, offset: int,
              horizontal: bool) -> None:
    """resample_kernel: acc = 2^21 + sum over j < min(count, K) of in[first - offset + j] * k[j] where that index
    is inside the input, clip8(acc >> 22)."""
    assert out.is_contiguous() and out.dtype == src.dtype == torch.uint8
    s, b, k = src.numpy(), bounds.numpy(), coeffs.numpy()
    assert out.shape == ((s.shape[0], len(b), 3) if horizontal else (len(b), s.shape[1], 3))
    n = s.shape[1 if horizontal else 0]
    acc = np.full(out.shape, 1 << 21, np.int64)
    for j in range(k.shape[1]):
        idx = b[:, 0] - offset + j
        w = k[:, j] * ((j < np.minimum(b[:, 1], k.shape[1])) & (idx >= 0) & (idx < n))
        take = np.clip(idx, 0, n - 1)
        if horizontal:
            acc += s[:, take].astype(np.int64) * w[None, :, None]
        else:
            acc += s[take].astype(np.int64) * w[:, None, None]
    out.copy_(torch.from_numpy(np.clip(acc >> 22, 0, 255).astype(np.uint8)))


def _crop_normalize(out: torch.Tensor, src: torch.Tensor, meta: torch.Tensor, lut: torch.Tensor) -> None:
    """crop_normalize_kernel: top/left = floor((dim - S) / 2), level 0 outside the image or the buffer."""
    size, flat, table = out.shape[2], src.numpy(), lut.numpy()
    i, j = np.mgrid[0:size, 0:size]
    for n, (offset, h, w) in enumerate(meta.tolist()):
        y, x = i + (h - size) // 2, j + (w - size) // 2
        at = offset + (y * w + x) * 3
        inside = (y >= 0) & (y < h) & (x >= 0) & (x < w) & (at >= 0) & (at + 2 < flat.size)
        for c in range(3):
            levels = np.where(inside, flat[np.clip(at + c, 0, flat.size - 1)], 0)
            out[n, c] = torch.from_numpy(table[c][levels]).to(out.dtype)


@pytest.fixture
def emulated_ops(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A private copy of epd_kernels/image/cuda.py bound to the emulation (the real modules stay untouched)."""
    fake = types.ModuleType("epd_kernels._epd_C")
    fake.resample_horizontal = lambda out, src, b, k, offset=0: _resample(out, src, b, k, offset, True)
    fake.resample_vertical = lambda out, src, b, k, offset=0: _resample(out, src, b, k, offset, False)
    fake.crop_normalize = _crop_normalize
    spec = importlib.util.spec_from_file_location("emulated_image_cuda", ROOT / "epd_kernels" / "image" / "cuda.py")
    module = importlib.util.module_from_spec(spec)
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "epd_kernels._epd_C", fake)
        m.setattr(epd_kernels, "_epd_C", fake, raising=False)
        spec.loader.exec_module(module)
    return module


def emulated_preprocessor(cfg: ImageProcessorConfig, ops: types.ModuleType,
                          dtype: torch.dtype = torch.float32) -> GpuImagePreprocessor:
    """A GpuImagePreprocessor on the CPU (which stands in for the device) over the emulated ops; decode
    is PIL's (no nvjpeg, no pool), so given image sources it decodes what ImageProcessor does."""
    pre = GpuImagePreprocessor.__new__(GpuImagePreprocessor)  # no CUDA here
    pre.device, pre.cfg, pre.dtype, pre._ops = torch.device("cpu"), cfg, dtype, ops
    pre._lut = torch.from_numpy(ref.normalize_lut(cfg.rescale_factor if cfg.do_rescale else None,
                                                  cfg.image_mean if cfg.do_normalize else None,
                                                  cfg.image_std if cfg.do_normalize else None))
    pre.composite_alpha, pre._pool, pre.nvjpeg = ImageProcessor(cfg).composite_alpha, None, False
    return pre


@pytest.mark.parametrize("in_hw,out_hw", [((480, 640), (336, 448)), ((324, 35), (90, 119)), ((221, 82), (82, 18)),
                                          ((100, 100), (100, 37)), ((100, 100), (37, 100)), ((5, 5), (5, 5)),
                                          ((1, 1), (336, 336)), ((1000, 37), (600, 336))])
def test_emulated_resize_equals_pil(emulated_ops: types.ModuleType, in_hw: tuple[int, int],
                                    out_hw: tuple[int, int]) -> None:
    x = np.random.default_rng(in_hw[0]).integers(0, 256, (*in_hw, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(x).resize((out_hw[1], out_hw[0]), resample=ref.BICUBIC))
    chw = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))).permute(1, 2, 0)  # nvjpeg's layout
    assert np.array_equal(emulated_ops.resize(chw, out_hw).numpy(), expected)
    flat = torch.zeros(5 + out_hw[0] * out_hw[1] * 3, dtype=torch.uint8)
    emulated_ops.resize(torch.from_numpy(x), out_hw, out=flat[5:].view(*out_hw, 3))
    assert np.array_equal(flat[5:].view(*out_hw, 3).numpy(), expected) and (flat[:5] == 0).all()


@pytest.mark.parametrize("cfg", [ImageProcessorConfig(image_size=336),
                                 ImageProcessorConfig(image_size=100, do_resize=False),
                                 ImageProcessorConfig(image_size=64, do_center_crop=False, resize_hw=(64, 64))],
                         ids=str)
def test_emulated_resize_normalize_equals_image_processor(emulated_ops: types.ModuleType,
                                                          cfg: ImageProcessorConfig) -> None:
    pre = emulated_preprocessor(cfg, emulated_ops)
    rng = np.random.default_rng(1)
    pixels = [rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for hw in [(480, 640), (37, 1000), (336, 336), (1, 1)]]
    expected = ImageProcessor(cfg).preprocess([Image.fromarray(p) for p in pixels])
    assert torch.equal(pre.resize_normalize(pixels), expected)


def test_emulated_steps_are_stamped_when_asked(emulated_ops: types.ModuleType) -> None:
    """As an encoder asks (roles/encode.py): with `marks` a dict, decode and resize + normalize
    stamp their host return times there, in order; by default nothing is stamped."""
    import time

    cfg = ImageProcessorConfig(image_size=64)
    pre = emulated_preprocessor(cfg, emulated_ops)
    images = _anyres_images([(80, 120), (50, 40)])
    expected = pre.preprocess(images)
    assert pre.marks is None
    pre.marks = marks = {}
    before = time.perf_counter()
    assert torch.equal(pre.preprocess(images), expected)
    assert before < marks["decode_end"] < marks["resize_end"] < time.perf_counter(), marks


# (height, width) at tile 336: landscape, smaller than a tile, very wide, tall, a pinpoint exactly, one pixel
ANYRES_HW = [(480, 640), (200, 150), (60, 1500), (1400, 300), (336, 672), (1, 1)]


def _png(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format="PNG")
    return buf.getvalue()


def _anyres_images(sizes: list[tuple[int, int]], scale: float = 1.0) -> list[bytes]:
    rng = np.random.default_rng(7)
    return [_png(rng.integers(0, 256, (max(1, int(h * scale)), max(1, int(w * scale)), 3), dtype=np.uint8))
            for h, w in sizes]


def _check_anyres(cfg: ImageProcessorConfig, pinpoints, ops: types.ModuleType, images: list[bytes],
                  dtype: torch.dtype = torch.float32) -> None:
    want, want_sizes = AnyresImageProcessor(cfg, pinpoints).preprocess_items(images)
    got, sizes = GpuAnyresPreprocessor(emulated_preprocessor(cfg, ops, dtype), pinpoints).preprocess_items(images)
    assert sizes == want_sizes
    assert got.shape == want.shape and got.dtype == dtype
    assert torch.equal(got, want.to(dtype)), f"{(got.float() - want).abs().amax(dim=(1, 2, 3)).tolist()}"


@pytest.mark.parametrize("hw", ANYRES_HW, ids=str)
def test_emulated_anyres_equals_anyres_processor(emulated_ops: types.ModuleType, hw: tuple[int, int]) -> None:
    """A real LLaVA-NeXT config (tile 336, its pinpoints), one image at a time: pinpoint resize, padding,
    tiles (the one-copy path), base."""
    _check_anyres(ImageProcessorConfig(image_size=336), DEFAULT_PINPOINTS, emulated_ops, _anyres_images([hw]))


def test_emulated_anyres_several_images_one_call(emulated_ops: types.ModuleType, tiny_llava_next) -> None:
    """The tiny NeXT checkpoint's processor (tile 84, its pinpoints): every size in one call, then two images,
    then none; float32 and bfloat16."""
    from engine.config import ModelConfig

    proc = image_processor_for(tiny_llava_next, ModelConfig.from_dir(tiny_llava_next))
    assert isinstance(proc, AnyresImageProcessor)
    images = _anyres_images(ANYRES_HW, scale=0.25)
    _check_anyres(proc.cfg, proc.pinpoints, emulated_ops, images)
    _check_anyres(proc.cfg, proc.pinpoints, emulated_ops, images[2:4], torch.bfloat16)
    empty, sizes = GpuAnyresPreprocessor(emulated_preprocessor(proc.cfg, emulated_ops), proc.pinpoints) \
        .preprocess_items([])
    assert empty.shape == (0, 3, 84, 84) and sizes == []


@pytest.mark.parametrize(("cfg", "pinpoints"), [
    (ImageProcessorConfig(image_size=84, shortest_edge=100), None),  # CLIP resizes tiles and base, then crops
    (ImageProcessorConfig(image_size=84, resize_hw=(90, 120), resample=ref.LANCZOS), None),  # base_hw not square
    (ImageProcessorConfig(image_size=84, do_resize=False), None),  # CLIP's resize off: tiles and base copied
    (ImageProcessorConfig(image_size=84), ((100, 200), (200, 100))),  # pinpoints not multiples: partial tiles
], ids=["shortest_edge_100", "resize_hw_lanczos", "no_resize", "partial_tiles"])
def test_emulated_anyres_config_variants(emulated_ops: types.ModuleType, cfg: ImageProcessorConfig,
                                         pinpoints) -> None:
    """ImageProcessor's resize logic per item, where it is not an identity (the per-tile path)."""
    pinpoints = pinpoints or tuple((h // 4, w // 4) for h, w in DEFAULT_PINPOINTS)
    _check_anyres(cfg, pinpoints, emulated_ops, _anyres_images(ANYRES_HW, scale=0.25))
