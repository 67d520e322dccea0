"""EPD across processes on the CPU: 2 encoders + prefill + decode (+ this orchestrator)."""

from __future__ import annotations

import io
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine import LLM, Request, SamplingParams
from engine.config import ModelConfig
from engine.epd import EPDEngine, StageError
from engine.estimator import LoadEstimator


def _png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (70 + seed, 90, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _requests() -> list[Request]:
    return [
        Request("What is in the picture?", images=[_png(1)]),
        Request("No image here, just text."),
        Request("Compare <image>, <image> and <image> please", images=[_png(2), _png(3), _png(4)]),
        Request("Another one", images=[_png(5)]),
    ]


SP = SamplingParams(max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def epd(tiny_llava: Path):
    engine = EPDEngine(tiny_llava, placement="E:cpu,cpu P:cpu D:cpu", backend="torch", device="cpu")
    yield engine
    engine.shutdown()
    assert not any(p.is_alive() for p in engine.procs.values()), "a stage process outlived shutdown"
    assert not any(Path(h.path).exists() for h in engine.arenas), "an arena file outlived shutdown"
    assert not Path(engine.image_bytes.handle.path).exists()


def test_epd_matches_aggregated(epd: EPDEngine, tiny_llava: Path) -> None:
    reference = LLM(tiny_llava, backend="torch", device="cpu").generate(_requests(), SP)
    outputs = epd.generate(_requests(), SP)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in reference]
    assert [o.text for o in outputs] == [o.text for o in reference]
    three = outputs[2].ttft_breakdown
    assert three["encode_s"] > 0 and outputs[1].ttft_breakdown["encode_s"] == 0
    # the encoders' arenas are on prefill's device: embeddings read in place, nothing copied;
    # KV read in place too (shared arena)
    assert all(o.handoff["mm_bytes"] == 0 and o.handoff["kv_bytes"] == 0 for o in outputs)
    assert epd.stages["prefill0"].ready["mm_in_place_from"] == [0, 1]
    # one copy of each weight half on the device: encode1 maps encode0's tower, decode0 prefill0's LM
    weights = {name: h.ready["weights"] for name, h in epd.stages.items()}
    assert [(weights[n]["parts"], weights[n]["shared"]) for n in ("encode0", "encode1", "prefill0", "decode0")] == [
        ("vision", False), ("vision", True), ("lm", False), ("lm", True)]
    assert weights["encode0"]["bytes"] == weights["encode1"]["bytes"] > 0
    # again, so every stage has freed and reused its blocks
    assert [o.token_ids for o in epd.generate(_requests(), SP)] == [o.token_ids for o in reference]
    # the stages report their queues and blocks; idle again, nothing is held
    names = ["decode0", "encode0", "encode1", "prefill0"]

    def idle(stages: dict) -> bool:
        return sorted(stages) == names and stages["decode0"]["running"] == 0 and all(
            s.get(k, {}).get("used", 0) == 0 for s in stages.values() for k in ("kv_blocks", "mm_blocks"))

    deadline = time.monotonic() + 20  # reports are asynchronous: a slow CI machine needs a while
    while not idle(stages := epd.status()["stages"]) and time.monotonic() < deadline:
        epd.step(timeout_s=0.05)
    assert idle(stages), stages
    assert stages["prefill0"]["kv_blocks"]["total"] > 0 and stages["decode0"]["waiting"] == 0


def test_image_bytes_cross_to_the_encoders_through_shared_memory(epd: EPDEngine, tiny_llava: Path) -> None:
    """Bytes and data URLs go into the orchestrator's byte arena once (ByteRefs in the tasks, not
    pickled bytes); every span is free again when the requests are done."""
    import base64

    from ipc.byte_arena import ByteRef

    shipped = []
    original = epd._ship

    def spy(src):
        out = original(src)
        shipped.append(out)
        return out

    epd._ship = spy
    try:
        url = "data:image/png;base64," + base64.b64encode(_png(7)).decode()
        reqs = [Request("Describe <image>", images=[_png(6)]), Request("And <image>", images=[url])]
        outs = epd.generate(reqs, SP)
    finally:
        del epd._ship
    reference = LLM(tiny_llava, backend="torch", device="cpu").generate(reqs, SP)
    assert [o.token_ids for o in outs] == [o.token_ids for o in reference]
    assert len(shipped) == 2 and all(isinstance(x, ByteRef) for x in shipped)
    assert epd.image_bytes.bytes_used == 0


def test_an_aborted_request_keeps_its_image_bytes_until_its_encoder_answers(epd: EPDEngine) -> None:
    """A request aborted while an encoder holds its task: its span is not reused before the
    encoder has read it (it is held until the encoder's late answer), then freed."""
    seq = epd.add_request(Request("Describe <image> and <image>", images=[_png(11), _png(12)]), SP)
    epd.abort(seq)
    assert epd.image_bytes.held == 1 and epd.image_bytes.bytes_used > 0
    out = epd.generate([Request("And <image>", images=[_png(13)])], SP)[0]
    deadline = time.monotonic() + 30
    while epd.image_bytes.held and time.monotonic() < deadline:  # the late answers, if not read yet
        epd.step()
    assert epd.image_bytes.held == 0 and epd.image_bytes.bytes_used == 0
    # the stamps on its way to the first token, in order (the encoder's batch on the same clock)
    t = out.timeline
    order = ["encode_start", "preprocess_start", "preprocess_end", "tower_start", "tower_end", "encode_end",
             "prefill_start", "prefill_batch_start", "prefill_batch_end", "first_token"]
    assert list(t) != [] and set(order) <= set(t) and [t[k] for k in order] == sorted(t[k] for k in order)
    assert abs(t["first_token"] - out.ttft_s) < 1e-9


def test_a_full_byte_arena_sends_the_bytes_in_the_task() -> None:
    from types import SimpleNamespace

    from ipc.byte_arena import ByteArena

    arena = ByteArena.create(128)
    try:
        fake = SimpleNamespace(image_bytes=arena)
        big, small = bytes(200), bytes(10)
        assert EPDEngine._ship(fake, big) is big  # does not fit: as given
        assert EPDEngine._ship(fake, small).length == 10
        assert EPDEngine._ship(fake, "/some/path.png") == "/some/path.png"  # the stage reads the file
    finally:
        arena.close()


def test_stops_end_epd_requests_where_aggregated_ends_them(epd: EPDEngine, tiny_llava: Path) -> None:
    """A stop token (decode stops there, the orchestrator's record of the request too: both run
    Sequence.append_tokens) and a stop string (the orchestrator's output processor; decode is
    aborted) end each request on the token the aggregated engine ends it."""
    llm = LLM(tiny_llava, backend="torch", device="cpu")
    requests = _requests()[:2]
    reference = llm.generate(requests, SP)
    stop_id = reference[0].token_ids[len(reference[0].token_ids) // 2]
    text = reference[1].text
    for sp in (replace(SP, stop_token_ids=(stop_id,)), replace(SP, stop=(text[len(text) // 2:][:3],))):
        aggregated = llm.generate(requests, sp)
        assert any(o.finish_reason == "stop" for o in aggregated)
        outputs = epd.generate(requests, sp)
        assert [(o.token_ids, o.text, o.finish_reason) for o in outputs] == [
            (o.token_ids, o.text, o.finish_reason) for o in aggregated]
    assert not epd.flights and not epd.output_processor.states


def test_bad_image_fails_only_its_request(epd: EPDEngine) -> None:
    from engine.images import ImageError

    with pytest.raises(ImageError):  # caught by the orchestrator's check, before any stage
        epd.generate([Request("x", images=[b"not an image"])], SP)
    assert len(epd.generate([Request("fine", images=[_png(9)])], SP)[0].token_ids) == 12


def test_image_corrupt_past_its_header_fails_in_the_encoder(epd: EPDEngine) -> None:
    """The orchestrator checks headers only (decoding is the encoders' work, off the thread that
    serves every request): such an image fails its request there, naming it; others go on."""
    data = _png(9)
    with pytest.raises(StageError, match=r"encode\d: image 0: cannot decode"):
        epd.generate([Request("x", images=[data[: len(data) // 2]])], SP)
    assert epd.status()["encoder_images_in_flight"] == [0, 0]
    assert len(epd.generate([Request("fine", images=[data])], SP)[0].token_ids) == 12


def test_killed_encoder_is_routed_around_and_killed_prefill_fails_cleanly(tiny_llava: Path) -> None:
    engine = EPDEngine(tiny_llava, backend="torch", device="cpu")  # default: 2 encoders
    try:
        engine.procs["encode0"].kill()
        engine.procs["encode0"].join()
        outputs = engine.generate(_requests(), SP)
        assert all(len(o.token_ids) == 12 for o in outputs)
        engine.procs["prefill0"].kill()
        engine.procs["prefill0"].join()
        with pytest.raises(StageError, match="broken: stage prefill0 died"):
            engine.generate(_requests()[:2], SP)
    finally:
        engine.shutdown()
    assert not any(p.is_alive() for p in engine.procs.values())
    assert not any(Path(h.path).exists() for h in engine.arenas)


def test_decode_dying_under_a_request_fails_it_with_an_error(tiny_llava: Path) -> None:
    """Whether decode's death is noticed on a quiet step or when prefill hands the request over,
    the request ends with an error event (step() never raises) and new work is refused."""
    engine = EPDEngine(tiny_llava, placement="P:cpu D:cpu", mode="pd", backend="torch", device="cpu")
    try:
        seq = engine.add_request(_requests()[0], SP)
        engine.procs["decode0"].kill()
        engine.procs["decode0"].join()
        errors, deadline = [], time.monotonic() + 60
        while seq.seq_id in engine.flights and time.monotonic() < deadline:
            errors += [ev.error for ev in engine.step() if ev.error]
        assert len(errors) == 1 and "decode" in errors[0], errors
        with pytest.raises(StageError, match="broken: stage decode0 died"):
            engine.add_request(_requests()[1], SP)
    finally:
        engine.shutdown()
    assert not any(p.is_alive() for p in engine.procs.values())


def test_several_prefill_and_decode_instances(tiny_llava: Path) -> None:
    """E:1 P:2 D:2 (6 processes): requests go to the least-loaded live instance; output equals
    aggregated; a dead prefill or decode instance is routed around; nothing is left behind."""
    reference = [o.token_ids for o in LLM(tiny_llava, backend="torch", device="cpu").generate(_requests(), SP)]
    engine = EPDEngine(tiny_llava, placement="E:cpu P:cpu,cpu D:cpu,cpu", backend="torch", device="cpu")
    try:
        assert [o.token_ids for o in engine.generate(_requests(), SP)] == reference
        assert [h.load for h in engine.of_kind("prefill") + engine.of_kind("decode")] == [0, 0, 0, 0]
        engine.procs["prefill1"].kill()
        engine.procs["decode0"].kill()
        engine.procs["prefill1"].join()
        engine.procs["decode0"].join()
        outputs = engine.generate(_requests(), SP)  # on prefill0 and decode1
        assert [o.token_ids for o in outputs] == reference
        assert engine.broken is None
        alive = engine.status()["stages_alive"]
        assert alive == {"encode0": True, "prefill0": True, "prefill1": False, "decode0": False, "decode1": True}
    finally:
        engine.shutdown()
    assert not any(p.is_alive() for p in engine.procs.values())
    assert not any(Path(h.path).exists() for h in engine.arenas)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_epd_on_one_gpu_matches_aggregated(tiny_llava: Path) -> None:
    """Stages share one GPU: arenas travel as CUDA IPC handles.

    Same batch shapes in both modes, since bf16 results depend on them (GEMM tiling): one request
    at a time, and one encoder: two split the 3-image request into vision batches of 2 + 1 where
    aggregated runs one of 3. With two encoders this test failed on the H100 (2026-11-26, d1d7e22);
    the torch backend in bf16 on the CPU shows the same: only the 3-image request differs, and
    only with two encoders."""
    pytest.importorskip("epd_kernels._epd_C")
    kw = {"backend": "cuda", "device": "cuda", "dtype": "bfloat16", "kv_cache_tokens": 4096}
    llm = LLM(tiny_llava, **kw)
    reference = [llm.generate([r], SP)[0].token_ids for r in _requests()]
    with EPDEngine(tiny_llava, placement="E:0 P:0 D:0", **kw) as engine:
        assert [engine.generate([r], SP)[0].token_ids for r in _requests()] == reference


def test_pd_mode_with_kv_migration_matches_aggregated(tiny_llava: Path) -> None:
    """pd mode, and decode pulling the KV blocks into its own arena (share_kv_arena=False)."""
    reference = LLM(tiny_llava, backend="torch", device="cpu").generate(_requests(), SP)
    with EPDEngine(tiny_llava, placement="P:cpu D:cpu", mode="pd", share_kv_arena=False, backend="torch",
                   device="cpu") as pd:
        assert len(pd.procs) == 2
        outputs = pd.generate(_requests(), SP)
        again = pd.generate(_requests(), SP)  # prefill got its blocks back
    assert [o.token_ids for o in outputs] == [o.token_ids for o in reference]
    assert [o.token_ids for o in again] == [o.token_ids for o in reference]
    cfg = ModelConfig.from_dir(tiny_llava).text
    block = cfg.num_layers * 2 * 16 * cfg.num_kv_heads * cfg.head_dim * 4  # fp32, block_size 16
    for o in outputs:
        assert o.handoff["kv_bytes"] == -(-len(o.prompt_token_ids) // 16) * block
        assert o.handoff["mm_bytes"] == 0  # pd: prefill encodes its own images


@pytest.mark.parametrize(
    ("text", "mode", "match"),
    [("E:0,1 P:2 D:3", "epd", None), ("P:cpu D:cpu", "pd", None), ("E:0 P:0", "epd", "needs exactly the stages"),
     ("E:0 P:0 D:0", "pd", "needs exactly"), ("E:x P:0 D:0", "epd", "neither a GPU index"),
     ("Q:1", "epd", "expected items like")],
)
def test_parse_placement(text: str, mode: str, match: str | None) -> None:
    from engine.placement import parse_placement

    if match is None:
        out = parse_placement(text, mode)
        assert out["P"] and out["D"] and (mode == "pd" or out["E"])
        assert parse_placement("E:0,1 P:2 D:3", "epd")["E"] == ["cuda:0", "cuda:1"]
    else:
        with pytest.raises(ValueError, match=match):
            parse_placement(text, mode)


def test_placement_by_stage_kind() -> None:
    from engine.placement import Placement

    where = Placement.parse("E:0,1 P:2 D:cpu", "epd")
    assert where.devices == {"encode": ("cuda:0", "cuda:1"), "prefill": ("cuda:2",), "decode": ("cpu",)}
    assert where.num_stages == 4 and not where.shares_kv_device() and where.of("encode") == ("cuda:0", "cuda:1")
    pd = Placement.default("cpu", "pd")
    assert pd.text == "P:cpu D:cpu" and pd.of("encode") == () and pd.shares_kv_device()
    assert Placement.default("1", "epd").devices["encode"] == ("cuda:1", "cuda:1")
    assert not Placement.parse("P:0,0 D:0,0", "pd").shares_kv_device()  # sharing is for one P and one D
    Placement.parse("P:cpu D:cpu", "pd").check_devices(0)  # no GPU named: nothing to check
    with pytest.raises(ValueError, match="names GPU 2, but this machine has 2 CUDA devices"):
        where.check_devices(2)


def test_rpc_server_in_front_of_epd(epd: EPDEngine, tiny_llava: Path, tmp_path: Path) -> None:
    import threading

    from ipc.client import RPCClient, RPCError
    from ipc.server import RPCServer

    reference = LLM(tiny_llava, backend="torch", device="cpu").generate(_requests()[2], SP)[0]
    server = RPCServer(epd, str(tmp_path / "epd.sock"), b"k")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        client = RPCClient(server.address, b"k")
        req = _requests()[2]
        msgs = list(client.generate(req.prompt, images=req.images, max_tokens=12, ignore_eos=True))
        assert msgs[-1]["output"]["token_ids"] == reference.token_ids
        assert "".join(m.get("text", "") for m in msgs[:-1]) == reference.text
        status = client.status()
        assert status["mode"] == "epd" and all(status["stages_alive"].values())
        with pytest.raises(RPCError, match="kv sessions need the in-process"):
            client.kv_init("Hi")
        client.stop()
    finally:
        thread.join(timeout=60)
    assert not thread.is_alive()


class _FakeProcess:
    def __init__(self) -> None:
        self.running, self.exitcode = True, None

    def is_alive(self) -> bool:
        return self.running

    def kill(self) -> None:
        self.running, self.exitcode = False, -9

    def join(self, timeout: float | None = None) -> None:
        pass


class _FakeInbox:
    def __init__(self) -> None:
        self.sent: list = []

    def put(self, msg: object) -> None:
        self.sent.append(msg)


def test_stage_handles_without_processes() -> None:
    """One handle per stage: liveness, routing snapshot, no writes to a dead stage, a read-only
    name -> process view, and a dead stage noticed once (the engine breaks when its kind is gone)."""
    from engine.epd import StageHandle
    from engine.router import InstanceLoad

    epd = EPDEngine.__new__(EPDEngine)
    epd.estimator, epd.dynamic = LoadEstimator(), None
    epd.flights, epd.late_events, epd.broken, epd.mode, epd.image_bytes = {}, [], None, "pd", None
    epd.stages = {h.name: h for h in (StageHandle(kind, i, "cpu", _FakeProcess(), _FakeInbox(), None)
                                       for kind, i in (("prefill", 0), ("prefill", 1), ("decode", 0)))}
    procs = epd.procs
    assert list(procs) == ["prefill0", "prefill1", "decode0"] and procs["decode0"] is epd.stages["decode0"].process
    with pytest.raises(TypeError):
        procs["decode0"] = None  # read-only
    p0, p1, d0 = epd.stages.values()
    p0.load = 2
    assert [h.routing_load() for h in epd.of_kind("prefill")] == [InstanceLoad(0, 2), InstanceLoad(1, 0)]
    p1.process.running, p1.process.exitcode, p1.crash = False, -9, "boom"
    events: list = []
    epd._check_stages(events)
    assert p1.dead and not p1.alive() and p0.alive() and epd.broken is None and not events
    p1.send("ignored")
    assert p1.inbox.sent == [] and p1.routing_load() == InstanceLoad(1, 0, alive=False)
    d0.process.running = False
    epd._check_stages(events)
    assert epd.broken == "stage decode0 died (exit code None) and no decode process is left"
    epd._check_stages(events)  # noticed once
    assert epd.status()["stages_alive"] == {"prefill0": True, "prefill1": False, "decode0": False}


def test_kv_owners_on_one_device_size_one_at_a_time_after_every_stage_there_loaded() -> None:
    """The start-up protocol's sizing order (no processes): nothing is sized while a stage on the
    device is still loading; then one KV owner at a time, each told its share of what is left
    (1/2, then 1/1); GPUs size independently; a prefill whose arena decode shares sizes for both."""
    from engine.messages import SizeKV
    from engine.stage_handles import StageHandle, size_next

    stages = [StageHandle(kind, i, device, _FakeProcess(), _FakeInbox(), None)
              for kind, i, device in (("encode", 0, "cuda:0"), ("prefill", 0, "cuda:0"), ("prefill", 1, "cuda:0"),
                                      ("decode", 0, "cuda:1"))]
    enc, p0, p1, d0 = stages
    for h in (p0, p1, d0):
        h.loaded, h.kv_owner = True, True
    sizing: dict = {}
    size_next(stages, sizing)
    assert not p0.inbox.sent and not p1.inbox.sent  # encode0 (same GPU) still loading
    assert d0.inbox.sent == [SizeKV(share=1.0)] and sizing[("", "cuda:1")] is d0  # its GPU is ready
    enc.loaded = True
    size_next(stages, sizing)
    size_next(stages, sizing)  # asked again before prefill0 answered: nothing more is sent
    assert p0.inbox.sent == [SizeKV(share=0.5)] and not p1.inbox.sent
    p0.kv_blocks = 100
    del sizing[("", "cuda:0")]  # what its Sized message does (keyed by host and device)
    size_next(stages, sizing)
    assert p1.inbox.sent == [SizeKV(share=1.0)]

    shared = [StageHandle("prefill", 0, "cuda:0", _FakeProcess(), _FakeInbox(), None),
              StageHandle("decode", 0, "cuda:0", _FakeProcess(), _FakeInbox(), None)]
    shared[0].loaded, shared[0].kv_owner = True, True
    shared[1].loaded, shared[1].kv_owner = True, False  # reads prefill0's arena
    size_next(shared, {})
    assert shared[0].inbox.sent == [SizeKV(share=1.0, for_decode=True)] and not shared[1].inbox.sent

    # --dynamic: a device with an encoder keeps one owner's share free (an encoder that switches
    # to prefill or decode needs an arena there); a device without one does not
    dyn = [StageHandle(kind, 0, device, _FakeProcess(), _FakeInbox(), None)
           for kind, device in (("encode", "cuda:0"), ("prefill", "cuda:0"), ("decode", "cuda:1"))]
    for h in dyn:
        h.loaded, h.kv_owner = True, h.kind != "encode"
    size_next(dyn, {}, room_for_switch=True)
    assert dyn[1].inbox.sent == [SizeKV(share=0.5)] and dyn[2].inbox.sent == [SizeKV(share=1.0)]

    # the same GPU index on two hosts is two GPUs: each sizes on its own
    hosts = [StageHandle("prefill", i, "cuda:0", _FakeProcess(), _FakeInbox(), None, host=host)
             for i, host in enumerate(("a", "b"))]
    for h in hosts:
        h.loaded, h.kv_owner = True, True
    size_next(hosts, {})
    assert [h.inbox.sent for h in hosts] == [[SizeKV(share=1.0)], [SizeKV(share=1.0)]]


def test_weight_plan_maps_the_first_covering_store_on_the_device() -> None:
    from engine.stage_handles import weight_plan

    stages = [("encode0", "cpu", "vision"), ("encode1", "cpu", "vision"), ("encode2", "cuda:1", "vision"),
              ("prefill0", "cpu", "all"), ("prefill1", "cuda:1", "lm"), ("decode0", "cpu", "lm"),
              ("decode1", "cuda:1", "lm")]
    assert weight_plan(stages) == {"encode0": None, "encode1": "encode0", "encode2": None, "prefill0": None,
                                   "prefill1": None, "decode0": "prefill0", "decode1": "prefill1"}


@pytest.mark.parametrize("device", ["cpu", "cuda:0"])
def test_a_dead_weight_owner_stops_its_mappers_on_a_gpu_only(device: str) -> None:
    """CUDA IPC memory is its exporter's: on a GPU, a stage mapping a dead stage's weights is
    stopped and handled as dead in the same pass (its requests fail naming it); on the CPU the
    shared file outlives its creator and the mapper serves on."""
    from engine.epd import StageHandle

    epd = EPDEngine.__new__(EPDEngine)
    epd.estimator, epd.dynamic = LoadEstimator(), None
    epd.flights, epd.late_events, epd.broken, epd.mode, epd.image_bytes = {}, [], None, "epd", None
    epd.stages = {h.name: h for h in (StageHandle(kind, i, device, _FakeProcess(), _FakeInbox(), None)
                                       for kind, i in (("prefill", 0), ("prefill", 1), ("decode", 0), ("decode", 1)))}
    epd.weight_sources = {"prefill0": None, "prefill1": "prefill0", "decode0": "prefill0", "decode1": None}
    epd.stages["prefill0"].process.kill()
    epd._check_stages([])
    dead = {name for name, h in epd.stages.items() if h.dead}
    if device == "cpu":
        assert dead == {"prefill0"} and epd.broken is None
    else:
        assert dead == {"prefill0", "prefill1", "decode0"}
        assert epd.stages["decode0"].crash == "it mapped the weights of prefill0, which died"
        assert epd.broken == "stage prefill0 died (exit code -9) and no prefill process is left"


def test_a_decode_stage_runs_at_most_max_num_seqs_requests(tiny_llava: Path) -> None:
    """More requests than max_num_seqs reach decode at once: the rest wait for a slot (they
    crashed the decode's graphs on a GPU), and every output equals the aggregated engine's."""
    requests = [Request(f"Number {i}: tell me more", images=[_png(i % 3)]) for i in range(7)]
    sp = SamplingParams(max_tokens=10, ignore_eos=True)
    reference = LLM(tiny_llava, backend="torch", device="cpu", max_num_seqs=2).generate(requests, sp)
    with EPDEngine(tiny_llava, placement="E:cpu P:cpu D:cpu", backend="torch", device="cpu", max_num_seqs=2) as epd:
        batches = []
        steps = epd.estimator.steps
        epd.estimator.steps = lambda name, batch, now: (batches.append(batch), steps(name, batch, now))
        outputs = epd.generate(requests, sp)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in reference]
    assert batches and max(batches) <= 2, batches
