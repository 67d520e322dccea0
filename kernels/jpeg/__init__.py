"""Batched JPEG decode on nvjpeg's hardware engine (kernels._epd_jpeg, kernels/jpeg/decoder.cpp).

    decoder(device) -> JpegDecoder | None
    JpegDecoder.decode([1-D uint8 CPU tensors]) -> [[3, H, W] uint8 on device, or None per image]

The same nvjpeg hardware decode that torchvision.io.decode_jpeg runs (the same planar RGB pixels),
with allocators that never synchronize the device: torchvision's cudaFree / cudaFreeHost waited
for every kernel on the GPU, the encoder's tower among them. None where the module is not built
(no nvjpeg at build time) or the GPU has no hardware JPEG engine; the caller then uses torchvision.
The work is queued on the current CUDA stream; synchronize it before the host reads the result.
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)


@functools.cache
def decoder(device: torch.device) -> object | None:
    """The process's hardware decoder for `device` (a CUDA device with an index), or None."""
    try:
        from kernels import _epd_jpeg  # built by python -m kernels.build where nvjpeg is found
    except ImportError:
        return None
    made = _epd_jpeg.JpegDecoder(device.index)
    if not made.hardware:
        log.info("cuda:%d has no hardware JPEG decoder (nvjpeg status %d): torchvision decodes", device.index,
                 made.create_status)
        return None
    return made
