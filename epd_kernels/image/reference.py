"""PIL's `Image.resize(size, resample)` on uint8 RGB, bit for bit, in numpy; and CLIP's center crop +
rescale + normalize as a 256-entry lookup table per channel.

Resize follows Pillow's src/libImaging/Resample.c (matched against python-pillow/Pillow at commit
01f132fb; Pillow 13's behaviour, checked by tests/test_preprocess.py against the installed PIL):
  - precompute_coeffs: scale = in / out (in as a C float, as the box edges are: exact below 2^24),
    filterscale = max(scale, 1), support = filter support * filterscale, ksize = 2 ceil(support) + 1;
    per output i: center = (i + 0.5) scale, xmin = (int)(center - support + 0.5) clamped to >= 0,
    xmax = (int)(center + support + 0.5) clamped to <= in; weights filter((x + xmin - center + 0.5) /
    filterscale) summed left to right (the order matters for the sum), divided by that sum if non-zero.
  - normalize_coeffs_8bpc: fixed point with PRECISION_BITS = 32 - 8 - 2 = 22, (int)(w * 2^22 +- 0.5)
    (truncation toward zero, so: round half away from zero).
  - ImagingResample{Horizontal,Vertical}_8bpc: int32 accumulator starting at 2^21, clip8(acc >> 22)
    to 0..255. ImagingResampleInner: an axis whose size does not change skips its pass; no pass at
    all is a copy. With both passes the first one runs only over the input rows (or columns) that
    the second reads (they are independent, so this changes nothing but the work).
  - Pass order: horizontal first, except (Pillow 13, python-pillow/Pillow#9549, "if height is scaled
    down significantly more than width, resize vertically first") vertical first when
    out_h < in_h and in_h - out_h > 2 (in_w - out_w). The uint8 rounding between the passes makes
    the order visible in the output. That rule was not in the Pillow source we could read (commit
    01f132fb is older); it was fitted to the installed Pillow 13.0 on ~800 size pairs where the
    two orders differ, all matched, and test_pass_order_rule_equals_pil keeps checking it. Older
    Pillow releases always go horizontal first; PILLOW_VERTICAL_FIRST follows the installed one.
Filters take PIL's numbers: 1 LANCZOS, 2 BILINEAR, 3 BICUBIC, 4 BOX, 5 HAMMING (0, NEAREST, is a
different code path in PIL and is not reproduced here). sin/cos come from Python's math module,
i.e. the C library PIL calls (numpy's SIMD sin may differ by an ulp).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import PIL

PRECISION_BITS = 32 - 8 - 2
LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING = 1, 2, 3, 4, 5
# Pillow 13 added the vertical-first order (python-pillow/Pillow#9549); HF resizes with the installed PIL.
PILLOW_VERTICAL_FIRST = int(PIL.__version__.split(".")[0]) >= 13
FILTER_NAMES = {LANCZOS: "lanczos", BILINEAR: "bilinear", BICUBIC: "bicubic", BOX: "box", HAMMING: "hamming"}

_sin = np.vectorize(math.sin, otypes=[np.float64])
_cos = np.vectorize(math.cos, otypes=[np.float64])


def _box(x: np.ndarray) -> np.ndarray:
    return np.where((x > -0.5) & (x <= 0.5), 1.0, 0.0)


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _hamming(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    xp = x * math.pi
    with np.errstate(divide="ignore", invalid="ignore"):
        # 0.54f / 0.46f: float constants in the C source, widened to double
        w = _sin(xp) / xp * (float(np.float32(0.54)) + float(np.float32(0.46)) * _cos(xp))
    return np.where(x == 0.0, 1.0, np.where(x >= 1.0, 0.0, w))


def _bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1  # same operation order as the C expression
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _sinc(x: np.ndarray) -> np.ndarray:
    xp = x * math.pi
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x == 0.0, 1.0, _sin(xp) / xp)


def _lanczos(x: np.ndarray) -> np.ndarray:
    return np.where((-3.0 <= x) & (x < 3.0), _sinc(x) * _sinc(x / 3), 0.0)


FILTERS = {BOX: (_box, 0.5), BILINEAR: (_bilinear, 1.0), HAMMING: (_hamming, 1.0), BICUBIC: (_bicubic, 2.0),
           LANCZOS: (_lanczos, 3.0)}


def check_filter(resample: int) -> None:
    if resample not in FILTERS:
        raise ValueError(f"resample {resample} is not supported; expected one of "
                         + ", ".join(f"{k} ({v})" for k, v in FILTER_NAMES.items()))


@functools.lru_cache(maxsize=1024)
def resample_coeffs(in_size: int, out_size: int, resample: int = BICUBIC) -> tuple[np.ndarray, np.ndarray]:
    """One axis of PIL's resample: (bounds [out_size, 2] int32 = (first input index, tap count),
    coeffs [out_size, ksize] int32 fixed point, zero past each row's count). Cached; read-only."""
    check_filter(resample)
    if in_size <= 0 or out_size <= 0:
        raise ValueError(f"resample sizes must be positive, got {in_size} -> {out_size}")
    filt, filter_support = FILTERS[resample]
    scale = float(np.float32(in_size)) / out_size  # (double)(in1 - in0) / outSize: the box edges are C floats
    filterscale = max(scale, 1.0)
    support = filter_support * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = 0.0 + (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64)
    count = xmax - xmin
    taps = np.arange(ksize)
    w = filt(((xmin[:, None] + taps[None, :]).astype(np.float64) - center[:, None] + 0.5) * (1.0 / filterscale))
    w = np.where(taps[None, :] < count[:, None], w, 0.0)
    ww = np.zeros(out_size)
    for j in range(ksize):  # left to right, as the C loop
        ww = ww + w[:, j]
    w = np.divide(w, ww[:, None], out=w.copy(), where=ww[:, None] != 0.0)
    scaled = w * (1 << PRECISION_BITS)
    fixed = np.trunc(np.where(w < 0, scaled - 0.5, scaled + 0.5)).astype(np.int32)
    bounds = np.stack([xmin, count], axis=1).astype(np.int32)
    bounds.flags.writeable = False
    fixed.flags.writeable = False
    return bounds, fixed


def row_span(bounds: np.ndarray) -> tuple[int, int]:
    """[first, last) input indices that a pass with these bounds reads (ybox / xbox in Pillow)."""
    return int(bounds[0, 0]), int(bounds[-1, 0] + bounds[-1, 1])


def vertical_first(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> bool:
    """Pillow 13's pass order when both axes change: vertical first iff the height shrinks by more
    than twice as many pixels as the width does (always False before Pillow 13)."""
    (h, w), (oh, ow) = in_hw, out_hw
    return PILLOW_VERTICAL_FIRST and oh < h and h - oh > 2 * (w - ow)


def resample_pass(src: np.ndarray, bounds: np.ndarray, coeffs: np.ndarray, axis: int, offset: int = 0) -> np.ndarray:
    """One 8-bit pass along axis 1 (horizontal) or 0 (vertical) of src [H, W, C] uint8. bounds index
    the full image; src starts at index `offset` of it along that axis. int32 arithmetic as Pillow's
    (it cannot overflow: |acc| < 255 * sum|k| * 2^22 < 2^31 for these filters)."""
    n = src.shape[axis]
    shape = [1, 1, 1]
    shape[axis] = len(bounds)
    acc = np.full(src.shape[:axis] + (len(bounds),) + src.shape[axis + 1:], 1 << (PRECISION_BITS - 1), np.int32)
    for j in range(coeffs.shape[1]):
        # taps past a row's count have coefficient 0: any valid index will do
        idx = np.clip(bounds[:, 0] - offset + j, 0, n - 1)
        acc += src.take(idx, axis=axis).astype(np.int32) * coeffs[:, j].reshape(shape)
    return np.clip(acc >> PRECISION_BITS, 0, 255).astype(np.uint8)


def resize(src: np.ndarray, out_hw: tuple[int, int], resample: int = BICUBIC) -> np.ndarray:
    """PIL's `Image.fromarray(src).resize((w, h), resample)` for src [H, W, 3] uint8 -> [h, w, 3] uint8."""
    height, width = src.shape[:2]
    out_h, out_w = out_hw
    check_filter(resample)
    if out_h == height and out_w == width:
        return src.copy()
    if out_h == height:
        return resample_pass(src, *resample_coeffs(width, out_w, resample), axis=1)
    if out_w == width:
        return resample_pass(src, *resample_coeffs(height, out_h, resample), axis=0)
    hbounds, hcoeffs = resample_coeffs(width, out_w, resample)
    vbounds, vcoeffs = resample_coeffs(height, out_h, resample)
    if vertical_first((height, width), out_hw):
        col0, col1 = row_span(hbounds)
        x = resample_pass(src[:, col0:col1], vbounds, vcoeffs, axis=0)
        return resample_pass(x, hbounds, hcoeffs, axis=1, offset=col0)
    row0, row1 = row_span(vbounds)
    x = resample_pass(src[row0:row1], hbounds, hcoeffs, axis=1)
    return resample_pass(x, vbounds, vcoeffs, axis=0, offset=row0)


def crop_offsets(height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) of HF's center crop incl. its zero padding: output (i, j) is input (i + top,
    j + left), zero where that is outside the image. Both are floor((dim - size) / 2): for a
    dimension smaller than size, HF pads ceil((size - dim) / 2) in front, which is the same."""
    return (height - size) // 2, (width - size) // 2


def normalize_lut(rescale_factor: float | None, mean: tuple[float, ...] | None,
                  std: tuple[float, ...] | None) -> np.ndarray:
    """[3, 256] float32: the final value of each uint8 level per channel, by the same numpy operations
    as engine.images.ImageProcessor (float64 multiply by rescale_factor, cast to float32, then
    (x - mean) / std in float32). None skips that step."""
    x = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)  # [256, 3] like pixels [.., 3]
    if rescale_factor is not None:
        x = (x.astype(np.float64) * rescale_factor).astype(np.float32)
    else:
        x = x.astype(np.float32)
    if mean is not None and std is not None:
        x = (x - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)
    return np.ascontiguousarray(x.T)


def crop_normalize(src: np.ndarray, size: int, lut: np.ndarray) -> np.ndarray:
    """src [H, W, 3] uint8 -> [3, size, size] float32: center crop (zero pad), then lut per channel."""
    height, width = src.shape[:2]
    top, left = crop_offsets(height, width, size)
    padded = np.zeros((size, size, 3), dtype=np.uint8)
    y0, y1 = max(0, -top), min(size, height - top)
    x0, x1 = max(0, -left), min(size, width - left)
    if y1 > y0 and x1 > x0:
        padded[y0:y1, x0:x1] = src[y0 + top:y1 + top, x0 + left:x1 + left]
    return np.stack([lut[c][padded[..., c]] for c in range(3)])
