"""LLaVA-NeXT ("anyres") preprocessing, step for step as HF's `LlavaNextImageProcessorPil`:

1. the best grid pinpoint for the image's size (`select_best_resolution`);
2. a PIL resize of the uint8 image into it, keeping the aspect ratio (`get_patch_output_size`),
   zero padding centred to the pinpoint, and its division into tower-sized tiles, row-major;
3. the base image: the whole image resized to (shortest_edge, shortest_edge) (or size's
   height x width);
4. each of base + tiles through the CLIP steps of engine/images.py (resize, crop, rescale,
   normalize).

The result is an image's MM items in layout order (engine/image_layout.py): item 0 the base,
items 1.. the tiles. HF's batch padding (`do_pad`: zero tiles up to the batch's largest count)
has no counterpart: items are independent rows here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from engine.config import ModelConfig
from engine.image_layout import Pinpoints, patch_output_size, select_best_resolution
from engine.images import ImageError, ImageProcessor, ImageProcessorConfig, read_preprocessor_json


class AnyresImageProcessor:
    """Images -> LLaVA-NeXT items `[num_items, 3, S, S]` float32 (S: the tower's image size)."""

    def __init__(self, cfg: ImageProcessorConfig, pinpoints: Pinpoints) -> None:
        self.cfg, self.pinpoints = cfg, pinpoints
        self.clip = ImageProcessor(cfg)
        self.composite_alpha = self.clip.composite_alpha
        self.tile = cfg.image_size
        edge = cfg.shortest_edge or cfg.image_size
        self.base_hw = cfg.resize_hw or (edge, edge)

    def tiles(self, image: Image.Image) -> list[Image.Image]:
        """The image's base and its tiles, as uint8 RGB images, in item order."""
        best = select_best_resolution(image.height, image.width, self.pinpoints)
        new_h, new_w = patch_output_size(image.height, image.width, best)
        resized = np.asarray(image.resize((new_w, new_h), resample=self.cfg.resample))  # [h, w, 3] uint8
        top, left = (best[0] - new_h) // 2, (best[1] - new_w) // 2
        padded = np.zeros((best[0], best[1], 3), dtype=np.uint8)
        padded[top : top + new_h, left : left + new_w] = resized
        t = self.tile
        tiles = [Image.fromarray(padded[y : y + t, x : x + t])
                 for y in range(0, best[0], t) for x in range(0, best[1], t)]
        base = image.resize((self.base_hw[1], self.base_hw[0]), resample=self.cfg.resample)
        return [base, *tiles]

    def preprocess_one(self, src: Any, index: int = 0) -> tuple[np.ndarray, tuple[int, int]]:
        """One image -> its items `[num_items, 3, S, S]` float32 and its (height, width)."""
        image = self.clip.load(src, index)
        return np.stack([self.clip.pixels(tile) for tile in self.tiles(image)]), (image.height, image.width)

    def preprocess_items(self, images: list[Any]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """The items of every image, image after image, and each image's (height, width)."""
        out = [self.preprocess_one(src, i) for i, src in enumerate(images)]
        if not out:
            return torch.empty(0, 3, self.tile, self.tile), []
        return torch.from_numpy(np.concatenate([items for items, _ in out])), [hw for _, hw in out]


def image_processor_for(model_dir: str | Path, cfg: ModelConfig) -> ImageProcessor | AnyresImageProcessor:
    """The checkpoint's image processor: CLIP's (LLaVA-1.5) or the anyres one (LLaVA-NeXT), from
    its preprocessor_config.json. Both have preprocess_items(images) -> (items, sizes)."""
    assert cfg.vision is not None
    clip = ImageProcessorConfig.from_model_dir(model_dir, cfg.vision.image_size, anyres=cfg.is_anyres)
    if not cfg.is_anyres:
        return ImageProcessor(clip)
    path = Path(model_dir) / "preprocessor_config.json"
    raw = read_preprocessor_json(path) if path.exists() else {}
    if raw.get("image_grid_pinpoints") is not None:
        ours = tuple((int(h), int(w)) for h, w in raw["image_grid_pinpoints"])
        if ours != cfg.image_grid_pinpoints:
            raise ImageError(f"{path}: image_grid_pinpoints {[list(p) for p in ours]} differ from config.json's "
                             f"{[list(p) for p in cfg.image_grid_pinpoints]}; the token count would not match")
    return AnyresImageProcessor(clip, cfg.image_grid_pinpoints)


def checked_sizes(decoded: list[tuple[int, int]], expected: list[tuple[int, int]], cfg: ModelConfig) -> None:
    """An encoder's check: each image decodes to the (height, width) its token count was made for
    (the orchestrator reads sizes from headers). Only sizes that change the layout matter."""
    if len(decoded) != len(expected):
        raise ImageError(f"{len(decoded)} images decoded for {len(expected)} sizes")
    for i, (got, want) in enumerate(zip(decoded, expected)):
        if got != want and cfg.image_layout(*got) != cfg.image_layout(*want):
            raise ImageError(f"image {i}: decodes to {got[0]}x{got[1]} (height x width) but its header says "
                             f"{want[0]}x{want[1]}; its token count was made for the header's size")


def all_items(cfg: ModelConfig, sizes: list[tuple[int | None, int | None]]) -> list[tuple[int, int]]:
    """(image, item) for every item of images of these sizes, in order."""
    counts = [cfg.image_layout(h, w).num_items for h, w in sizes]
    return [(i, k) for i, n in enumerate(counts) for k in range(n)]


def select_items(processor: ImageProcessor | AnyresImageProcessor, cfg: ModelConfig, images: list[Any],
                 items: list[tuple[int, int]], expected_sizes: list[tuple[int, int]]) -> torch.Tensor:
    """An encoder's inputs: `items` ((index into images, item of it)) of `images` preprocessed,
    `[len(items), 3, S, S]`, after checking that each image decodes to the size the orchestrator
    counted its tokens for (expected_sizes; empty: not checked)."""
    pixels, sizes = processor.preprocess_items(images)
    if expected_sizes:
        checked_sizes(sizes, expected_sizes, cfg)
    first, n = [], 0  # each image's first row in pixels
    for h, w in sizes:
        first.append(n)
        n += cfg.image_layout(h, w).num_items
    return pixels[torch.tensor([first[image] + item for image, item in items], dtype=torch.int64, device=pixels.device)]
