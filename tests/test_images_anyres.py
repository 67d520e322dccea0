"""LLaVA-NeXT preprocessing and token counts against transformers' LlavaNextImageProcessorPil,
LlavaNextProcessor and LlavaNextModel.pack_image_features; check_image's oriented size."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

from engine.config import DEFAULT_PINPOINTS
from engine.image_layout import NEWLINE, anyres_layout, select_best_resolution
from engine.images import ImageProcessorConfig, check_image
from engine.images_anyres import AnyresImageProcessor

TINY_PINPOINTS = ((84, 168), (168, 84), (168, 168), (252, 84), (84, 252))
# wide, tall, square, smaller than a tile, extreme, odd sizes (height, width)
SIZES_HW = [(100, 260), (260, 100), (150, 150), (40, 60), (30, 400), (97, 83), (333, 500), (84, 168), (1, 1)]


def _hf(tile: int, pinpoints) -> LlavaNextImageProcessorPil:
    return LlavaNextImageProcessorPil(size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
                                      image_grid_pinpoints=[list(p) for p in pinpoints])


def _image(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize(("tile", "pinpoints"), [(84, TINY_PINPOINTS), (336, DEFAULT_PINPOINTS)])
@pytest.mark.parametrize("hw", SIZES_HW)
def test_pixels_match_hf_pil_processor(tile: int, pinpoints, hw: tuple[int, int]) -> None:
    scale = tile // 84
    h, w = hw[0] * scale, hw[1] * scale
    image = _image(h, w, h * 7 + w)
    ours = AnyresImageProcessor(ImageProcessorConfig(image_size=tile), pinpoints)
    items, size = ours.preprocess_one(image)
    ref = _hf(tile, pinpoints)(images=[image], return_tensors="np")
    hf_items = np.asarray(ref["pixel_values"])[0]
    assert size == (h, w) == tuple(ref["image_sizes"][0])
    assert items.shape == hf_items.shape, f"{h}x{w}: items {items.shape} vs HF {hf_items.shape}"
    assert items.dtype == np.float32
    np.testing.assert_array_equal(items, hf_items)  # bit for bit


def test_preprocess_items_concatenates_images_in_order() -> None:
    proc = AnyresImageProcessor(ImageProcessorConfig(image_size=84), TINY_PINPOINTS)
    images = [_image(100, 260, 1), _image(40, 60, 2)]
    items, sizes = proc.preprocess_items(images)
    first, _ = proc.preprocess_one(images[0])
    second, _ = proc.preprocess_one(images[1])
    assert sizes == [(100, 260), (40, 60)]
    assert torch.equal(items, torch.from_numpy(np.concatenate([first, second])))


def _hf_processor(tile: int, pinpoints) -> LlavaNextProcessor:
    """The processor's token counting, without a tokenizer (it needs none)."""
    proc = LlavaNextProcessor.__new__(LlavaNextProcessor)
    proc.image_processor = _hf(tile, pinpoints)
    proc.patch_size, proc.num_additional_image_tokens, proc.vision_feature_select_strategy = 14, 1, "default"
    return proc


@pytest.mark.parametrize(("tile", "pinpoints"), [(84, TINY_PINPOINTS), (336, DEFAULT_PINPOINTS)])
def test_token_count_matches_hf_processor(tile: int, pinpoints) -> None:
    proc = _hf_processor(tile, pinpoints)
    rng = np.random.default_rng(0)
    sizes = [(int(a), int(b)) for a, b in rng.integers(1, 4 * tile, (200, 2))] + SIZES_HW
    for h, w in sizes:
        ours = anyres_layout(h, w, tile, tile // 14, pinpoints)
        hf = proc._get_number_of_features(h, w, tile, tile) - 1  # "default": minus the CLS it counted
        assert ours.num_tokens == hf, f"{h}x{w}: {ours.num_tokens} tokens, HF {hf}"
        assert ours.num_items == 1 + (lambda r: (r[0] // tile) * (r[1] // tile))(
            select_best_resolution(h, w, pinpoints))


@pytest.mark.parametrize("hw", SIZES_HW)
def test_layout_matches_hf_pack_image_features(hw: tuple[int, int]) -> None:
    """Rows of the layout = HF's packing of per-item features (a feature = its own index)."""
    tile, g = 84, 6
    h, w = hw
    layout = anyres_layout(h, w, tile, g, TINY_PINPOINTS)
    per_item = g * g
    feats = torch.arange(layout.num_items * per_item, dtype=torch.float64).view(layout.num_items, per_item, 1)
    base, tiles = feats[0], feats[1:]
    gh, gw = get_anyres_image_grid_shape((h, w), [list(p) for p in TINY_PINPOINTS], tile)
    x = tiles.view(gh, gw, g, g, -1).permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)
    x = unpad_image(x, (h, w))
    x = torch.cat((x, torch.full((*x.shape[:-1], 1), float(NEWLINE), dtype=x.dtype)), dim=-1)
    packed = torch.cat((base, x.flatten(1, 2).transpose(0, 1)), dim=0)[:, 0]
    assert tuple(int(v) for v in packed) == layout.rows


def _jpeg_with_orientation(w: int, h: int, orientation: int) -> bytes:
    image = _image(h, w, 3)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_check_image_size_after_exif_orientation(orientation: int) -> None:
    from engine.images import load_image

    data = _jpeg_with_orientation(120, 50, orientation)
    hw = check_image(data)
    decoded = load_image(data)
    assert hw == (decoded.height, decoded.width)
    assert hw == ((120, 50) if orientation in (6, 8) else (50, 120))
    assert check_image(Image.open(io.BytesIO(data))) == hw


def test_select_items_and_size_check() -> None:
    from engine.config import ModelConfig
    from engine.images import ImageError
    from engine.images_anyres import all_items, select_items

    raw = {"architectures": ["LlavaNextForConditionalGeneration"], "image_token_index": 511,
           "image_grid_pinpoints": [list(p) for p in TINY_PINPOINTS],
           "vision_config": {"image_size": 84, "patch_size": 14, "num_hidden_layers": 2},
           "text_config": {"hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1,
                           "intermediate_size": 64, "vocab_size": 512}}
    cfg = ModelConfig.from_dict(raw)
    proc = AnyresImageProcessor(ImageProcessorConfig(image_size=84), TINY_PINPOINTS)
    images = [_image(100, 260, 1), _image(40, 60, 2)]  # 4 + 3 items
    assert all_items(cfg, [(100, 260), (40, 60)]) == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2)]
    everything, _ = proc.preprocess_items(images)
    picked = select_items(proc, cfg, images, [(1, 2), (0, 0), (0, 3)], [(100, 260), (40, 60)])
    assert torch.equal(picked, everything[[6, 0, 3]])
    with pytest.raises(ImageError, match=r"image 1: decodes to 40x60 .* header says 80x60"):
        select_items(proc, cfg, images, [(0, 0)], [(100, 260), (80, 60)])
