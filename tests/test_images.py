"""engine.images against transformers' PIL-backend CLIP processor, plus input forms and errors."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from engine import images as images_mod
from engine.images import ImageError, ImageProcessor, ImageProcessorConfig, hf_composites_alpha, load_image

SIZES_HW = [(1, 1), (7, 97), (97, 7), (333, 500), (500, 333), (84, 84), (85, 83), (480, 640)]
MODES = ["RGB", "RGBA", "L", "P", "LA", "CMYK", "I;16"]
TOL = 1e-5


def random_image(h: int, w: int, mode: str, rng: np.random.Generator) -> Image.Image:
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 400, (h, w), dtype=np.uint16))
    if mode == "P":
        rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        return rgb.quantize(colors=64)
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2, "CMYK": 4}[mode]
    arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    if channels == 1:
        return Image.fromarray(arr[..., 0])
    if mode == "LA":
        return Image.merge("LA", [Image.fromarray(arr[..., i]) for i in range(2)])
    return Image.fromarray(arr, mode=mode) if mode == "CMYK" else Image.fromarray(arr)


def hf_pixels(image: Image.Image, **kwargs: object) -> np.ndarray:
    proc = CLIPImageProcessorPil(**kwargs)
    return np.asarray(proc(images=[image], return_tensors="np")["pixel_values"])


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@pytest.mark.parametrize("image_size", [84, 336])
@pytest.mark.parametrize("mode", MODES)
def test_matches_hf_pil_clip(image_size: int, mode: str) -> None:
    rng = np.random.default_rng(image_size * 31 + MODES.index(mode))
    proc = ImageProcessor(ImageProcessorConfig(image_size=image_size))
    worst = 0.0
    for h, w in SIZES_HW:
        image = random_image(h, w, mode, rng)
        assert image.mode == mode
        ours = proc.preprocess([image])
        assert ours.dtype == torch.float32 and ours.shape == (1, 3, image_size, image_size)
        ref = hf_pixels(image, size={"shortest_edge": image_size}, crop_size=image_size)
        diff = float(np.abs(ours.numpy() - ref).max())
        assert diff <= TOL, f"{mode} {h}x{w} -> {image_size}: max abs diff {diff}"
        worst = max(worst, diff)
    print(f"max abs diff {mode} image_size={image_size}: {worst}")


def with_transparency(image: Image.Image) -> Image.Image:
    """A non-alpha mode that still has transparent pixels, as PNG's tRNS chunk gives them."""
    colour = image.getpixel((0, 0))
    image.info["transparency"] = colour
    return image


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "PA"])
def test_transparency_entry_matches_hf(mode: str) -> None:
    # Images that carry transparency without an alpha band: 5.24 composites them too.
    rng = np.random.default_rng(5)
    proc = ImageProcessor(ImageProcessorConfig(image_size=84))
    for h, w in [(7, 97), (85, 83)]:
        base = random_image(h, w, "P" if mode == "PA" else mode, rng)
        image = base.convert("PA") if mode == "PA" else with_transparency(base)
        ref = hf_pixels(image, size={"shortest_edge": 84}, crop_size=84)
        diff = float(np.abs(proc.preprocess([image]).numpy() - ref).max())
        assert diff <= TOL, f"{mode} with transparency {h}x{w}: max abs diff {diff}"


def test_alpha_policies() -> None:
    # Both HF behaviours, whichever release is installed: 5.17 drops alpha, 5.24 blends onto white.
    rgba = np.array([[[200, 100, 50, 0], [200, 100, 50, 255], [200, 100, 50, 128]]], dtype=np.uint8)
    image = Image.fromarray(rgba, mode="RGBA")
    dropped = np.asarray(load_image(image, composite_alpha=False))
    assert (dropped == [200, 100, 50]).all()
    blended = np.asarray(load_image(image, composite_alpha=True)).astype(int)
    assert blended[0, 0].tolist() == [255, 255, 255] and blended[0, 1].tolist() == [200, 100, 50]
    expect = np.round(128 / 255 * np.array([200, 100, 50]) + (1 - 128 / 255) * 255)
    assert np.abs(blended[0, 2] - expect).max() <= 1
    assert load_image(image).mode == "RGB"
    opaque = Image.fromarray(rgba[..., :3])  # no transparency: the policy changes nothing
    assert np.array_equal(np.asarray(load_image(opaque, composite_alpha=True)), rgba[..., :3])


def test_alpha_policy_follows_installed_transformers() -> None:
    import transformers
    from packaging.version import Version

    composites = hf_composites_alpha()
    assert isinstance(composites, bool)
    if Version(transformers.__version__) <= Version("5.17.0"):
        assert not composites, transformers.__version__
    if Version(transformers.__version__) >= Version("5.24.0"):
        assert composites, transformers.__version__


@pytest.mark.parametrize(
    ("cfg_kwargs", "hf_kwargs"),
    [
        (  # size as height/width, then crop (a no-op here)
            {"resize_hw": (84, 84)},
            {"size": {"height": 84, "width": 84}, "crop_size": 84},
        ),
        (  # size as height/width, no crop, bilinear
            {"resize_hw": (84, 84), "do_center_crop": False, "resample": 2},
            {"size": {"height": 84, "width": 84}, "do_center_crop": False, "resample": 2},
        ),
        (  # resize larger than the crop; other mean/std (SigLIP-like)
            {"shortest_edge": 100, "image_mean": (0.5,) * 3, "image_std": (0.5,) * 3},
            {"size": {"shortest_edge": 100}, "crop_size": 84,
             "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
        ),
        (  # no resize: small images are zero padded by the center crop, large ones cropped
            {"do_resize": False},
            {"do_resize": False, "crop_size": 84},
        ),
        (  # no rescale (normalize on 0..255 values)
            {"do_rescale": False},
            {"size": {"shortest_edge": 84}, "crop_size": 84, "do_rescale": False},
        ),
    ],
)
def test_matches_hf_other_settings(cfg_kwargs: dict, hf_kwargs: dict) -> None:
    rng = np.random.default_rng(7)
    proc = ImageProcessor(ImageProcessorConfig(image_size=84, **cfg_kwargs))
    for h, w in SIZES_HW:
        image = random_image(h, w, "RGB", rng)
        diff = float(np.abs(proc.preprocess([image]).numpy() - hf_pixels(image, **hf_kwargs)).max())
        assert diff <= TOL, f"{cfg_kwargs} {h}x{w}: max abs diff {diff}"


def test_input_forms_identical(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = random_image(61, 90, "RGBA", rng)
    data = encode(image)
    path = tmp_path / "img.png"
    path.write_bytes(data)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    forms = [str(path), path, data, bytearray(data), Image.open(io.BytesIO(data)), image, url]
    proc = ImageProcessor(ImageProcessorConfig(image_size=84))
    batch = proc.preprocess(forms)
    assert batch.shape == (len(forms), 3, 84, 84)
    for i in range(1, len(forms)):
        assert torch.equal(batch[0], batch[i]), f"form {i} ({type(forms[i]).__name__}) differs"
    assert load_image(url).mode == "RGB"
    assert proc.preprocess([]).shape == (0, 3, 84, 84)


def test_errors_name_the_problem(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    png = encode(random_image(40, 50, "RGB", rng), "PNG")
    jpeg = encode(random_image(40, 50, "RGB", rng), "JPEG")
    missing = tmp_path / "nope.png"
    cases: list[tuple[object, str]] = [
        (missing, f"file not found: {missing}"),
        (b"definitely not an image", "cannot decode 23 bytes as an image (PIL:"),
        (b"", "cannot decode 0 bytes"),
        (png[: len(png) // 2], f"cannot decode {len(png) // 2} bytes as an image"),
        (jpeg[: len(jpeg) // 2], f"cannot decode {len(jpeg) // 2} bytes as an image"),
        ("data:image/png;base64,@@not-base64@@", "data URL has invalid base64"),
        ("data:image/png;base64," + base64.b64encode(b"junk").decode(), "cannot decode data URL"),
        ("data:image/png,rawdata", "only base64 data URLs"),
        (1234, "unsupported type int; expected a path, bytes, a PIL image or a data: URL"),
    ]
    proc = ImageProcessor(ImageProcessorConfig(image_size=84))
    for bad, expected in cases:
        with pytest.raises(ImageError) as info:
            proc.preprocess([png, jpeg, bad])
        msg = str(info.value)
        assert msg.startswith("image 2: ") and expected in msg, msg
    truncated = tmp_path / "half.jpg"
    truncated.write_bytes(jpeg[: len(jpeg) // 2])
    with pytest.raises(ImageError, match=r"image 0: cannot decode .*half\.jpg"):
        load_image(truncated)


def test_decompression_bomb(monkeypatch: pytest.MonkeyPatch) -> None:
    # A 12000x10000 PNG header: refused from the header, before decoding any pixel.
    ihdr = struct.pack(">IIBBBBB", 12000, 10000, 8, 2, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")
    with pytest.raises(ImageError, match="12000x10000 is 120.0 megapixels; the limit is 100"):
        load_image(bomb, index=3)
    small = Image.new("RGB", (50, 50))
    monkeypatch.setattr(images_mod, "MAX_IMAGE_PIXELS", 1000)
    for src in (small, encode(small)):
        with pytest.raises(ImageError, match="50x50 is 0.0 megapixels"):
            load_image(src)


def test_config_from_model_dir(tmp_path: Path) -> None:
    assert ImageProcessorConfig.from_model_dir(tmp_path, 336) == ImageProcessorConfig(
        image_size=336, shortest_edge=336
    )
    llava = {  # as llava-hf/llava-1.5-7b-hf writes it
        "crop_size": {"height": 336, "width": 336}, "do_center_crop": True,
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_processor_type": "CLIPImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3,
        "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 336},
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(llava))
    cfg = ImageProcessorConfig.from_model_dir(tmp_path, 336)
    assert cfg == ImageProcessorConfig(image_size=336)
    for size, crop, want in [(224, 224, {"shortest_edge": 224}), ([84, 84], 84, {"hw": (84, 84)}),
                             ({"height": 84, "width": 84}, 84, {"hw": (84, 84)})]:
        raw = {"size": size, "crop_size": crop, "image_mean": 0.5, "image_std": [0.5] * 3}
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(raw))
        cfg = ImageProcessorConfig.from_model_dir(tmp_path, crop)
        assert cfg.shortest_edge == want.get("shortest_edge") and cfg.resize_hw == want.get("hw")
        assert cfg.image_mean == cfg.image_std == (0.5, 0.5, 0.5)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            {"crop_size": {"height": 336, "width": 300}},
            (
                "crop_size {'height': 336, 'width': 300} does not match the vision tower's "
                "image_size 336x336"
            ),
        ),
        ({"crop_size": 224}, "crop_size 224 does not match"),
        ({"size": {"shortest_edge": 336, "longest_edge": 600}}, "unsupported size"),
        ({"do_center_crop": False}, "without a center crop the output is not 336x336"),
        ({"do_pad": True}, "do_pad=true is not supported"),
    ],
)
def test_bad_preprocessor_config(tmp_path: Path, raw: dict, expected: str) -> None:
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(raw))
    with pytest.raises(ImageError) as info:
        ImageProcessorConfig.from_model_dir(tmp_path, 336)
    assert expected in str(info.value), str(info.value)


def test_check_image_reads_headers_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The EPD orchestrator's check: bad sources and too many pixels fail at once, data corrupt
    past the header passes (the encoder fails it), and it costs far less than a decode."""
    from engine.images import check_image

    rng = np.random.default_rng(3)
    data = encode(random_image(1080, 1920, "RGB", rng))
    truncated = data[: len(data) // 2]
    check_image(truncated)  # header intact
    with pytest.raises(ImageError, match="image 0: cannot decode"):
        load_image(truncated)
    with pytest.raises(ImageError, match="image 2: cannot decode 12 bytes"):
        check_image(b"not an image", 2)
    with pytest.raises(ImageError, match="file not found"):
        check_image(str(tmp_path / "missing.png"))
    with pytest.raises(ImageError, match="unsupported type int"):
        check_image(7)
    path = tmp_path / "big.png"
    path.write_bytes(data)
    check_image(str(path))
    check_image("data:image/png;base64," + base64.b64encode(data).decode())
    with monkeypatch.context() as m:
        m.setattr(images_mod, "MAX_IMAGE_PIXELS", 1920 * 1080 - 1)
        with pytest.raises(ImageError, match="1920x1080 is 2.1 megapixels"):
            check_image(truncated)

    def best_of(fn, n: int = 3) -> float:
        import time

        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    assert best_of(lambda: check_image(data)) * 10 < best_of(lambda: load_image(data))


def test_the_alpha_policy_is_resolved_when_the_processor_is_built() -> None:
    """Not on the first image: that would put a transformers import on a request's TTFT."""
    from engine.images import ImageProcessor, ImageProcessorConfig, hf_composites_alpha

    hf_composites_alpha.cache_clear()
    processor = ImageProcessor(ImageProcessorConfig(image_size=336))
    assert hf_composites_alpha.cache_info().currsize == 1
    assert processor.composite_alpha is hf_composites_alpha()
    assert ImageProcessor(ImageProcessorConfig(image_size=336, composite_alpha=False)).composite_alpha is False
