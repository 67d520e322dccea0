"""Caches keyed by image content (engine/mm_cache.py): keys, the encoder cache's hits, misses, LRU
eviction, reference counts and accounting, the pixel cache; then the aggregated engine with and
without the cache (one encode per distinct image, identical outputs, eviction under pressure,
no leaked blocks after 1,000 requests)."""

from __future__ import annotations

import base64
import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.block_manager import BlockManager
from engine.images import ImageError
from engine.mm_cache import EncoderCache, EncoderHints, PixelCache, image_key


def _png(seed: int, size: tuple[int, int] = (40, 50)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- keys


def test_image_key_is_the_content_whichever_way_it_comes(tmp_path: Path) -> None:
    data = _png(1)
    path = tmp_path / "a.png"
    path.write_bytes(data)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    keys = {image_key(data), image_key(bytearray(data)), image_key(str(path)), image_key(path), image_key(url)}
    assert len(keys) == 1
    assert image_key(_png(2)) not in keys
    pil = Image.open(io.BytesIO(data))
    pil.load()
    assert image_key(pil) == image_key(pil.copy()) != image_key(data)  # a PIL image: its pixels
    assert image_key(pil) != image_key(pil.convert("L")) != image_key(pil.transpose(Image.Transpose.ROTATE_90))
    with pytest.raises(ImageError, match="image 3: unsupported type int"):
        image_key(7, 3)
    with pytest.raises(ImageError, match="image 1: data URL has invalid base64"):
        image_key("data:image/png;base64,@@@", 1)
    with pytest.raises(ImageError, match="image 0: file not found"):
        image_key(str(tmp_path / "missing.png"))


# ----------------------------------------------------------------------------- encoder cache


def test_hits_misses_and_refcounts() -> None:
    cache = EncoderCache(BlockManager(6))
    (a, hit_a), (b, hit_b) = cache.acquire(["a", "b"], [1, 2])
    assert not hit_a and not hit_b and len(a) == 1 and len(b) == 2
    assert cache.acquire(["b"], [2]) == [(b, True)]  # a second user of b's blocks
    assert (cache.hits, cache.misses) == (1, 2)
    s = cache.stats()
    assert (s["in_use_blocks"], s["idle_blocks"], s["free_blocks"], s["images"]) == (3, 0, 3, 2)
    cache.release(b)
    cache.release(a)
    s = cache.stats()
    assert (s["in_use_blocks"], s["idle_blocks"], s["free_blocks"]) == (2, 1, 3)  # b still has a user
    cache.release(b)
    assert cache.stats()["idle_blocks"] == 3 and cache.blocks.num_free == 3
    cache.check()


def test_equal_images_in_one_call_share_blocks_and_count_one_miss() -> None:
    cache = EncoderCache(BlockManager(4))
    taken = cache.acquire(["x", "y", "x"], [1, 1, 1])
    assert taken[0][0] == taken[2][0] and [hit for _, hit in taken] == [False, False, True]
    assert (cache.hits, cache.misses, cache.blocks.num_free) == (1, 2, 2)
    for blocks, _ in taken:
        cache.release(blocks)
    cache.check()
    assert cache.stats()["idle_blocks"] == 2


def test_lru_eviction_spares_referenced_and_requested_images() -> None:
    cache = EncoderCache(BlockManager(4))
    held = {}
    for key in "abcd":
        held[key] = cache.acquire([key], [1])[0][0]
    for key in "bcd":
        cache.release(held[key])  # a keeps its user: never evicted
    cache.release(cache.acquire(["c"], [1])[0][0])  # c used again: b is now the least recent idle image
    assert cache.can_acquire(["e"], [1]) and not cache.can_acquire(["e"], [4])
    (e, hit), = cache.acquire(["e"], [1])
    assert not hit and e == held["b"] and "b" not in cache and cache.evictions == 1
    # d and c are idle, but an acquire that hits d must not evict it for its other images
    assert not cache.can_acquire(["d", "f", "g"], [1, 1, 1])
    assert cache.acquire(["d", "f", "g"], [1, 1, 1]) is None
    assert "d" in cache and "c" in cache and cache.evictions == 1  # nothing taken, nothing evicted
    taken = cache.acquire(["d", "f"], [1, 1])
    assert [hit for _, hit in taken] == [True, False] and "c" not in cache and cache.evictions == 2
    cache.check()


def test_allocate_evicts_for_uncached_blocks_and_discard_forgets_failed_encodes() -> None:
    cache = EncoderCache(BlockManager(3))
    for key in "ab":
        cache.release(cache.acquire([key], [1])[0][0])
    plain = cache.allocate(3)
    assert len(plain) == 3 and cache.evictions == 2 and cache.stats()["images"] == 0
    assert cache.allocate(1) is None
    cache.release(plain)
    (blocks, _), = cache.acquire(["bad"], [2])
    cache.discard(["bad"])
    cache.release(blocks)
    assert "bad" not in cache and cache.blocks.num_free == 3
    cache.check()


def test_disabled_cache_keeps_nothing() -> None:
    cache = EncoderCache(BlockManager(2), enabled=False)
    taken = cache.acquire(["a", "a"], [1, 1])
    assert [hit for _, hit in taken] == [False, False] and taken[0][0] != taken[1][0]
    for blocks, _ in taken:
        cache.release(blocks)
    assert cache.blocks.num_free == 2 and cache.stats()["images"] == 0 and cache.hits == 0
    with pytest.raises(ValueError, match="2 image keys for 1 images"):
        EncoderCache(BlockManager(2)).acquire(["a", "b"], [1])


def test_random_workload_keeps_exact_accounting() -> None:
    """Random acquires and releases: the invariants hold after every operation, and once every
    user is gone every block is idle or free."""
    rng = random.Random(0)
    cache = EncoderCache(BlockManager(12))
    users: list[list[int]] = []
    for _ in range(2000):
        if users and (rng.random() < 0.45 or not cache.can_acquire(["k"], [3])):
            cache.release(users.pop(rng.randrange(len(users))))
        else:
            keys = [f"k{rng.randrange(10)}" for _ in range(rng.randrange(1, 3))]
            counts = [1 + int(k[1:]) % 3 for k in keys]
            taken = cache.acquire(keys, counts)
            if taken is not None:
                users += [blocks for blocks, _ in taken]
        cache.check()
    for blocks in users:
        cache.release(blocks)
    cache.check()
    s = cache.stats()
    assert s["in_use_blocks"] == 0 and s["idle_blocks"] + s["free_blocks"] == 12
    assert cache.hits > 0 and cache.misses > 0 and cache.evictions > 0


# ----------------------------------------------------------------------------- pixels, hints


def test_pixel_cache_is_bounded_in_bytes() -> None:
    one = torch.zeros(1, 3, 4, 4)  # 192 bytes
    cache = PixelCache(max_bytes=400)
    cache.put("a", one)
    cache.put("b", one)
    assert cache.get("a") is one  # a is now the most recent
    cache.put("c", one)
    assert cache.get("b") is None and cache.get("c") is one and cache.bytes == 384
    cache.put("huge", torch.zeros(1, 3, 8, 8))  # larger than the whole cache: not kept
    assert cache.get("huge") is None and cache.get(None) is None
    assert cache.stats() == {"pixel_hits": 2, "pixel_misses": 3, "pixel_evictions": 1, "pixel_images": 2,
                             "pixel_bytes": 384}


def test_encoder_hints_are_bounded() -> None:
    hints = EncoderHints(max_keys=2)
    hints.learn(["a", "b", None], 0)
    hints.learn(["a"], 1)
    hints.learn(["c"], 0)  # b is the least recently learnt: forgotten
    assert hints.prefer(["a", "b", "c", "z"], [0, 1, 2, 3]) == {0: 1, 2: 0} and len(hints) == 2
