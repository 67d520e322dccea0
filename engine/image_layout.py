"""Where each image token's embedding comes from, computed from the image's size alone.

An MM *item* is one vision-tower input: a CLIP image (LLaVA-1.5) or one tile (LLaVA-NeXT).
The tower turns each item into `tokens_per_item` embedding rows (one MM-arena block). An image
is an ordered list of items plus a *row layout*: for each of the image's prompt tokens, the
(item, row) it reads, or NEWLINE (the model's `image_newline` vector).

LLaVA-1.5: one item, rows 0..tokens_per_item-1 in order.
LLaVA-NeXT ("anyres", HF `LlavaNextModel.pack_image_features`, spatial_unpad): item 0 is the
whole image resized to one tile (the base), items 1.. are the tiles of the best grid pinpoint
in row-major order. The prompt reads the base's rows, then the tile grid as one feature map
(rows of tiles side by side), cropped back to the image's aspect ratio (`unpad_image`), each
feature row followed by NEWLINE.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

NEWLINE = -1  # a layout row that reads the image_newline vector

Pinpoints = tuple[tuple[int, int], ...]  # (height, width) per grid resolution


@dataclass(frozen=True)
class ImageLayout:
    """num_items: tower inputs of the image; rows: per prompt token of the image,
    item * tokens_per_item + row, or NEWLINE."""

    num_items: int
    rows: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return len(self.rows)


def select_best_resolution(height: int, width: int, pinpoints: Pinpoints) -> tuple[int, int]:
    """HF `select_best_resolution`: the (height, width) pinpoint that keeps the most of the image's
    pixels when it is scaled into it, ties to the least wasted area (the first among equals)."""
    best, best_effective, best_wasted = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = w * h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (h, w), effective, wasted
    assert best is not None, "no pinpoints"
    return best


def patch_output_size(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """HF `get_patch_output_size`: the image's size scaled to fit `target` (height, width)."""
    th, tw = target
    scale_w, scale_h = tw / width, th / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), th), tw
    return th, min(math.ceil(width * scale_h), tw)


def unpadded_window(height: int, width: int, grid_h: int, grid_w: int) -> tuple[int, int, int, int]:
    """HF `unpad_image` on a [grid_h, grid_w] feature map of an image of height x width:
    (row0, row1, col0, col1), the window that drops the padding rows or columns."""
    if width / height > grid_w / grid_h:
        new_h = int(round(height * (grid_w / width), 7))
        pad = (grid_h - new_h) // 2
        return pad, grid_h - pad, 0, grid_w
    new_w = int(round(width * (grid_h / height), 7))
    pad = (grid_w - new_w) // 2
    return 0, grid_h, pad, grid_w - pad


@functools.lru_cache(maxsize=4096)
def anyres_layout(height: int, width: int, tile: int, patches: int, pinpoints: Pinpoints) -> ImageLayout:
    """LLaVA-NeXT's layout for an image of height x width: tile = the tower's image size,
    patches = its patches per side (tokens_per_item = patches**2, CLS dropped)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size {height}x{width}: height and width must be positive")
    best_h, best_w = select_best_resolution(height, width, pinpoints)
    tiles_h, tiles_w = best_h // tile, best_w // tile
    per_item = patches * patches
    rows = list(range(per_item))  # the base image (item 0)
    r0, r1, c0, c1 = unpadded_window(height, width, tiles_h * patches, tiles_w * patches)
    for y in range(r0, r1):
        ty, py = divmod(y, patches)
        for x in range(c0, c1):
            tx, px = divmod(x, patches)
            rows.append((1 + ty * tiles_w + tx) * per_item + py * patches + px)
        rows.append(NEWLINE)
    return ImageLayout(num_items=1 + tiles_h * tiles_w, rows=tuple(rows))


@functools.lru_cache(maxsize=8)
def single_item_layout(tokens_per_item: int) -> ImageLayout:
    """LLaVA-1.5: one item read in order."""
    return ImageLayout(num_items=1, rows=tuple(range(tokens_per_item)))
