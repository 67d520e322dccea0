"""Caches keyed by image content (as vLLM's processor and encoder caches).

- `image_key`: blake2b of what the user sent, read without decoding any pixel: the bytes of an
  encoded image (given as bytes, a file path or a base64 data URL: one image, one key whichever
  way it came), or for a PIL image its mode, size, palette, transparency, EXIF orientation and
  pixel buffer. Nothing per request enters the key: the engine's preprocessing and weights are
  fixed for its life, so equal keys mean equal pixels and equal embeddings.
- `EncoderCache`: encoder outputs (embeddings in MM-arena blocks) over an arena's BlockManager.
  An image owns an ordered list of blocks (one per vision-tower input). The cache holds one
  reference on a cached image's blocks and each request using it one more, in the BlockManager's
  reference counts, so a request gives its blocks back with a plain `free` (FreeMM in EPD). An
  image only the cache references is idle: idle images are evicted, least recently used first,
  when an allocation needs their blocks; one a request waits for or prefills is never evicted.
- `PixelCache`: preprocessed pixel tensors, LRU, bounded in bytes (preprocessing costs more than
  the tower on a GPU; it also serves an image whose embeddings were evicted).
- `EncoderHints`: the EPD orchestrator's bounded map key -> the encoder that encoded it last, so
  a repeated image goes where its embeddings are (a stale hint costs one miss).

Switched off (EngineConfig.mm_cache = False) every image is a miss, encoded into blocks of its
own that return to the pool with their last user: outputs are the same either way.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Mapping
from collections.abc import Sequence as Seq
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from engine.block_manager import BlockManager
from engine.images import ImageError, ImageProcessor, _read_file, data_url_bytes
from engine.request import Sequence
from engine.sampling import SamplingParams

if TYPE_CHECKING:
    from engine.runner import ModelRunner

Key = str | None  # None: an image without a key (never cached)


def image_key(src: Any, index: int = 0) -> str:
    """The content key of one image (anything engine.images.load_image accepts); `index` only
    labels errors. Cheap: hashing only (a data URL is base64-decoded, a file read)."""
    h = hashlib.blake2b(digest_size=16)
    if isinstance(src, Image.Image):  # already in memory: its pixels are what the user gave
        h.update(b"pil\0" + f"{src.mode}\0{src.size}\0{src.info.get('transparency')!r}\0".encode())
        h.update(str(src.getexif().get(0x0112)).encode())  # EXIF orientation: load_image applies it
        if src.palette is not None:
            h.update(bytes(src.palette.tobytes()))
        h.update(src.tobytes())
    elif isinstance(src, (bytes, bytearray, memoryview)):
        h.update(src)
    elif isinstance(src, str) and src.startswith("data:"):
        h.update(data_url_bytes(src, index))
    elif isinstance(src, (str, Path)):
        h.update(_read_file(src, index)[0])
    else:
        raise ImageError(f"image {index}: unsupported type {type(src).__name__}; "
                         "expected a path, bytes, a PIL image or a data: URL")
    return h.hexdigest()


def items_per_image(seq: Sequence) -> list[int]:
    """Vision-tower inputs (= MM blocks) of each of a sequence's images, in order: one per CLIP
    image. Its pixel_values rows and its mm_blocks hold them back to back."""
    return [1] * seq.num_images


def image_items(seq: Sequence, image: int) -> range:
    """The rows of seq.pixel_values (= the positions in seq.mm_blocks) of one of its images."""
    counts = items_per_image(seq)
    start = sum(counts[:image])
    return range(start, start + counts[image])


class EncoderCache:
    """Embeddings by image key over `blocks` (the MM arena's BlockManager); see the module doc.
    Every allocation from that arena goes through here (`acquire`, `allocate`) so that idle
    cached blocks are evicted for it, and every block goes back with `release`."""

    def __init__(self, blocks: BlockManager, enabled: bool = True) -> None:
        self.blocks, self.enabled = blocks, enabled
        self._entries: OrderedDict[str, list[int]] = OrderedDict()  # least recently used first
        self.hits = self.misses = self.evictions = 0

    def __contains__(self, key: Key) -> bool:
        return key is not None and key in self._entries

    def _keys(self, keys: Seq[Key], counts: Seq[int]) -> list[Key]:
        if not self.enabled or not keys:
            return [None] * len(counts)
        if len(keys) != len(counts):
            raise ValueError(f"{len(keys)} image keys for {len(counts)} images")
        return list(keys)

    def _idle(self, blocks: list[int]) -> bool:
        return all(self.blocks.refs(b) == 1 for b in blocks)

    def _evictable(self, keep: set[Key]) -> int:
        return sum(len(b) for k, b in self._entries.items() if k not in keep and self._idle(b))

    def can_acquire(self, keys: Seq[Key], counts: Seq[int]) -> bool:
        """`acquire(keys, counts)` would succeed now (evicting idle images if it must)."""
        keys = self._keys(keys, counts)
        needed, seen = 0, set()
        for key, n in zip(keys, counts):
            if key is not None and (key in self._entries or key in seen):
                continue
            seen.add(key)
            needed += n
        if needed <= self.blocks.num_free:
            return True
        return needed <= self.blocks.num_free + self._evictable({k for k in keys if k in self._entries})

    def acquire(self, keys: Seq[Key], counts: Seq[int]) -> list[tuple[list[int], bool]] | None:
        """One reference to the blocks of each image (counts[i] blocks for image i): (blocks,
        True) for an image cached (or already taken earlier in this call: equal images are
        encoded once), (blocks, False) for new blocks the caller must encode into (or `discard`
        if it cannot). All or nothing: None (nothing taken) when the arena cannot hold them."""
        keys = self._keys(keys, counts)
        if not self.can_acquire(keys, counts):
            return None
        keep = {k for k in keys if k is not None}
        taken: list[tuple[list[int], bool]] = []
        for key, n in zip(keys, counts):
            cached = self._entries.get(key) if key is not None else None
            if cached is not None:
                if len(cached) != n:
                    raise ValueError(f"image {key} is cached in {len(cached)} blocks; {n} asked")
                self.blocks.share(cached)
                self._entries.move_to_end(key)
                taken.append((cached, True))
                self.hits += 1
                continue
            blocks = self.allocate(n, keep)
            assert blocks is not None, "can_acquire said the blocks fit"
            if key is not None:
                self.blocks.share(blocks)  # the cache's own reference
                self._entries[key] = blocks
            taken.append((blocks, False))
            self.misses += 1
        return taken

    def allocate(self, n: int, keep: set[Key] = frozenset()) -> list[int] | None:
        """n blocks not cached (e.g. embeddings copied in from another device), evicting idle
        images least recently used first (not those in `keep`); None if they cannot be had."""
        while not self.blocks.can_allocate(n):
            victim = next((k for k, b in self._entries.items() if k not in keep and self._idle(b)), None)
            if victim is None:
                return None
            self.blocks.free(self._entries.pop(victim))
            self.evictions += 1
        return self.blocks.allocate(n)

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block (a request is done with its images)."""
        self.blocks.free(blocks)

    def discard(self, keys: Seq[Key]) -> None:
        """Forget images whose encoding failed (the cache's reference goes; the caller still
        releases its own)."""
        for key in keys:
            if key is not None and key in self._entries:
                self.blocks.free(self._entries.pop(key))

    def stats(self) -> dict:
        """Counters and blocks: idle (cached, no user) + in_use + free == total."""
        idle = sum(len(b) for b in self._entries.values() if self._idle(b))
        total, free = self.blocks.num_blocks, self.blocks.num_free
        return {"enabled": self.enabled, "hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                "images": len(self._entries), "cached_blocks": sum(map(len, self._entries.values())),
                "idle_blocks": idle, "in_use_blocks": total - free - idle, "free_blocks": free,
                "total_blocks": total}

    def check(self) -> None:
        """Raise AssertionError unless the accounting is exact: each cached block is in one image
        and referenced by the cache; users = references beyond the cache's; idle + users' blocks
        + free == total."""
        owner: dict[int, str] = {}
        for key, blocks in self._entries.items():
            for b in blocks:
                assert b not in owner, f"block {b} is cached for {owner[b]} and {key}"
                assert self.blocks.refs(b) >= 1, f"cached block {b} of {key} is free"
                owner[b] = key
        first, total = self.blocks.first, self.blocks.num_blocks
        used = [b for b in range(first, first + total) if self.blocks.refs(b) > (1 if b in owner else 0)]
        idle = [b for b in owner if self.blocks.refs(b) == 1]
        assert len(idle) + len(used) + self.blocks.num_free == total, (
            f"{len(idle)} idle + {len(used)} in use + {self.blocks.num_free} free != {total} blocks")


class PixelCache:
    """Preprocessed pixels ([items, 3, S, S] per image) by image key, least recently used out
    once they pass max_bytes (0: nothing kept). Thread-safe: image workers share it."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = self.hits = self.misses = self.evictions = 0

    def get(self, key: Key) -> torch.Tensor | None:
        with self._lock:
            pixels = self._entries.get(key) if key is not None else None
            if pixels is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return pixels

    def put(self, key: Key, pixels: torch.Tensor) -> None:
        size = _nbytes(pixels)
        with self._lock:
            if key is None or key in self._entries or size > self.max_bytes:
                return
            while self.bytes + size > self.max_bytes:
                self.bytes -= _nbytes(self._entries.popitem(last=False)[1])
                self.evictions += 1
            self._entries[key] = pixels
            self.bytes += size

    def stats(self) -> dict:
        with self._lock:
            return {"pixel_hits": self.hits, "pixel_misses": self.misses, "pixel_evictions": self.evictions,
                    "pixel_images": len(self._entries), "pixel_bytes": self.bytes}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def preprocess_images(processor: ImageProcessor, images: Seq[Any], keys: Seq[Key],
                      cache: PixelCache | None) -> torch.Tensor:
    """processor.preprocess(images) ([N, 3, S, S] float32), each image taken from `cache` by its
    key when there (keys may be empty: no lookups)."""
    if cache is None or not keys:
        return processor.preprocess(list(images))
    out = []
    for i, (src, key) in enumerate(zip(images, keys, strict=True)):
        pixels = cache.get(key)
        if pixels is None:
            pixels = torch.from_numpy(processor.preprocess_one(src, i))
            cache.put(key, pixels)
        out.append(pixels)
    return torch.stack(out)


class EncoderHints:
    """Image key -> the encoder whose arena held it last (the orchestrator's guess where it is
    cached), at most max_keys, the least recently used forgotten first."""

    def __init__(self, max_keys: int) -> None:
        self.max_keys = max_keys
        self._where: OrderedDict[str, int] = OrderedDict()

    def learn(self, keys: Seq[Key], encoder: int) -> None:
        for key in keys:
            if key is None:
                continue
            self._where[key] = encoder
            self._where.move_to_end(key)
            if len(self._where) > self.max_keys:
                self._where.popitem(last=False)

    @property
    def where(self) -> Mapping[str, int]:
        """Key -> encoder, read-only (engine.router.split_images' cached_at)."""
        return MappingProxyType(self._where)

    def __len__(self) -> int:
        return len(self._where)


def acquire_and_encode(cache: EncoderCache, runner: ModelRunner, processor: ImageProcessor,
                       pixel_cache: PixelCache | None, images: Seq[Any], keys: Seq[Key]) -> list[int] | None:
    """The MM blocks of `images` (one per image, in order) with one reference taken: cached
    images' as they are, the others preprocessed (through pixel_cache) and encoded by `runner`
    into new blocks. None (nothing taken) when the arena cannot hold them now. If preprocessing
    or encoding fails, nothing stays taken or cached and the error is raised."""
    taken = cache.acquire(keys, [1] * len(images))
    if taken is None:
        return None
    blocks = [b for image_blocks, _ in taken for b in image_blocks]
    misses = [i for i, (_, hit) in enumerate(taken) if not hit]
    if not misses:
        return blocks
    try:
        pixels = preprocess_images(processor, [images[i] for i in misses], [keys[i] for i in misses] if keys else [],
                                   pixel_cache)
        seq = Sequence(seq_id=-1, prompt_ids=[], sampling=SamplingParams(), seed=0, stop_token_ids=frozenset(),
                       pixel_values=pixels, mm_blocks=[b for i in misses for b in taken[i][0]])
        runner.encode([seq])
    except Exception:
        cache.discard([keys[i] for i in misses] if keys else [])
        cache.release(blocks)
        raise
    return blocks


def total_stats(stages: dict[str, dict]) -> dict:
    """The image caches of several stages (their stats' "mm_cache"), counters summed."""
    names = ("hits", "misses", "evictions", "pixel_hits", "pixel_misses")
    caches = [s["mm_cache"] for s in stages.values() if s.get("mm_cache")]
    return {name: sum(c.get(name, 0) for c in caches) for name in names} if caches else {}
