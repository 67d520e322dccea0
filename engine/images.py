"""Image loading and CLIP preprocessing, step for step as HF's `CLIPImageProcessorPil`:
RGB, PIL resize on uint8, HF center crop (zero pad if small), float64 rescale, float32 normalize.

The RGB conversion follows the installed transformers release: up to 5.17 HF converts with a
plain `convert("RGB")` (transparent pixels keep their colour); later releases (5.24 and on)
composite any transparency (an alpha band or a `transparency` entry) onto white first.
`hf_composites_alpha()` finds out which by asking HF's own converter once.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

MAX_IMAGE_PIXELS = 100_000_000  # decompression-bomb guard, checked on the header size
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageError(ValueError):
    """Bad image input or preprocessing config; the message says which and what was wrong."""


def _check_pixels(image: Image.Image, index: int) -> None:
    w, h = image.size
    if w * h > MAX_IMAGE_PIXELS:
        raise ImageError(f"image {index}: {w}x{h} is {w * h / 1e6:.1f} megapixels; "
                         f"the limit is {MAX_IMAGE_PIXELS / 1e6:g} megapixels")


def _decode(data: bytes, what: str, index: int, header_only: bool = False) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_pixels(image, index)  # before any pixel is decoded
            if not header_only:
                image.load()  # decode now: truncated/corrupt data fails here, not mid-batch
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"image {index}: {what} is too large to decode ({e})") from e
    except Exception as e:
        raise ImageError(f"image {index}: cannot decode {what} as an image (PIL: {e})") from e
    return image


def _read_file(src: str | Path, index: int, limit: int = -1) -> tuple[bytes, str]:
    """The file's bytes (the first `limit` of them, if given) and its name as errors show it."""
    path = Path(src)
    shown = str(path) if len(str(path)) <= 200 else str(path)[:200] + "..."
    if not path.is_file():
        raise ImageError(f"image {index}: file not found: {shown}")
    try:
        with path.open("rb") as f:
            return f.read(limit), shown
    except OSError as e:
        raise ImageError(f"image {index}: cannot read {shown}: {e}") from e


def data_url_bytes(url: str, index: int = 0) -> bytes:
    """The encoded image a base64 data URL carries (`index` labels errors)."""
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise ImageError(f"image {index}: only base64 data URLs are supported "
                         "('data:image/png;base64,...')")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"image {index}: data URL has invalid base64 ({e})") from e


def _from_data_url(url: str, index: int, header_only: bool = False) -> Image.Image:
    data = data_url_bytes(url, index)
    return _decode(data, f"data URL ({len(data)} bytes)", index, header_only)


@functools.cache
def hf_composites_alpha() -> bool:
    """True when the installed transformers composites transparent pixels onto white in its RGB
    conversion (releases after 5.17), False when it drops the alpha band (5.17 and before).

    Found by converting one fully transparent black pixel with HF's own `convert_to_rgb`: no
    version table to keep up to date, and it matches whatever release the user has."""
    from transformers.image_transforms import convert_to_rgb

    probe = Image.new("RGBA", (1, 1), (0, 0, 0, 0))
    try:
        rgb = convert_to_rgb(probe, return_numpy=True)  # newer releases warn without it
    except TypeError:  # older signature: convert_to_rgb(image)
        rgb = convert_to_rgb(probe)
    return bool(np.asarray(rgb).reshape(-1)[:3].min() == 255)


def to_rgb(image: Image.Image, composite_alpha: bool) -> Image.Image:
    """RGB as HF converts: with composite_alpha, transparency (an alpha band, or a palette / tRNS
    `transparency` entry) is blended onto white; without, `convert("RGB")` drops it."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if composite_alpha and has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(src: Any, index: int = 0, composite_alpha: bool | None = None) -> Image.Image:
    """Load a path, bytes, PIL image or base64 data URL as a fully decoded RGB image.

    EXIF orientation is applied (as `transformers.image_utils.load_image` does); `index`
    only labels error messages ("image 2: ..."). composite_alpha: blend transparency onto white
    (True), drop it (False), or do what the installed transformers does (None).
    """
    if isinstance(src, Image.Image):
        _check_pixels(src, index)
        try:
            src.load()
        except Exception as e:
            raise ImageError(f"image {index}: PIL image cannot be decoded (PIL: {e})") from e
        image = src
    elif isinstance(src, (bytes, bytearray, memoryview)):
        image = _decode(bytes(src), f"{len(src)} bytes", index)
    elif isinstance(src, str) and src.startswith("data:"):
        image = _from_data_url(src, index)
    elif isinstance(src, (str, Path)):
        data, shown = _read_file(src, index)
        image = _decode(data, f"{shown} ({len(data)} bytes)", index)
    else:
        raise ImageError(f"image {index}: unsupported type {type(src).__name__}; "
                         "expected a path, bytes, a PIL image or a data: URL")
    try:
        image = ImageOps.exif_transpose(image)
        return to_rgb(image, hf_composites_alpha() if composite_alpha is None else composite_alpha)
    except Exception as e:
        raise ImageError(f"image {index}: cannot convert mode {image.mode} to RGB ({e})") from e


def check_image(src: Any, index: int = 0) -> tuple[int, int]:
    """What can be checked without decoding pixels: the source type, that it can be read, that
    its header names an image format PIL knows, and the pixel limit. For a caller (the EPD
    orchestrator) that hands the image to another process to decode: a full decode costs it tens
    of ms per image on the thread that serves every request; data that is corrupt past the
    header then fails its request in the encoder.

    Returns the image's (height, width) as load_image will give it (EXIF orientation applied,
    read from the EXIF block found with the header), which LLaVA-NeXT's token count needs."""
    if isinstance(src, Image.Image):
        _check_pixels(src, index)
        return _oriented_hw(src, src.getexif().get(_ORIENTATION, 1))
    if isinstance(src, (bytes, bytearray, memoryview)):
        image = _decode(bytes(src), f"{len(src)} bytes", index, header_only=True)
    elif isinstance(src, str) and src.startswith("data:"):
        image = _from_data_url(src, index, header_only=True)
    elif isinstance(src, (str, Path)):
        head, shown = _read_file(src, index, 1 << 16)  # enough for every header PIL identifies
        image = _decode(head, shown, index, header_only=True)
    else:
        raise ImageError(f"image {index}: unsupported type {type(src).__name__}; "
                         "expected a path, bytes, a PIL image or a data: URL")
    orientation = 1
    if image.info.get("exif"):  # getexif() could decode the whole image (PNG): read the header's block
        exif = Image.Exif()
        try:
            exif.load(image.info["exif"])
            orientation = exif.get(_ORIENTATION, 1)
        except Exception:  # a broken EXIF block: exif_transpose ignores it too
            orientation = 1
    return _oriented_hw(image, orientation)


_ORIENTATION = 0x0112  # the EXIF orientation tag


def _oriented_hw(image: Image.Image, orientation: int) -> tuple[int, int]:
    """(height, width) after ImageOps.exif_transpose: orientations 5-8 swap the sides."""
    w, h = image.size
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


@dataclass(frozen=True)
class ImageProcessorConfig:
    """CLIP preprocessing settings; the output is always `[3, image_size, image_size]`."""

    image_size: int  # vision tower input side = center-crop size
    shortest_edge: int | None = None  # resize the shortest edge to this (None: image_size) ...
    resize_hw: tuple[int, int] | None = None  # ... or resize to exactly (height, width)
    resample: int = 3  # PIL filter; 3 = bicubic
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    do_convert_rgb: bool = True  # load_image always converts; kept to mirror HF configs
    composite_alpha: bool | None = None  # transparency onto white; None: as the installed transformers

    def __post_init__(self) -> None:
        s = self.image_size
        if s <= 0:
            raise ImageError(f"image processor: image_size must be positive, got {s}")
        if self.shortest_edge is not None and self.resize_hw is not None:
            raise ImageError("image processor: set shortest_edge or resize_hw, not both")
        if self.shortest_edge is None and self.resize_hw is None:
            object.__setattr__(self, "shortest_edge", s)
        if self.resample not in range(6):
            raise ImageError(f"image processor: resample {self.resample} is not a PIL filter (0-5)")
        if not self.do_center_crop and not (self.do_resize and self.resize_hw == (s, s)):
            raise ImageError(f"image processor: without a center crop the output is not {s}x{s}, "
                             f"which the vision tower needs (crop, or resize to {s}x{s})")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ImageError("image processor: image_mean and image_std need 3 values (RGB)")

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, image_size: int, anyres: bool = False) -> ImageProcessorConfig:
        """Read `preprocessor_config.json` (HF key names) if present, else CLIP defaults.
        anyres: the LLaVA-NeXT processor's, whose do_pad only pads a batch's tile counts."""
        path = Path(model_dir) / "preprocessor_config.json"
        if not path.exists():
            return cls(image_size=image_size)
        raw = read_preprocessor_json(path)
        if raw.get("do_pad") and not anyres:
            raise ImageError(f"{path}: do_pad=true is not supported (CLIP resize + crop only)")
        size = raw.get("size", image_size)
        if isinstance(size, int):
            size = {"shortest_edge": size}  # CLIP: default_to_square=False
        elif isinstance(size, list) and len(size) == 2:
            size = {"height": size[0], "width": size[1]}
        if not isinstance(size, dict) or set(size) not in ({"shortest_edge"}, {"height", "width"}):
            raise ImageError(f"{path}: unsupported size {size!r}; expected "
                             "{'shortest_edge': N} or {'height': H, 'width': W}")
        crop = raw.get("crop_size", image_size)
        crop_hw = (crop, crop) if isinstance(crop, int) else (
            (crop.get("height"), crop.get("width")) if isinstance(crop, dict) else crop)
        do_crop = bool(raw.get("do_center_crop", True))
        if do_crop and crop_hw != (image_size, image_size):
            raise ImageError(f"{path}: crop_size {crop!r} does not match the vision tower's "
                             f"image_size {image_size}x{image_size}")
        return cls(
            image_size=image_size,
            shortest_edge=size.get("shortest_edge"),
            resize_hw=(size["height"], size["width"]) if "height" in size else None,
            resample=int(raw.get("resample", 3)),
            do_resize=bool(raw.get("do_resize", True)),
            do_center_crop=do_crop,
            do_rescale=bool(raw.get("do_rescale", True)),
            rescale_factor=float(raw.get("rescale_factor", 1 / 255)),
            do_normalize=bool(raw.get("do_normalize", True)),
            image_mean=_per_channel(raw.get("image_mean", OPENAI_CLIP_MEAN)),
            image_std=_per_channel(raw.get("image_std", OPENAI_CLIP_STD)),
            do_convert_rgb=bool(raw.get("do_convert_rgb", True)),
        )


def read_preprocessor_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ImageError(f"{path}: cannot read JSON ({e})") from e


def _per_channel(value: float | list[float]) -> tuple[float, ...]:
    return (float(value),) * 3 if isinstance(value, (int, float)) else tuple(map(float, value))


def _shortest_edge_hw(height: int, width: int, shortest: int) -> tuple[int, int]:
    # HF get_resize_output_image_size(default_to_square=False): long edge truncated by int().
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest * long / short)
    return (new_long, shortest) if width <= height else (shortest, new_long)


def _center_crop(x: np.ndarray, size: int) -> np.ndarray:
    """HF image_transforms.center_crop on `[H, W, C]`, zero padding included."""
    h, w = x.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    if top >= 0 and left >= 0:
        return x[top : top + size, left : left + size]
    nh, nw = max(size, h), max(size, w)
    tp, lp = -(-(nh - h) // 2), -(-(nw - w) // 2)  # ceil, as HF
    padded = np.zeros((nh, nw, *x.shape[2:]), dtype=x.dtype)
    padded[tp : tp + h, lp : lp + w] = x
    top, left = top + tp, left + lp
    return padded[max(0, top) : min(nh, top + size), max(0, left) : min(nw, left + size)]


class ImageProcessor:
    """Images -> CLIP pixel values `[N, 3, image_size, image_size]` float32."""

    def __init__(self, cfg: ImageProcessorConfig) -> None:
        self.cfg = cfg
        # Resolved now, not on the first image: finding it imports transformers' image code,
        # seconds that would otherwise land on the TTFT of each process's first request (an
        # EPD encoder's first image took 5.2 s instead of 7 ms on the H200).
        self.composite_alpha = hf_composites_alpha() if cfg.composite_alpha is None else cfg.composite_alpha
        self._mean = np.array(cfg.image_mean, dtype=np.float32)
        self._std = np.array(cfg.image_std, dtype=np.float32)

    def preprocess_one(self, src: Any, index: int = 0) -> np.ndarray:
        """One image (anything `load_image` accepts) -> `[3, image_size, image_size]` float32."""
        return self.pixels(self.load(src, index))

    def load(self, src: Any, index: int = 0) -> Image.Image:
        """The decoded RGB image, converted as this processor's transformers release does."""
        return load_image(src, index, self.composite_alpha)

    def pixels(self, image: Image.Image) -> np.ndarray:
        """A decoded RGB image -> `[3, image_size, image_size]` float32 (resize, crop, rescale,
        normalize)."""
        cfg = self.cfg
        if cfg.do_resize:
            edge = cfg.shortest_edge or cfg.image_size
            h, w = cfg.resize_hw or _shortest_edge_hw(image.height, image.width, edge)
            image = image.resize((w, h), resample=cfg.resample)
        x = np.asarray(image)  # [H, W, 3] uint8
        if cfg.do_center_crop:
            x = _center_crop(x, cfg.image_size)
        if cfg.do_rescale:  # as HF: multiply in float64, then cast to float32
            x = (x.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
        else:
            x = x.astype(np.float32)
        if cfg.do_normalize:
            x = (x - self._mean) / self._std  # float32, per channel
        return np.ascontiguousarray(x.transpose(2, 0, 1))  # [3, H, W]

    def preprocess(self, images: list[Any]) -> torch.Tensor:
        """Images (anything `load_image` accepts) -> `[N, 3, image_size, image_size]` float32."""
        out = [self.preprocess_one(src, i) for i, src in enumerate(images)]
        if not out:
            return torch.empty(0, 3, self.cfg.image_size, self.cfg.image_size)
        return torch.from_numpy(np.stack(out))

    def preprocess_items(self, images: list[Any]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """The tower's inputs for `images` and each image's (height, width): here one item per
        image (engine/images_anyres.py has the LLaVA-NeXT processor with the same method)."""
        loaded = [self.load(src, i) for i, src in enumerate(images)]
        out = [self.pixels(image) for image in loaded]
        size = self.cfg.image_size
        pixels = torch.from_numpy(np.stack(out)) if out else torch.empty(0, 3, size, size)
        return pixels, [(image.height, image.width) for image in loaded]
