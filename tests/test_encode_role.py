"""The EPD encoder role (engine/roles/encode.py EncodeRole) on the CPU: waiting tasks are encoded in one
batch (one preprocessing call, one tower call) within the item budget; a task whose image is
corrupt fails alone and the others of its batch are still answered; cached items take no
encode; every block comes back."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from engine.config import EngineConfig, ModelConfig
from engine.messages import Encoded, EncodeTask, Failed, FreeMM
from engine.mm_cache import image_key, item_keys
from engine.roles import RoleSpec, build_role


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture()
def encoder(tiny_llava):
    config = EngineConfig(str(tiny_llava), backend="torch", device="cpu", max_images_per_batch=3).for_model(
        ModelConfig.from_dir(tiny_llava))
    sent: list = []
    role = build_role(RoleSpec("encode", 0, config), sent.append)
    calls: list[int] = []
    encode = role.runner.encode
    role.runner.encode = lambda seqs, *a: (calls.append(sum(s.pixel_values.shape[0] for s in seqs)),
                                           encode(seqs, *a))[1]
    yield role, sent, calls
    role.close()


def _task(req: int, *images: bytes) -> EncodeTask:
    keys = item_keys([image_key(im) for im in images], [1] * len(images))
    return EncodeTask(req, 0, list(images), keys=keys, image_sizes=[(30, 40)] * len(images))


def _drain(role) -> None:
    """Step the role as its worker does, until it has nothing left to do (bounded)."""
    for _ in range(1000):
        if not role.busy:
            return
        role.step()
    raise AssertionError("the encoder is still busy after 1000 steps")


def _answers(sent: list) -> dict:
    return {m.req_id: m for m in sent if isinstance(m, (Encoded, Failed))}


def test_waiting_tasks_are_encoded_in_one_batch_within_the_item_budget(encoder) -> None:
    role, sent, calls = encoder
    for req in range(4):  # 4 one-image tasks, budget 3 items: a batch of 3, then 1
        role.handle(_task(req, _png(req)))
    _drain(role)
    assert calls == [3, 1] and sorted(_answers(sent)) == [0, 1, 2, 3]
    assert all(isinstance(m, Encoded) and len(m.blocks) == 1 for m in _answers(sent).values())
    first = _answers(sent)
    assert first[0].preprocess_s > 0 and first[0].tower_s > 0
    assert first[0].preprocess_s == first[2].preprocess_s  # one batch, one measurement
    # the same images again: cached, no encode; then every block back (idle cached blocks stay)
    sent.clear()
    role.handle(_task(9, _png(0), _png(3)))
    _drain(role)
    assert calls == [3, 1] and isinstance(_answers(sent)[9], Encoded)
    for m in list(first.values()) + [_answers(sent)[9]]:
        role.handle(FreeMM(m.blocks, 0))
    stats = role.cache.stats()
    assert stats["in_use_blocks"] == 0 and stats["idle_blocks"] == 4 and stats["hits"] == 2
    role.cache.check()


def test_a_corrupt_image_fails_its_task_only(encoder) -> None:
    role, sent, calls = encoder
    corrupt = _png(5)
    role.handle(_task(1, _png(1)))
    role.handle(_task(2, corrupt[: len(corrupt) // 2]))  # the header is intact: it fails in the batch
    role.handle(_task(3, _png(3)))
    _drain(role)
    answers = _answers(sent)
    assert isinstance(answers[1], Encoded) and isinstance(answers[3], Encoded)
    assert isinstance(answers[2], Failed) and "image 0" in answers[2].error and answers[2].images == 1
    assert calls == [1, 1]  # the batch failed before its tower call; then each task alone
    for req in (1, 3):
        role.handle(FreeMM(answers[req].blocks, 0))
    stats = role.cache.stats()
    assert stats["in_use_blocks"] == 0 and stats["images"] == 2  # the corrupt image is not cached
    role.cache.check()


def test_tasks_read_their_bytes_from_the_byte_arena_and_answer_with_the_batch_times(tiny_llava) -> None:
    from ipc.byte_arena import ByteArena

    config = EngineConfig(str(tiny_llava), backend="torch", device="cpu").for_model(ModelConfig.from_dir(tiny_llava))
    arena = ByteArena.create(1 << 16)
    sent: list = []
    role = build_role(RoleSpec("encode", 0, config, image_bytes=arena.handle), sent.append)
    try:
        one, two = _png(1), _png(2)
        for req, image in ((1, one), (2, two)):
            role.handle(EncodeTask(req, 0, [arena.put(image)], keys=item_keys([image_key(image)], [1]),
                                   image_sizes=[(30, 40)]))
        _drain(role)
        answers = _answers(sent)
        assert all(isinstance(m, Encoded) for m in answers.values()) and role.cache.stats()["images"] == 2
        times = answers[1].times  # preprocess start, end, tower start, end: one batch
        assert len(times) == 4 and list(times) == sorted(times) and answers[2].times == times
        assert answers[1].preprocess_s == times[1] - times[0] and answers[1].tower_s == times[3] - times[2]
    finally:
        role.close()
        arena.close()


def test_the_next_batch_preprocesses_while_the_tower_runs(encoder) -> None:
    """Two stages: batch 2's preprocessing (on the role's thread) overlaps batch 1's tower (on
    the worker's thread); the answers still come in order, one Encoded per task."""
    import time

    role, sent, calls = encoder
    spans: dict[str, list[tuple[float, float]]] = {"preprocess": [], "tower": []}

    def timed(name, fn):
        def run(*args):
            start = time.perf_counter()
            time.sleep(0.15)
            out = fn(*args)
            spans[name].append((start, time.perf_counter()))
            return out
        return run

    role.image_processor.preprocess_items = timed("preprocess", role.image_processor.preprocess_items)
    role.runner.encode = timed("tower", role.runner.encode)
    sent.clear()  # Loaded, Exported, Ready
    for req in range(6):  # budget 3: two batches
        role.handle(_task(req, _png(req)))
    _drain(role)
    assert [type(m) for m in sent] == [Encoded] * 6 and [m.req_id for m in sent] == list(range(6))
    (p1, p2), (t1, t2) = spans["preprocess"], spans["tower"]
    assert p1[1] <= t1[0] and p2[1] <= t2[0]  # each batch's pixels before its tower
    assert p2[0] < t1[1], f"batch 2 preprocessed only after batch 1's tower: {spans}"
    role.cache.check()
