"""LLaVA-NeXT ("anyres") preprocessing on the GPU: `GpuAnyresPreprocessor.preprocess_items(images)`
equals `engine.images_anyres.AnyresImageProcessor.preprocess_items(images)` bit for bit (float32) given
the same decoded pixels, step for step:

1. decode: GpuImagePreprocessor.decode (nvjpeg for the JPEGs it takes, else PIL on the workers);
2. the best pinpoint, the PIL-exact resize of the image into it keeping the aspect ratio, written into
   a zero [pinpoint_h, pinpoint_w, 3] buffer at the centred offset (AnyresImageProcessor's padding);
3. the tiles: row-major sub-rectangles of that buffer, each through CLIP's resize (its target size
   as ImageProcessor computes it: for a tower-sized tile and the usual config an identity, i.e. a copy)
   into one flat uint8 buffer; all of an image's tiles in one strided copy when that is what it is;
4. the base: the whole decoded image resized to base_hw, then CLIP's resize (skipped when it would
   be an identity: a PIL resize to the same size is a copy), into the same flat buffer;
5. one crop_normalize launch over every item of every image (center crop / zero pad + rescale +
   normalize through ImageProcessor's [3, 256] table), as GpuImagePreprocessor does.

Items are image after image, each image's base first, then its tiles (engine/image_layout.py).
bfloat16/float16 output is the float32 result rounded to nearest even. JPEGs decoded by nvjpeg are
within decode tolerance, not equal (see engine/preprocess.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from engine.image_layout import Pinpoints, patch_output_size, select_best_resolution
from engine.images import ImageError
from engine.preprocess import GpuImagePreprocessor
from epd_kernels.image import reference as image_ref


class GpuAnyresPreprocessor:
    """`preprocess_items(images) -> ([num_items, 3, S, S] of images.dtype on its device, decoded sizes)`:
    AnyresImageProcessor's items made with `images`' decode, resize kernels and crop + normalize launch."""

    def __init__(self, images: GpuImagePreprocessor, pinpoints: Pinpoints) -> None:
        cfg = images.cfg
        if cfg.resample not in image_ref.FILTERS:  # the pinpoint and base resizes run whatever do_resize says
            raise ImageError(f"image processor: resample {cfg.resample} has no GPU path; supported: "
                             + ", ".join(f"{k} ({v})" for k, v in image_ref.FILTER_NAMES.items()))
        self.images, self.cfg, self.pinpoints = images, cfg, pinpoints
        self.device, self.dtype = images.device, images.dtype
        self.tile = cfg.image_size
        edge = cfg.shortest_edge or cfg.image_size
        self.base_hw = cfg.resize_hw or (edge, edge)  # as AnyresImageProcessor

    def decode(self, images: list[Any]) -> list[torch.Tensor]:
        """Each image as [H, W, 3] uint8 on the device (GpuImagePreprocessor.decode)."""
        return self.images.decode(images)

    def preprocess_items(self, images: list[Any]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """The items of every image, image after image, on the device, and each image's decoded
        (height, width): AnyresImageProcessor's interface (engine/images_anyres.select_items)."""
        decoded = self.decode(images)
        return self.items(decoded), [(int(x.shape[0]), int(x.shape[1])) for x in decoded]

    def clip_hw(self, height: int, width: int) -> tuple[int, int]:
        """The size an item has after CLIP's resize step (ImageProcessor.pixels)."""
        return self.images.target_hw(height, width)

    def items(self, pixels: list[torch.Tensor | np.ndarray]) -> torch.Tensor:
        """Decoded images ([H, W, 3] uint8, CPU or device, any strides) -> their items [N, 3, S, S] of dtype."""
        t = self.tile
        images = [x.to(self.device) if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x)).to(self.device)
                  for x in pixels]
        plans = []  # per image: (pinpoint, tile rectangles (y, x, h, w), each item's size after CLIP's resize)
        for i, x in enumerate(images):
            if x.dtype != torch.uint8 or x.dim() != 3 or x.shape[2] != 3:
                raise ImageError(f"image {i}: decoded pixels must be [H, W, 3] uint8, got {x.dtype} {tuple(x.shape)}")
            best = select_best_resolution(int(x.shape[0]), int(x.shape[1]), self.pinpoints)
            rects = [(y, c, min(t, best[0] - y), min(t, best[1] - c))
                     for y in range(0, best[0], t) for c in range(0, best[1], t)]
            plans.append((best, rects, [self.clip_hw(*self.base_hw)] + [self.clip_hw(h, w) for _, _, h, w in rects]))
        sizes = [hw for _, _, item_hws in plans for hw in item_hws]
        if not sizes:
            return torch.empty((0, 3, t, t), dtype=self.dtype, device=self.device)
        offsets = np.cumsum([0] + [h * w * 3 for h, w in sizes])
        flat = torch.empty(int(offsets[-1]), dtype=torch.uint8, device=self.device)
        slot = lambda k: flat[int(offsets[k]): int(offsets[k + 1])].view(*sizes[k], 3)
        k = 0
        for x, (best, rects, item_hws) in zip(images, plans):
            self._base(x, slot(k))
            self._tiles(self._padded(x, best), rects, item_hws[1:], [slot(k + 1 + n) for n in range(len(rects))],
                        flat[int(offsets[k + 1]): int(offsets[k + 1 + len(rects)])])
            k += 1 + len(rects)
        meta = torch.tensor([[int(o), h, w] for o, (h, w) in zip(offsets, sizes)], dtype=torch.int64)
        return self.images._ops.crop_normalize(flat, meta.to(self.device), self.images._lut, t, self.dtype)

    def _resize(self, src: torch.Tensor, hw: tuple[int, int], out: torch.Tensor | None = None) -> torch.Tensor:
        """PIL's image.resize((w, h), cfg.resample) of src [H, W, 3] (a copy when the size is unchanged)."""
        return self.images._ops.resize(src, hw, self.cfg.resample, out=out)

    def _base(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """Item 0: the image resized to base_hw, then CLIP's resize of that, into out."""
        if not self.cfg.do_resize or tuple(out.shape[:2]) == self.base_hw:
            self._resize(x, self.base_hw, out=out)  # CLIP's step is a copy (or not done)
        else:
            self._resize(self._resize(x, self.base_hw), tuple(out.shape[:2]), out=out)

    def _padded(self, x: torch.Tensor, best: tuple[int, int]) -> torch.Tensor:
        """The image resized into the pinpoint `best` keeping its aspect ratio, zero padding centred."""
        new_h, new_w = patch_output_size(int(x.shape[0]), int(x.shape[1]), best)
        if (new_h, new_w) == best:
            return self._resize(x, best)
        padded = torch.zeros((*best, 3), dtype=torch.uint8, device=self.device)
        top, left = (best[0] - new_h) // 2, (best[1] - new_w) // 2
        region = padded[top: top + new_h, left: left + new_w]
        if region.is_contiguous():  # full-width rows: resize straight into them
            self._resize(x, (new_h, new_w), out=region)
        else:
            region.copy_(self._resize(x, (new_h, new_w)))
        return padded

    def _tiles(self, padded: torch.Tensor, rects: list[tuple[int, int, int, int]], item_hws: list[tuple[int, int]],
               outs: list[torch.Tensor], span: torch.Tensor) -> None:
        """Each tile of `padded` through CLIP's resize into its slot (outs; span: all of them, in order)."""
        t = self.tile
        if all(hw == (t, t) for hw in item_hws) and all(r[2:] == (t, t) for r in rects):  # copies: one launch
            gh, gw = padded.shape[0] // t, padded.shape[1] // t
            span.view(gh, gw, t, t, 3).copy_(padded.view(gh, t, gw, t, 3).permute(0, 2, 1, 3, 4))
            return
        for (y, x, h, w), hw, out in zip(rects, item_hws, outs):
            tile = padded[y: y + h, x: x + w]
            if self.cfg.do_resize:
                self._resize(tile, hw, out=out)
            else:
                out.copy_(tile)

    def close(self) -> None:
        self.images.close()
