"""CUDA image ops (epd_kernels._epd_C): PIL-exact resize passes and the batched CLIP crop + normalize.
Same pass logic and coefficients as epd_kernels/image/reference.py, so the results are equal bit for bit.

Coefficients are made on the host by `reference.resample_coeffs` (float64, the code the CPU reference
runs) and uploaded once per (input size, output size, filter, device): images of a size already seen
cost no host work and no upload.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from epd_kernels import _epd_C
from epd_kernels.image import reference as ref


@functools.lru_cache(maxsize=512)
def device_coeffs(in_size: int, out_size: int, resample: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(bounds [out_size, 2] int32, coeffs [out_size, K] int32) of one axis, on `device`; cached."""
    bounds, coeffs = ref.resample_coeffs(in_size, out_size, resample)
    return (torch.from_numpy(np.array(bounds)).to(device), torch.from_numpy(np.array(coeffs)).to(device))


def resample_horizontal(src: torch.Tensor, bounds: torch.Tensor, coeffs: torch.Tensor, offset: int = 0,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """src [H, W, 3] uint8 CUDA (any strides) -> [H, L, 3] uint8, L = len(bounds). `offset`: the
    full-image column of src's column 0 (bounds are in full-image coordinates)."""
    if out is None:
        out = torch.empty((src.shape[0], bounds.shape[0], 3), dtype=torch.uint8, device=src.device)
    _epd_C.resample_horizontal(out, src, bounds, coeffs, offset)
    return out


def resample_vertical(src: torch.Tensor, bounds: torch.Tensor, coeffs: torch.Tensor, offset: int = 0,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """src [H, W, 3] uint8 CUDA (any strides) -> [L, W, 3] uint8; `offset`: full-image row of src's row 0."""
    if out is None:
        out = torch.empty((bounds.shape[0], src.shape[1], 3), dtype=torch.uint8, device=src.device)
    _epd_C.resample_vertical(out, src, bounds, coeffs, offset)
    return out


def resize(src: torch.Tensor, out_hw: tuple[int, int], resample: int = ref.BICUBIC,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """PIL's `resize((w, h), resample)` of src [H, W, 3] uint8 CUDA (any strides, e.g. a permuted
    [3, H, W] decode) -> [h, w, 3] uint8, written into `out` (contiguous [h, w, 3]) when given."""
    height, width = src.shape[0], src.shape[1]
    out_h, out_w = out_hw
    ref.check_filter(resample)
    if out is None:
        out = torch.empty((out_h, out_w, 3), dtype=torch.uint8, device=src.device)
    if tuple(out.shape) != (out_h, out_w, 3):
        raise ValueError(f"out is {tuple(out.shape)}; expected ({out_h}, {out_w}, 3)")
    if out_h == height and out_w == width:
        return out.copy_(src)
    dev = src.device
    if out_h == height:
        return resample_horizontal(src, *device_coeffs(width, out_w, resample, dev), out=out)
    if out_w == width:
        return resample_vertical(src, *device_coeffs(height, out_h, resample, dev), out=out)
    hbounds, hcoeffs = device_coeffs(width, out_w, resample, dev)
    vbounds, vcoeffs = device_coeffs(height, out_h, resample, dev)
    if ref.vertical_first((height, width), out_hw):  # first pass only over what the second reads
        col0, col1 = ref.row_span(ref.resample_coeffs(width, out_w, resample)[0])
        tmp = resample_vertical(src[:, col0:col1], vbounds, vcoeffs)
        return resample_horizontal(tmp, hbounds, hcoeffs, offset=col0, out=out)
    row0, row1 = ref.row_span(ref.resample_coeffs(height, out_h, resample)[0])
    tmp = resample_horizontal(src[row0:row1], hbounds, hcoeffs)
    return resample_vertical(tmp, vbounds, vcoeffs, offset=row0, out=out)


def crop_normalize(src: torch.Tensor, meta: torch.Tensor, lut: torch.Tensor, size: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Batched HF center crop (zero pad) + lut, HWC -> CHW: src flat uint8 CUDA holding image n as
    [meta[n, 1], meta[n, 2], 3] contiguous at byte meta[n, 0] (meta [N, 3] int64 CUDA), lut [3, 256]
    float32 CUDA (reference.normalize_lut) -> [N, 3, size, size] of dtype (float32, float16, bfloat16)."""
    out = torch.empty((meta.shape[0], 3, size, size), dtype=dtype, device=src.device)
    _epd_C.crop_normalize(out, src, meta, lut)
    return out
