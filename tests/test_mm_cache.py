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
from engine.sampling import SamplingParams


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


def test_cache_settings_are_checked() -> None:
    from engine.config import ConfigError, EngineConfig

    assert EngineConfig("m").mm_cache and EngineConfig("m").pixel_cache_bytes == 256 * 2**20
    assert EngineConfig("m", mm_cache=False).pixel_cache_bytes == 0
    with pytest.raises(ConfigError, match="mm_cache = 'yes'; must be True or False"):
        EngineConfig("m", mm_cache="yes")
    with pytest.raises(ConfigError, match="mm_pixel_cache_mb = -1; must be >= 0"):
        EngineConfig("m", mm_pixel_cache_mb=-1)


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


class _RecordingRunner:
    def __init__(self) -> None:
        self.encoded: list[tuple[int, list[int]]] = []  # (pixel rows, blocks) per call

    def encode(self, seqs) -> None:
        self.encoded += [(s.pixel_values.shape[0], s.mm_blocks) for s in seqs]


def test_acquire_and_encode_encodes_misses_once_and_keeps_nothing_of_a_failure() -> None:
    from engine.images import ImageProcessor, ImageProcessorConfig
    from engine.mm_cache import acquire_and_encode, cached_pixels

    cache, runner = EncoderCache(BlockManager(3)), _RecordingRunner()
    processor, pixels = ImageProcessor(ImageProcessorConfig(image_size=28)), PixelCache(1 << 20)
    good, corrupt = _png(1), _png(2)[:60]  # a PNG header, then nothing

    def encode(images, keys):  # the roles' pixels_for: the items not cached, through the pixel cache
        return acquire_and_encode(cache, runner, keys, len(images), lambda misses: cached_pixels(
            lambda which: processor.preprocess([images[misses[i]] for i in which]), [1] * len(misses),
            [keys[m] for m in misses], pixels))

    with pytest.raises(ImageError):
        encode([good, corrupt], [image_key(good), image_key(corrupt)])
    assert runner.encoded == [] and cache.blocks.num_free == 3 and cache.stats()["images"] == 0
    keys = [image_key(good)] * 2
    blocks = encode([good, good], keys)
    assert blocks[0] == blocks[1] and runner.encoded == [(1, blocks[:1])]  # equal images: encoded once
    assert encode([good], keys[:1]) == blocks[:1]
    assert len(runner.encoded) == 1 and (cache.hits, cache.misses) == (2, 3)  # 2 failed
    assert (pixels.hits, pixels.misses) == (0, 3)  # the failed call kept no pixels; the hit needed none
    cache.release(blocks + blocks[:1])
    cache.check()
    assert cache.stats()["idle_blocks"] == 1


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
    assert dict(hints.where) == {"a": 1, "c": 0} and len(hints) == 2


def test_router_sends_cached_images_to_their_encoder_and_equal_images_together() -> None:
    from engine.router import InstanceLoad, split_items

    encoders = [InstanceLoad(0, 0), InstanceLoad(1, 0), InstanceLoad(2, 5, alive=False)]
    assert split_items([0, 1, 2, 3], encoders) == {0: [0, 2], 1: [1, 3]}  # no keys: least loaded
    keys = ["a", "a", "b", "c", "a"]
    assert split_items([0, 1, 2, 3, 4], encoders, keys) == {0: [0, 1, 4], 1: [2, 3]}
    # a hinted image goes to its encoder (even if busier), a hint to a dead encoder is ignored
    assert split_items([0, 2, 3], encoders, keys, {"b": 0, "c": 2}) == {0: [0, 2], 1: [3]}
    assert split_items([0], [InstanceLoad(0, 0, alive=False)], keys) is None


# ----------------------------------------------------------------------------- the aggregated engine


def _counting_encodes(llm) -> list[int]:
    """Images the LLM's vision tower encodes from now on, one entry (the batch size) per call."""
    calls: list[int] = []
    encode_images = llm.runner.encode_images

    def counting(pixels: torch.Tensor) -> torch.Tensor:
        calls.append(pixels.shape[0])
        return encode_images(pixels)

    llm.runner.encode_images = counting
    return calls


def _no_leak(llm) -> None:
    cache = llm.engine.encode.cache
    cache.check()
    assert cache.stats()["in_use_blocks"] == 0 and llm.engine.kv_blocks.num_free == llm.runner.num_kv_blocks
    assert not llm.has_work()


SP = SamplingParams(max_tokens=6, ignore_eos=True)


def test_a_repeated_image_is_encoded_once_and_outputs_do_not_change(tiny_llava: Path) -> None:
    from engine import LLM, Request

    a, b = _png(1), _png(2, (60, 30))
    a_url = "data:image/png;base64," + base64.b64encode(a).decode()

    def requests() -> list[Request]:
        return [Request("<image> and <image> again", images=[a, a]), Request("What is it?", images=[a]),
                Request("Compare <image> with <image>", images=[b, a_url]), Request("No image")]

    plain = LLM(tiny_llava, backend="torch", device="cpu", mm_cache=False)
    plain_calls = _counting_encodes(plain)
    reference = plain.generate(requests(), SP)
    assert sum(plain_calls) == 5 and plain.status()["mm_cache"]["hits"] == 0
    llm = LLM(tiny_llava, backend="torch", device="cpu")
    calls = _counting_encodes(llm)
    assert [o.token_ids for o in llm.generate(requests(), SP)] == [o.token_ids for o in reference]
    assert sum(calls) == 2  # a (twice in one request, in three requests, as bytes and as a data URL) and b
    s = llm.status()["mm_cache"]
    assert (s["hits"], s["misses"], s["evictions"], s["images"]) == (3, 2, 0, 2)
    # image workers run in parallel: two of them may both preprocess a; at least a and b once
    assert s["pixel_hits"] + s["pixel_misses"] == 5 and s["pixel_misses"] >= 2 and s["pixel_images"] == 2
    # later requests: nothing is encoded or preprocessed again
    assert [o.token_ids for o in llm.generate(requests(), SP)] == [o.token_ids for o in reference]
    t = llm.status()["mm_cache"]
    assert sum(calls) == 2 and t["hits"] == 8 and t["pixel_hits"] == s["pixel_hits"] + 5
    _no_leak(llm)


def test_eviction_under_pressure_loses_no_request(tiny_llava: Path) -> None:
    """2 MM blocks (max_images_per_batch 1) for 5 distinct images, and a KV cache small enough
    that decode preempts: every request finishes with the output of the engine without the cache."""
    from engine import LLM, Request

    rng = random.Random(3)
    pool = [_png(10 + i, (30 + 7 * i, 40)) for i in range(5)]
    picks = [rng.sample(range(5), rng.choice([1, 1, 2])) for _ in range(24)]
    requests = [Request(" ".join(["<image>"] * len(p)) + " what?", images=[pool[i] for i in p]) for p in picks]
    sp = SamplingParams(max_tokens=24, ignore_eos=True)
    settings = dict(backend="torch", device="cpu", max_images_per_batch=1, kv_cache_tokens=12 * 16)
    reference = LLM(tiny_llava, mm_cache=False, **settings).generate(requests, sp)
    llm = LLM(tiny_llava, **settings)
    calls = _counting_encodes(llm)
    outs = llm.generate(requests, sp)
    assert [o.token_ids for o in outs] == [o.token_ids for o in reference]
    assert all(len(o.token_ids) == 24 for o in outs)
    s = llm.status()
    assert s["preemptions"] > 0 and s["mm_cache"]["evictions"] > 0 and s["mm_cache"]["hits"] > 0
    assert sum(calls) == s["mm_cache"]["misses"] < sum(map(len, picks)) + s["preemptions"]
    _no_leak(llm)


def test_a_thousand_requests_with_repeated_images_leak_no_block(tiny_llava: Path) -> None:
    """Requests of 0-2 images from a pool of 6 (4 MM blocks), arriving in waves, some aborted
    wherever they are (waiting for encode or prefill, or decoding): every other request ends
    with all its tokens, the accounting is exact after every step, no block is held at the end,
    and every image the cache missed was encoded exactly once."""
    from engine import LLM, Request
    from engine.request import Status

    rng = random.Random(1)
    pool = [_png(20 + i, (24 + 4 * i, 30)) for i in range(6)]
    llm = LLM(tiny_llava, backend="torch", device="cpu", max_images_per_batch=2)
    calls = _counting_encodes(llm)
    cache = llm.engine.encode.cache
    want: dict[int, int] = {}  # seq_id -> max_tokens of the requests not aborted
    done = 0
    for _ in range(40):  # waves
        live = []
        for _arrival in range(25):
            images = [pool[rng.randrange(6)] for _ in range(rng.choice([0, 1, 1, 2]))]
            sp = SamplingParams(max_tokens=rng.randint(1, 4), ignore_eos=True)
            seq = llm.add_request(Request("<image> " * len(images) + "hi", images=images), sp)
            want[seq.seq_id] = sp.max_tokens
            live.append(seq)
        while llm.has_work():
            if rng.random() < 0.1:
                seq = rng.choice(live)
                if seq.status is not Status.FINISHED:
                    llm.abort(seq)
                    del want[seq.seq_id]
            for ev in llm.step():
                if ev.output is not None:
                    assert len(ev.output.token_ids) == want[ev.index]
                    done += 1
            cache.check()
        assert all(s.status is Status.FINISHED for s in live)
    assert done == len(want) and 900 < done < 1000
    s = llm.status()["mm_cache"]
    assert s["hits"] > s["misses"] > 0 and s["evictions"] > 0 and sum(calls) == s["misses"]
    _no_leak(llm)


# ----------------------------------------------------------------------------- EPD and pd, /metrics


def _settled(engine, stages: list[str], expected: tuple[int, int]) -> dict:
    """engine.status() once the stages' reports show `expected` (hits, misses) in all and no MM
    block in use (reports are asynchronous), or after 30 s."""
    import time

    deadline = time.monotonic() + 30
    while True:
        status = engine.status()
        caches = status["mm_cache"]
        used = [status["stages"].get(name, {}).get("mm_blocks", {}).get("used") for name in stages]
        if ((caches.get("hits"), caches.get("misses")) == expected and used == [0] * len(stages)) \
                or time.monotonic() > deadline:
            return status
        engine.step(timeout_s=0.05)


@pytest.mark.parametrize("mode", ["epd", "pd"])
def test_disaggregated_repeated_image_hits_whichever_prefill_serves_it(tiny_llava: Path, mode: str) -> None:
    """epd: 2 encoders and 2 prefills; equal images of a request go to one encoder, a repeated
    image to the encoder that holds it, whose cache serves both prefills; pd: the prefill that
    encodes keeps the same cache. Outputs equal the aggregated engine's without a cache."""
    from engine import LLM, Request
    from engine.epd import EPDEngine

    x, y = _png(31), _png(32, (50, 70))
    first = [Request("<image> and <image>", images=[x, x])]
    later = [Request("What is it?", images=[x]), Request("<image> or <image>", images=[y, x])]
    reference = LLM(tiny_llava, backend="torch", device="cpu", mm_cache=False).generate(first + later, SP)
    placement = "E:cpu,cpu P:cpu,cpu D:cpu" if mode == "epd" else "P:cpu D:cpu"
    with EPDEngine(tiny_llava, placement=placement, mode=mode, backend="torch", device="cpu") as epd:
        outs = epd.generate(first, SP) + epd.generate(later, SP)
        assert [o.token_ids for o in outs] == [o.token_ids for o in reference]
        stages = ["encode0", "encode1"] if mode == "epd" else ["prefill0"]
        status = _settled(epd, stages, (3, 2))
    caches = {name: status["stages"][name]["mm_cache"] for name in stages}
    assert (status["mm_cache"]["hits"], status["mm_cache"]["misses"]) == (3, 2), caches
    if mode == "epd":  # x (twice in the first request, then in both later ones) on encode0, y on encode1
        assert [(c["hits"], c["misses"]) for c in caches.values()] == [(3, 1), (0, 1)]
        assert status["mm_cache"]["hints"] == 2
    assert all(status["stages"][name]["mm_blocks"]["used"] == 0 for name in stages)
    assert all(status["stages"][name]["mm_blocks"]["cached"] >= 1 for name in stages)


def test_metrics_show_the_cache_counters_per_stage() -> None:
    pytest.importorskip("prometheus_client")
    from ipc.http_metrics import HTTPMetrics

    metrics = HTTPMetrics()
    text = metrics.render({"mode": "aggregated", "mm_cache": {"hits": 3, "misses": 2, "evictions": 1,
                                                              "idle_blocks": 4}}, 0, True).decode()
    for line in ('epd_mm_cache_hits_total{stage="aggregated"} 3.0', 'epd_mm_cache_misses_total{stage="aggregated"} 2.0',
                 'epd_mm_cache_evictions_total{stage="aggregated"} 1.0',
                 'epd_mm_cache_idle_blocks{stage="aggregated"} 4.0'):
        assert line in text, line
    epd = {"mode": "epd", "stages": {"encode0": {"mm_cache": {"hits": 5, "misses": 1}}, "decode0": {"running": 0}}}
    text = metrics.render(epd, 0, True).decode()
    assert 'epd_mm_cache_hits_total{stage="encode0"} 5.0' in text and 'stage="aggregated"' not in text
    assert 'stage="decode0"' not in text.split("epd_mm_cache")[-1]
