"""Caches keyed by image content (as vLLM's processor and encoder caches).

- `image_key`: SHA-256 (first 128 bits) of what the user sent, read without decoding any pixel: the bytes of an
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
from collections.abc import Callable, Mapping
from collections.abc import Sequence as Seq
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from engine.block_manager import BlockManager
from engine.images import ImageError, _read_file, data_url_bytes
from engine.images_anyres import select_items
from engine.request import Sequence
from engine.sampling import SamplingParams

if TYPE_CHECKING:
    from engine.config import ModelConfig
    from engine.runner import ModelRunner

Key = str | None  # None: an image without a key (never cached)


def image_key(src: Any, index: int = 0) -> str:
    """The content key of one image (anything engine.images.load_image accepts); `index` only
    labels errors. Cheap: hashing only (a data URL is base64-decoded, a file read)."""
    h = hashlib.sha256()  # 2.5x blake2b's speed here (SHA extensions): 4032x3024 JPEGs are ~4 MB
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
    return h.hexdigest()[:32]


def item_keys(keys: Seq[str], counts: Seq[int]) -> list[str]:
    """The cache's keys: one per item (vision-tower input: a CLIP image, a NeXT base or tile),
    `image key:item`, from each image's key and its item count. An item is the unit cached,
    routed and encoded: a NeXT image's tiles may be encoded on several EPD encoders."""
    return [f"{key}:{j}" for key, n in zip(keys, counts, strict=True) for j in range(n)]


def items_per_image(seq: Sequence) -> list[int]:
    """Blocks per cache entry of a sequence, in order: one per item (seq.mm_keys are per item)."""
    return [1] * seq.num_items


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


def cached_pixels(make: Callable[[list[int]], torch.Tensor], counts: Seq[int], keys: Seq[Key],
                  cache: PixelCache | None) -> torch.Tensor:
    """The items of some images ([sum(counts), 3, S, S]), image after image: an image whose items
    (keys: one per item; empty: no lookups) are all in `cache` from there, the others made by
    make(image indices) -> their items, which then go into the cache."""
    if cache is None or not keys:
        return make(list(range(len(counts))))
    starts = [sum(counts[:i]) for i in range(len(counts))]
    got: list[list[torch.Tensor] | None] = []
    for start, n in zip(starts, counts):
        items = [cache.get(k) for k in keys[start : start + n]]
        got.append(items if all(x is not None for x in items) else None)
    missing = [i for i, items in enumerate(got) if items is None]
    if missing:
        fresh = make(missing)
        row = 0
        for i in missing:
            got[i] = list(fresh[row : row + counts[i]])
            row += counts[i]
            for key, item in zip(keys[starts[i] : starts[i] + counts[i]], got[i]):
                cache.put(key, item.clone())  # not a view: the batch it came from would stay alive
    return torch.stack([item for items in got for item in items])


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
        """Key -> encoder, read-only (engine.router.split_items' cached_at)."""
        return MappingProxyType(self._where)

    def __len__(self) -> int:
        return len(self._where)


def item_pixels(processor: Any, cfg: ModelConfig, cache: PixelCache | None, images: Seq[Any],
                items: Seq[tuple[int, int]], sizes: Seq[tuple[int, int]], keys: Seq[Key]) -> torch.Tensor:
    """An encoder's inputs for `items` ((index into images, item of it)), [len(items), 3, S, S]:
    each from `cache` by its key when there (keys: one per item; empty: no lookups), the rest
    preprocessed from the images they come from (checked against `sizes`, the headers' sizes)."""
    got: list[torch.Tensor | None] = [cache.get(k) if cache is not None else None for k in keys] or [None] * len(items)
    need = [i for i, x in enumerate(got) if x is None]
    if need:
        used = sorted({items[i][0] for i in need})
        where = {image: k for k, image in enumerate(used)}
        wanted = [(where[items[i][0]], items[i][1]) for i in need]
        fresh = select_items(processor, cfg, [images[u] for u in used], wanted,
                             [sizes[u] for u in used] if sizes else [])
        for i, x in zip(need, fresh):
            got[i] = x
            if cache is not None and keys:
                cache.put(keys[i], x.clone())  # not a view: the batch it came from would stay alive
    return torch.stack(got)


def acquire_and_encode(cache: EncoderCache, runner: ModelRunner, keys: Seq[Key], num_items: int,
                       pixels_for: Callable[[list[int]], torch.Tensor]) -> list[int] | None:
    """The MM blocks of `num_items` items (one each, in order) with one reference taken: cached
    items' as they are, the others made by pixels_for(their positions) -> [len, 3, S, S] and
    encoded by `runner` into new blocks. None (nothing taken) when the arena cannot hold them
    now. If making the pixels or encoding fails, nothing stays taken or cached, and it raises."""
    taken = cache.acquire(keys, [1] * num_items)
    if taken is None:
        return None
    blocks = [b for item_blocks, _ in taken for b in item_blocks]
    misses = [i for i, (_, hit) in enumerate(taken) if not hit]
    if not misses:
        return blocks
    try:
        seq = Sequence(seq_id=-1, prompt_ids=[], sampling=SamplingParams(), seed=0, stop_token_ids=frozenset(),
                       pixel_values=pixels_for(misses), mm_blocks=[blocks[i] for i in misses])
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
