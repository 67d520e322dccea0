"""Image preprocessing off the PIL path: epd_kernels/image/reference.py == PIL bit for bit, and
engine/preprocess.py (CPU thread pool, GPU preprocessor, decode routing) == engine.images.

CPU tests run in CI; the `gpu` ones need CUDA, the built extension and (for JPEG decode) torchvision.
"""

from __future__ import annotations

import base64
import functools
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine import images as images_mod
from engine.images import ImageProcessor, ImageProcessorConfig
from epd_kernels.image import reference as ref

FILTERS = [ref.BICUBIC, ref.BILINEAR, ref.LANCZOS, ref.BOX, ref.HAMMING]
# (in_hw, out_hw): downscales by awkward factors, upscales, one axis only, no-op, 1 pixel
RESIZES = [((1080, 1920), (336, 597)), ((3024, 4032), (336, 448)), ((1000, 37), (9081, 336)),
           ((336, 336), (336, 336)), ((1, 1), (336, 336)), ((1, 1), (1, 1)), ((5, 7), (3, 2)),
           ((100, 100), (100, 37)), ((100, 100), (37, 100)), ((333, 500), (336, 504)), ((2, 999), (1, 17))]


def random_pixels(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def pil_resize(x: np.ndarray, out_hw: tuple[int, int], resample: int) -> np.ndarray:
    return np.asarray(Image.fromarray(x).resize((out_hw[1], out_hw[0]), resample=resample))


def assert_equal_pixels(name: str, got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape, f"{name}: shape {got.shape} != {expected.shape}"
    bad = np.argwhere(got != expected)
    if len(bad):
        lines = [f"  at {tuple(i)}: got {got[tuple(i)]}, PIL {expected[tuple(i)]}" for i in bad[:5]]
        raise AssertionError(f"{name}: {len(bad)} values differ\n" + "\n".join(lines))


# ----------------------------------------------------------------------------- reference == PIL


@pytest.mark.parametrize("in_hw,out_hw", RESIZES)
def test_reference_resize_bicubic_equals_pil(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> None:
    x = random_pixels(*in_hw, seed=in_hw[0] * 7 + in_hw[1])
    assert_equal_pixels(f"{in_hw}->{out_hw}", ref.resize(x, out_hw, ref.BICUBIC), pil_resize(x, out_hw, ref.BICUBIC))


@pytest.mark.parametrize("resample", FILTERS)
def test_reference_resize_filters_equal_pil(resample: int) -> None:
    rng = np.random.default_rng(resample)
    for _ in range(12):
        in_hw = tuple(int(v) for v in rng.integers(1, 400, 2))
        out_hw = tuple(int(v) for v in rng.integers(1, 500, 2))
        x = random_pixels(*in_hw, seed=int(rng.integers(1 << 30)))
        assert_equal_pixels(f"filter {resample} {in_hw}->{out_hw}", ref.resize(x, out_hw, resample),
                            pil_resize(x, out_hw, resample))


def test_reference_resize_extremes_equal_pil() -> None:
    """Saturated inputs push the accumulator to the clip limits (negative bicubic/lanczos lobes)."""
    x = np.zeros((64, 64, 3), dtype=np.uint8)
    x[::2, ::3] = 255
    x[:, 31:33] = 255
    for resample in FILTERS:
        for out_hw in [(21, 17), (200, 190), (64, 5)]:
            assert_equal_pixels(f"extremes {resample} {out_hw}", ref.resize(x, out_hw, resample),
                                pil_resize(x, out_hw, resample))


def test_pass_order_rule_equals_pil() -> None:
    """Pillow 13 resizes vertically first when out_h < in_h and in_h - out_h > 2 (in_w - out_w); the
    uint8 rounding between passes makes the order visible. Sizes on both sides of the boundary."""
    rng = np.random.default_rng(11)
    for h, w, ow in [(200, 200, 150), (221, 82, 18), (200, 150, 60), (150, 200, 120), (64, 40, 90)]:
        boundary = h - 2 * (w - ow)
        for oh in sorted({max(1, boundary - 1), max(1, boundary), max(1, min(h - 1, boundary + 1)), 1, h - 1}):
            x = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            rule = ref.PILLOW_VERTICAL_FIRST and oh < h and h - oh > 2 * (w - ow)
            assert ref.vertical_first((h, w), (oh, ow)) == rule
            for resample in [ref.BILINEAR, ref.BICUBIC]:
                assert_equal_pixels(f"order {(h, w)}->{(oh, ow)} filter {resample}",
                                    ref.resize(x, (oh, ow), resample), pil_resize(x, (oh, ow), resample))


def test_horizontal_pass_row_span_changes_nothing() -> None:
    """Pillow runs the horizontal pass only over the rows the vertical pass reads; rows are independent,
    so doing all rows and slicing gives the same temporary image."""
    x = random_pixels(300, 200, seed=3)
    vb, _ = ref.resample_coeffs(300, 37, ref.BICUBIC)
    hb, hk = ref.resample_coeffs(200, 51, ref.BICUBIC)
    row0, row1 = ref.row_span(vb)
    assert 0 <= row0 < row1 <= 300
    full = ref.resample_pass(x, hb, hk, axis=1)
    assert np.array_equal(ref.resample_pass(x[row0:row1], hb, hk, axis=1), full[row0:row1])


def test_coeffs_layout() -> None:
    bounds, coeffs = ref.resample_coeffs(1920, 597, ref.BICUBIC)
    assert bounds.shape == (597, 2) and coeffs.shape[0] == 597 and coeffs.dtype == np.int32
    assert (bounds[:, 0] >= 0).all() and (bounds[:, 0] + bounds[:, 1] <= 1920).all()
    assert (bounds[:, 1] <= coeffs.shape[1]).all()
    for i in [0, 1, 300, 596]:  # zero past the count; each row sums to ~1.0 in fixed point
        assert (coeffs[i, bounds[i, 1]:] == 0).all()
        assert abs(int(coeffs[i].sum()) - (1 << ref.PRECISION_BITS)) <= coeffs.shape[1]
    with pytest.raises(ValueError, match="resample 0 is not supported"):
        ref.resample_coeffs(10, 5, 0)


# ----------------------------------------------------------------------------- crop + normalize == ImageProcessor


@pytest.mark.parametrize("hw", [(336, 597), (597, 336), (336, 336), (100, 500), (500, 100), (7, 9), (337, 338)])
def test_crop_offsets_equal_hf_center_crop(hw: tuple[int, int]) -> None:
    x = random_pixels(*hw, seed=hw[0] + hw[1])
    expected = images_mod._center_crop(x, 336)
    lut = np.repeat(np.arange(256, dtype=np.float32)[None], 3, axis=0)  # identity: the crop alone
    got = ref.crop_normalize(x, 336, lut)
    assert np.array_equal(got.transpose(1, 2, 0), expected.astype(np.float32))


@pytest.mark.parametrize("cfg", [ImageProcessorConfig(image_size=336),
                                 ImageProcessorConfig(image_size=224, rescale_factor=0.0039, image_mean=(0.5,) * 3,
                                                      image_std=(0.25, 0.3, 0.7)),
                                 ImageProcessorConfig(image_size=64, do_rescale=False),
                                 ImageProcessorConfig(image_size=64, do_normalize=False)], ids=str)
def test_lut_pipeline_equals_image_processor(cfg: ImageProcessorConfig) -> None:
    """reference.resize + crop_normalize(lut) == ImageProcessor.preprocess_one, bit for bit."""
    lut = ref.normalize_lut(cfg.rescale_factor if cfg.do_rescale else None,
                            cfg.image_mean if cfg.do_normalize else None, cfg.image_std if cfg.do_normalize else None)
    processor = ImageProcessor(cfg)
    for hw in [(480, 640), (50, 300), (cfg.image_size, cfg.image_size), (3, 3)]:
        x = random_pixels(*hw, seed=hw[0])
        out_hw = images_mod._shortest_edge_hw(hw[0], hw[1], cfg.shortest_edge)
        got = ref.crop_normalize(ref.resize(x, out_hw, cfg.resample), cfg.image_size, lut)
        expected = processor.preprocess_one(Image.fromarray(x))
        assert got.dtype == expected.dtype == np.float32
        assert np.array_equal(got, expected), f"{hw}: max diff {np.abs(got - expected).max()}"


def jpeg_bytes(x: np.ndarray, **save: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format="JPEG", quality=90, **save)
    return buf.getvalue()


def png_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format="PNG")
    return buf.getvalue()


def smooth_pixels(h: int, w: int, seed: int) -> np.ndarray:
    """Gradients + mild noise: what JPEG is made for (random noise exaggerates decoder differences)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), (xx + yy) * 127 / max(h + w - 2, 1)], -1)
    return np.clip(base + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- CPU pool and decode routing


@pytest.mark.parametrize("workers", [1, 3])
def test_cpu_pool_equals_image_processor(workers: int, tmp_path) -> None:
    from engine.preprocess import make_preprocessor

    cfg = ImageProcessorConfig(image_size=64)
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(random_pixels(50, 90, seed=1)))
    images = [jpeg_bytes(smooth_pixels(120, 80, seed=2)), str(path), Image.fromarray(random_pixels(64, 64, seed=3)),
              png_bytes(random_pixels(7, 300, seed=4))]
    pre = make_preprocessor(cfg, "cpu", workers)
    try:
        got = pre.preprocess(images)
        assert torch.equal(got, ImageProcessor(cfg).preprocess(images))
        pixels, sizes = pre.preprocess_items(images)  # the engine's interface (select_items)
        want, want_sizes = ImageProcessor(cfg).preprocess_items(images)
        assert torch.equal(pixels, want) and sizes == want_sizes and len(sizes) == 4
        assert pre.preprocess([]).shape == (0, 3, 64, 64)
        with pytest.raises(images_mod.ImageError, match="image 1: cannot decode"):
            pre.preprocess([images[0], b"not an image", b"also not"])
    finally:
        pre.close()


def test_nvjpeg_routing_rules(tmp_path) -> None:
    from engine.preprocess import nvjpeg_decodable, source_bytes

    x = smooth_pixels(40, 60, seed=5)
    plain = jpeg_bytes(x)
    assert nvjpeg_decodable(plain)
    assert not nvjpeg_decodable(png_bytes(x)), "PNG goes to PIL"
    assert not nvjpeg_decodable(plain[: len(plain) // 2]), "truncated data goes to PIL (which rejects it)"
    assert not nvjpeg_decodable(jpeg_bytes(x, progressive=True)), "progressive JPEG goes to PIL"
    gray = io.BytesIO()
    Image.fromarray(x[..., 0]).save(gray, format="JPEG", quality=90)
    assert not nvjpeg_decodable(gray.getvalue()), "grayscale goes to PIL"
    cmyk = io.BytesIO()
    Image.fromarray(x).convert("CMYK").save(cmyk, format="JPEG", quality=90)
    assert not nvjpeg_decodable(cmyk.getvalue()), "CMYK goes to PIL"
    for orientation, expected in [(1, True), (3, False), (6, False), (8, False)]:
        exif = Image.Exif()
        exif[0x0112] = orientation
        assert nvjpeg_decodable(jpeg_bytes(x, exif=exif.tobytes())) == expected, f"EXIF orientation {orientation}"
    # sources: bytes, paths, data URLs give bytes; PIL images and bad sources go to load_image
    path = tmp_path / "a.jpg"
    path.write_bytes(plain)
    url = "data:image/jpeg;base64," + base64.b64encode(plain).decode()
    assert source_bytes(plain) == source_bytes(str(path)) == source_bytes(path) == source_bytes(url) == plain
    assert source_bytes(Image.fromarray(x)) is None
    assert source_bytes(str(tmp_path / "missing.jpg")) is None
    assert source_bytes("data:image/jpeg;base64,@@@") is None


def test_make_preprocessor_errors() -> None:
    from engine.preprocess import make_preprocessor

    cfg = ImageProcessorConfig(image_size=32)
    with pytest.raises(images_mod.ImageError, match="workers = 0"):
        make_preprocessor(cfg, "cpu", workers=0)
    with pytest.raises(images_mod.ImageError, match="float32"):
        make_preprocessor(cfg, "cpu", dtype=torch.bfloat16)


# ----------------------------------------------------------------------------- GPU preprocessor (device machine)


def _gpu_ready() -> bool:
    from epd_kernels import cuda_available  # the image kernels are in the same extension

    return cuda_available()


# nvjpeg vs libjpeg (PIL) decode, after resize, in uint8 levels. bench_preprocess measured on the H200
# (2026-12-01) max 7 / mean 0.26 at 336x336, 2 / 0.11 at 1080p; these test images are not the bench's,
# so the bound keeps a margin until this test prints its own figures there.
JPEG_MEAN_LEVELS, JPEG_MAX_LEVELS = 1.5, 40
MIXED_HW = [(1080, 1920), (37, 1000), (336, 336), (200, 100), (1, 1), (3024, 4032), (500, 333)]


@functools.cache
def mixed_pngs() -> list:
    """PNGs of MIXED_HW (random pixels), an already decoded PIL image and a half-transparent RGBA PNG."""
    rng = np.random.default_rng(0)
    images: list = [png_bytes(random_pixels(h, w, seed=int(rng.integers(1 << 30)))) for h, w in MIXED_HW]
    images.append(Image.fromarray(random_pixels(99, 77, seed=1)))
    rgba = np.concatenate([random_pixels(40, 50, seed=2), np.full((40, 50, 1), 128, np.uint8)], axis=-1)
    images.append(png_bytes(rgba))  # transparency: load_image's alpha rule
    return images


@pytest.mark.parametrize("cfg", [ImageProcessorConfig(image_size=336),
                                 ImageProcessorConfig(image_size=224, resize_hw=(300, 200), resample=ref.LANCZOS),
                                 ImageProcessorConfig(image_size=64, do_center_crop=False, resize_hw=(64, 64)),
                                 ImageProcessorConfig(image_size=100, do_resize=False)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_ready(), reason="needs CUDA and epd_kernels._epd_C")
def test_gpu_preprocessor_png_bit_exact(cfg: ImageProcessorConfig, dtype: torch.dtype) -> None:
    from engine.preprocess import make_preprocessor

    images = mixed_pngs()
    pre = make_preprocessor(cfg, "cuda", workers=2, dtype=dtype)
    got = pre.preprocess(images)
    expected = ImageProcessor(cfg).preprocess(images).to(dtype)
    assert got.device.type == "cuda" and got.dtype == dtype
    assert torch.equal(got.cpu(), expected), f"max diff {(got.cpu().float() - expected.float()).abs().max().item()}"
    pixels, sizes = pre.preprocess_items(images)
    assert torch.equal(pixels.cpu(), expected) and sizes == ImageProcessor(cfg).preprocess_items(images)[1]
    assert pre.preprocess([]).shape == (0, 3, cfg.image_size, cfg.image_size)
    pre.close()


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_ready(), reason="needs CUDA and epd_kernels._epd_C")
def test_gpu_resize_normalize_same_pixels_bit_exact() -> None:
    from engine.preprocess import GpuImagePreprocessor

    cfg = ImageProcessorConfig(image_size=336)
    pixels = [random_pixels(h, w, seed=h + w) for h, w in MIXED_HW]
    pre = GpuImagePreprocessor(cfg)
    chw = [torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))).cuda().permute(1, 2, 0) for x in pixels]
    expected = ImageProcessor(cfg).preprocess([Image.fromarray(x) for x in pixels])
    assert torch.equal(pre.resize_normalize(pixels).cpu(), expected)  # numpy in, uploaded
    assert torch.equal(pre.resize_normalize(chw).cpu(), expected)  # nvjpeg's [3, H, W] layout as a view


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_ready(), reason="needs CUDA and epd_kernels._epd_C")
def test_gpu_preprocessor_jpeg_within_decode_tolerance() -> None:
    from engine.preprocess import GpuImagePreprocessor, nvjpeg_available

    if not nvjpeg_available():
        pytest.skip("needs torchvision (nvjpeg)")
    cfg = ImageProcessorConfig(image_size=336)
    rotated = Image.Exif()
    rotated[0x0112] = 6
    jpegs = [jpeg_bytes(smooth_pixels(h, w, seed=h * 3 + w)) for h, w in [(1080, 1920), (3024, 4032), (480, 640)]]
    jpegs.append(jpeg_bytes(smooth_pixels(300, 200, seed=5), exif=rotated.tobytes()))  # goes to PIL
    pre = GpuImagePreprocessor(cfg)
    decoded = pre.decode(jpegs)
    assert [not t.is_contiguous() for t in decoded] == [True, True, True, False], "nvjpeg for 0-2, PIL for 3"
    got = pre.preprocess(jpegs).cpu()
    expected = ImageProcessor(cfg).preprocess(jpegs)
    std = torch.tensor(cfg.image_std).view(1, 3, 1, 1)
    levels = ((got - expected) * std * 255).abs()  # back to uint8 levels
    assert torch.equal(got[3], expected[3]), "the EXIF-rotated JPEG is decoded by PIL: exact"
    assert levels.mean() <= JPEG_MEAN_LEVELS and levels.max() <= JPEG_MAX_LEVELS, \
        f"nvjpeg vs PIL: mean {levels.mean().item():.3f}, max {levels.max().item():.1f} levels"
    pre.marks = marks = {}  # as the encoder asks: its decode and resize stamped (host times)
    before = time.perf_counter()
    pre.preprocess(jpegs)
    assert before < marks["decode_end"] < marks["resize_end"] < time.perf_counter(), marks


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_ready(), reason="needs CUDA and epd_kernels._epd_C")
def test_gpu_preprocessor_errors_are_image_processors() -> None:
    from engine.preprocess import GpuImagePreprocessor

    pre = GpuImagePreprocessor(ImageProcessorConfig(image_size=32))
    with pytest.raises(images_mod.ImageError, match="image 1: cannot decode"):
        pre.preprocess([png_bytes(random_pixels(8, 8, seed=0)), b"not an image"])
    with pytest.raises(images_mod.ImageError, match="no GPU path"):
        GpuImagePreprocessor(ImageProcessorConfig(image_size=32, resample=0))


# (height, width) at tile 336: landscape, smaller than a tile, very wide, tall, a pinpoint exactly, 4032x3024
ANYRES_HW = [(480, 640), (200, 150), (60, 1500), (1400, 300), (336, 672), (3024, 4032)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_ready(), reason="needs CUDA and epd_kernels._epd_C")
def test_gpu_anyres_png_bit_exact(dtype: torch.dtype) -> None:
    """GpuAnyresPreprocessor == AnyresImageProcessor (LLaVA-NeXT's pinpoints, tile 336) on PNGs, all in one
    call and two in one call; select_items on its device pixels."""
    from engine.config import DEFAULT_PINPOINTS, ModelConfig
    from engine.images_anyres import AnyresImageProcessor, select_items
    from engine.preprocess import GpuImagePreprocessor
    from engine.preprocess_anyres import GpuAnyresPreprocessor

    cfg = ImageProcessorConfig(image_size=336)
    rng = np.random.default_rng(3)
    images = [png_bytes(random_pixels(h, w, seed=int(rng.integers(1 << 30)))) for h, w in ANYRES_HW]
    cpu = AnyresImageProcessor(cfg, DEFAULT_PINPOINTS)
    gpu = GpuAnyresPreprocessor(GpuImagePreprocessor(cfg, "cuda", dtype, workers=2), DEFAULT_PINPOINTS)
    for batch in (images, images[1:3]):
        want, want_sizes = cpu.preprocess_items(batch)
        got, sizes = gpu.preprocess_items(batch)
        assert got.device.type == "cuda" and got.dtype == dtype and sizes == want_sizes
        assert torch.equal(got.cpu(), want.to(dtype)), \
            f"max diff {(got.cpu().float() - want.to(dtype).float()).abs().max().item()}"
    raw = {"architectures": ["LlavaNextForConditionalGeneration"], "image_token_index": 511,
           "image_grid_pinpoints": [list(p) for p in DEFAULT_PINPOINTS],
           "vision_config": {"image_size": 336, "patch_size": 14, "num_hidden_layers": 2},
           "text_config": {"hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1,
                           "intermediate_size": 64, "vocab_size": 512}}
    model = ModelConfig.from_dict(raw)
    items = [(1, 2), (0, 0), (0, 1)]
    picked = select_items(gpu, model, images[:2], items, [])
    everything, _ = cpu.preprocess_items(images[:2])
    first = model.image_layout(*ANYRES_HW[0]).num_items
    assert torch.equal(picked.cpu(), everything[[first + 2, 0, 1]].to(dtype))
    assert gpu.preprocess_items([])[0].shape == (0, 3, 336, 336)
    gpu.close()


def test_stage_image_processor_choice(tiny_llava, tiny_llava_next) -> None:
    """An encoding stage on the CPU (or with image_preprocess "cpu") gets the PIL pool (LLaVA-NeXT: the PIL
    anyres processor); on a GPU with the cuda backend, the GPU preprocessor (checked where CUDA is)."""
    from engine.config import EngineConfig, ModelConfig
    from engine.images_anyres import AnyresImageProcessor
    from engine.preprocess import CpuImagePreprocessor, GpuImagePreprocessor, stage_image_processor
    from engine.preprocess_anyres import GpuAnyresPreprocessor

    cfg = ModelConfig.from_dir(tiny_llava)
    cpu = stage_image_processor(EngineConfig(str(tiny_llava), device="cpu", backend="torch", image_workers=2), cfg)
    assert isinstance(cpu, CpuImagePreprocessor)
    with pytest.raises(Exception, match="image_preprocess = 'gpu'; use 'auto' or 'cpu'"):
        EngineConfig(str(tiny_llava), image_preprocess="gpu")
    if _gpu_ready():
        gpu = stage_image_processor(EngineConfig(str(tiny_llava), device="cuda", backend="cuda", dtype="bfloat16"),
                                    cfg)
        assert isinstance(gpu, GpuImagePreprocessor) and gpu.dtype == torch.bfloat16
        off = EngineConfig(str(tiny_llava), device="cuda", backend="cuda", image_preprocess="cpu")
        assert isinstance(stage_image_processor(off, cfg), CpuImagePreprocessor)
    next_cfg = ModelConfig.from_dir(tiny_llava_next)  # LLaVA-NeXT: the PIL anyres processor, or its GPU twin
    cpu = stage_image_processor(EngineConfig(str(tiny_llava_next), device="cpu", backend="torch"), next_cfg)
    assert isinstance(cpu, AnyresImageProcessor)
    if _gpu_ready():
        gpu = stage_image_processor(EngineConfig(str(tiny_llava_next), device="cuda", backend="cuda",
                                                 dtype="bfloat16"), next_cfg)
        assert isinstance(gpu, GpuAnyresPreprocessor) and gpu.dtype == torch.bfloat16
        assert gpu.pinpoints == cpu.pinpoints
        off = EngineConfig(str(tiny_llava_next), device="cuda", backend="cuda", image_preprocess="cpu")
        assert isinstance(stage_image_processor(off, next_cfg), AnyresImageProcessor)



def test_warm_jpeg_is_large_and_takes_the_nvjpeg_path() -> None:
    """warm_up's JPEG: WARM_JPEG_HW, decodable by nvjpeg (else it would warm the wrong path), and
    bigger than a photo of that size (~0.3-0.5 bytes per pixel at quality 90)."""
    from engine.preprocess import WARM_JPEG_HW, _warm_jpeg, nvjpeg_decodable

    data = _warm_jpeg()
    assert nvjpeg_decodable(data)
    with Image.open(io.BytesIO(data)) as im:
        assert (im.height, im.width) == WARM_JPEG_HW and im.mode == "RGB"
    assert len(data) > 0.6 * WARM_JPEG_HW[0] * WARM_JPEG_HW[1]


NO_WAIT_CASES = ("same", "new", "larger")  # the timed batch: the warm-up's, new content, bigger bitstreams


def no_wait_check(case: str = "same") -> str:
    """~280 ms of GEMMs queued on another stream, then GpuImagePreprocessor.decode of 8 1080p JPEGs
    (nvjpeg) by a decoder warmed as the engine's are (warm_up(8), then one batch): "decode_ms
    gemm_ms". The timed batch is the warm batch ("same"), 8 others of the same kind ("new": an
    engine's next batch), or 8 noisier ones whose bitstreams are larger than the warm batch's
    ("larger"). Without warm_up, "new" and "larger" waited (323 / 346 ms with ~400 ms of GEMMs: nvjpeg
    grew its buffers, which synchronizes the device; H200, session 13 call 2). Run in a fresh
    process: CUDA_DEVICE_MAX_CONNECTIONS is read when the context is made."""
    from engine.preprocess import GpuImagePreprocessor

    gpu = GpuImagePreprocessor(ImageProcessorConfig(image_size=336), "cuda", torch.bfloat16)
    gpu.warm_up(8)
    rng = np.random.default_rng(7)
    plain = [jpeg_bytes(smooth_pixels(1080, 1920, s)) for s in range(8)]
    noisy = [jpeg_bytes(np.clip(smooth_pixels(1080, 1920, 200 + s) + rng.normal(0, 40, (1080, 1920, 3)),
                                0, 255).astype(np.uint8)) for s in range(8)]
    assert min(map(len, noisy)) > max(map(len, plain))
    fresh = [jpeg_bytes(smooth_pixels(1080, 1920, 100 + s)) for s in range(8)]
    warm, batch = plain, {"same": plain, "new": fresh, "larger": noisy}[case]
    dec, other = torch.cuda.Stream(), torch.cuda.Stream()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    with torch.cuda.stream(dec):
        for _ in range(3):
            gpu.decode(warm)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(other):
        start.record()
        for _ in range(200):
            a @ a
        end.record()
    end.synchronize()
    gemm_ms = start.elapsed_time(end)
    with torch.cuda.stream(other):
        for _ in range(200):
            a @ a
    t0 = time.perf_counter()
    with torch.cuda.stream(dec):
        out = gpu.decode(batch)
    dec.synchronize()
    decode_ms = 1e3 * (time.perf_counter() - t0)
    torch.cuda.synchronize()
    assert [tuple(x.shape) for x in out] == [(1080, 1920, 3)] * 8
    return f"{decode_ms:.1f} {gemm_ms:.1f}"


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_ready(), reason="needs CUDA and epd_kernels._epd_C")
@pytest.mark.parametrize("case", NO_WAIT_CASES)
def test_jpeg_decode_does_not_wait_for_other_streams(case: str) -> None:
    """With the workers' CUDA hardware queues (ipc/worker.CUDA_QUEUES), a decode does not wait for
    another stream's work, whatever the batch (see no_wait_check). At CUDA's default of 8 it did
    (317 ms with 410 ms of GEMMs queued, H200, session 10): nvjpeg's internal streams shared a queue
    with the busy stream."""
    from ipc.worker import CUDA_QUEUES

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "CUDA_DEVICE_MAX_CONNECTIONS": CUDA_QUEUES, "PYTHONPATH": str(root)}
    code = "import sys; sys.path.insert(0, 'tests'); import test_preprocess as t; print(t.no_wait_check(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", code, case], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    decode_ms, gemm_ms = map(float, proc.stdout.split()[-2:])
    print(f"CUDA_DEVICE_MAX_CONNECTIONS={CUDA_QUEUES}, {case} batch: decode {decode_ms:.1f} ms with "
          f"{gemm_ms:.1f} ms of GEMMs")
    assert gemm_ms > 60, f"the GEMMs took {gemm_ms:.1f} ms: too short to tell a wait"
    assert decode_ms < gemm_ms / 2, f"decode took {decode_ms:.1f} ms with {gemm_ms:.1f} ms of GEMMs on another stream"
