"""encode_first: encoders publish work in hand on a shared board; prefills on their device wait."""

from __future__ import annotations

import io
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from engine import LLM, Request, SamplingParams
from engine.epd import EPDEngine
from engine.roles import prefill
from ipc.busy_board import SLOTS, BusyBoard, device_code


def test_a_slot_written_in_one_mapping_is_read_in_another() -> None:
    board = BusyBoard.create()
    peer = BusyBoard.open(board.handle)  # as a stage maps it
    try:
        assert not peer.busy_on("cpu")
        board.set(3, "cpu", True)
        assert peer.busy_on("cpu") and not peer.busy_on("cuda:0")
        board.set(5, "cuda:1", True)
        board.set(3, "cpu", False)
        assert not peer.busy_on("cpu") and peer.busy_on("cuda:1") and not peer.busy_on("cuda:0")
        board.set(SLOTS, "cpu", True)  # past the board: publishes nothing
        assert not peer.busy_on("cpu")
        assert len({device_code("cpu"), device_code("cuda:0"), device_code("cuda:1")}) == 3
        assert 0 not in {device_code("cpu"), device_code("cuda:0")}
    finally:
        peer.close()
        path = board.handle.path
        board.close()
    assert not Path(path).exists()


def _prefill(busy: bool) -> SimpleNamespace:
    board = SimpleNamespace(busy_on=lambda device: busy)
    return SimpleNamespace(board=board, device="cpu", deferred_since=None, deferred_s=0.0)


def test_a_prefill_waits_while_an_encoder_is_busy_at_most_max_defer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prefill, "MAX_DEFER_S", 0.05)
    stub = _prefill(busy=True)
    start = time.monotonic()
    waits = 0
    while prefill.PrefillRole._defer(stub):
        waits += 1
        assert time.monotonic() - start < 1.0, "the wait is bounded"
    assert waits > 5 and stub.deferred_since is None
    assert 0.05 <= stub.deferred_s < 0.5 and time.monotonic() - start >= 0.05
    assert prefill.PrefillRole._defer(stub), "the next batch waits again"
    # idle encoders: no wait, and none is counted
    idle = _prefill(busy=False)
    assert not prefill.PrefillRole._defer(idle) and idle.deferred_s == 0.0
    idle.board = None  # encode_first off (or pd mode)
    assert not prefill.PrefillRole._defer(idle)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda:0", marks=pytest.mark.gpu)])
def test_a_large_prefill_batch_stops_at_a_layer_boundary_while_an_encoder_is_busy(device: str) -> None:
    import threading

    import torch

    if device != "cpu" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    board = BusyBoard.create()
    cpu = torch.device(device)  # on a GPU each boundary also records an event and waits for the one before
    if device != "cpu":
        torch.cuda.set_device(cpu)
        torch.cuda._sleep(1000)  # some work in flight for the events
    try:
        idle = prefill._LayerYield(board, cpu, budget_s=0.05)  # no encoder busy: it runs straight through
        for layer in range(3 * prefill.YIELD_EVERY):
            idle(layer)
        assert idle.yields == 0 and idle.waited == 0.0
        board.set(0, cpu, True)  # busy for longer than the budget: one stop, as long as the budget
        stuck = prefill._LayerYield(board, cpu, budget_s=0.05)
        for layer in range(3 * prefill.YIELD_EVERY):
            stuck(layer)
        assert stuck.yields == 1 and 0.05 <= stuck.waited < 0.5
        spent = prefill._LayerYield(board, cpu, budget_s=0.0)  # the batch used its budget before it began
        spent(prefill.YIELD_EVERY - 1)
        assert spent.yields == 0
        # the encoder's batch ends: the prefill goes on at once; only boundaries look at the board
        released = prefill._LayerYield(board, cpu, budget_s=5.0)
        released(0)
        assert released.yields == 0, "not a boundary"
        timer = threading.Timer(0.03, board.set, (0, cpu, False))
        timer.start()
        released(prefill.YIELD_EVERY - 1)
        timer.join()
        assert released.yields == 1 and 0.02 <= released.waited < 1.0
    finally:
        board.close()


def _png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (60 + seed, 80, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_encode_first_waits_for_the_encoders_and_changes_no_output(tiny_llava: Path) -> None:
    requests = [Request("Compare <image> and <image>", images=[_png(2 * i), _png(2 * i + 1)]) for i in range(12)]
    sp = SamplingParams(max_tokens=6, ignore_eos=True)
    reference = [o.token_ids for o in LLM(tiny_llava, backend="torch", device="cpu").generate(requests, sp)]
    waited = {}
    for encode_first in (True, False):
        with EPDEngine(tiny_llava, placement="E:cpu,cpu P:cpu D:cpu", backend="torch", device="cpu",
                       max_images_per_batch=1, mm_cache=False, encode_first=encode_first) as epd:
            assert [o.token_ids for o in epd.generate(requests, sp)] == reference
            deadline = time.monotonic() + 20  # stage reports are asynchronous
            while "encode_first_wait_s" not in epd.status()["stages"]["prefill0"] and time.monotonic() < deadline:
                epd.step(timeout_s=0.05)
            waited[encode_first] = epd.status()["stages"]["prefill0"]["encode_first_wait_s"]
            assert not epd.busy_board.busy_on("cpu"), "idle encoders publish idle"
    assert waited[True] > 0 and waited[False] == 0, waited


def test_an_encoder_that_dies_busy_is_cleared_from_the_board(tiny_llava: Path) -> None:
    with EPDEngine(tiny_llava, placement="E:cpu,cpu P:cpu D:cpu", backend="torch", device="cpu") as epd:
        epd.busy_board.set(1, "cpu", True)  # as if encode1 died with work in hand
        epd.stages["encode1"].process.kill()
        deadline = time.monotonic() + 20
        while not epd.stages["encode1"].dead and time.monotonic() < deadline:
            epd.step(timeout_s=0.05)
        assert epd.stages["encode1"].dead and not epd.busy_board.busy_on("cpu")
        out = epd.generate([Request("One <image>", images=[_png(1)])], SamplingParams(max_tokens=3))
        assert out[0].finish_reason == "length" and len(out[0].token_ids) == 3
