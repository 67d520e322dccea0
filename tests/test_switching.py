"""Role switches on the CPU (engine/switching.py), under load on the tiny model: an encoder
switched to prefill and back while requests are in flight; outputs equal the aggregated engine,
no request is lost, no block leaks, status tells the story; the switches that cannot be done are
refused with the reason."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from test_epd import _png

from engine import LLM, Request, SamplingParams
from engine.epd import EPDEngine
from engine.sampling import RequestError

SP = SamplingParams(max_tokens=10, ignore_eos=True)


def _requests(n: int, offset: int = 0) -> list[Request]:
    return [Request(f"Describe picture {i}", images=[_png(offset + i)]) if i % 3 else Request(f"Hello {i}")
            for i in range(n)]


def _run(epd: EPDEngine, reqs: list[Request], during=None) -> list[list[int]]:
    """Queue every request, call during() once they are in flight, then step to the end."""
    seqs = [epd.add_request(r, SP) for r in reqs]
    index = {s.seq_id: i for i, s in enumerate(seqs)}
    tokens: dict[int, list[int]] = {}
    errors: list[str] = []

    def take(events) -> None:
        for ev in events:
            if ev.error:
                errors.append(ev.error)
            elif ev.output is not None:
                tokens[index[ev.index]] = ev.output.token_ids

    if during is not None:
        take(epd.step(timeout_s=0.05))
        during()
    deadline = time.monotonic() + 120
    while len(tokens) + len(errors) < len(reqs) and time.monotonic() < deadline:
        take(epd.step(timeout_s=0.05))
    assert not errors, errors
    missing = [i for i in range(len(reqs)) if i not in tokens]
    flights = [(f.seq.seq_id, f.parts, f.prefill, f.decode) for f in epd.flights.values()]
    assert not missing, f"requests {missing} not done; in flight: {flights}"
    return [tokens[i] for i in range(len(reqs))]


@pytest.fixture(scope="module")
def reference(tiny_llava: Path) -> dict[str, list[list[int]]]:
    llm = LLM(tiny_llava, backend="torch", device="cpu")
    return {name: [o.token_ids for o in llm.generate(reqs, SP)]
            for name, reqs in (("a", _requests(9)), ("b", _requests(9, 50)), ("c", _requests(6, 90)))}


def _idle(epd: EPDEngine) -> dict:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stages = epd.status()["stages"]
        if all(s.get(k, {}).get("used", 0) == 0 for name, s in stages.items() if "moved_to" not in s
               for k in ("kv_blocks", "mm_blocks")) and stages["decode0"]["running"] == 0:
            return stages
        epd.step(timeout_s=0.05)
    raise AssertionError(f"blocks still used: {epd.status()['stages']}")


def test_encoder_to_prefill_and_back_under_load(tiny_llava: Path, reference) -> None:
    with EPDEngine(tiny_llava, placement="E:cpu,cpu P:cpu D:cpu", share_kv_arena=False, backend="torch",
                   device="cpu", kv_cache_tokens=4096) as epd:
        switched = {}
        assert _run(epd, _requests(9), lambda: switched.update(epd.switch_role("encode", 1, "prefill"))) == \
            reference["a"]
        assert switched["from"] == "encode1" and switched["to"] == "prefill1" and switched["seconds"] > 0
        status = epd.status()
        assert status["stages"]["encode1"]["moved_to"] == "prefill1"
        assert status["stages_alive"]["prefill1"] and not status["stages_alive"]["encode1"]
        # prefill1 maps prefill0's LM (zero copy), and gets requests: both prefills serve now
        assert status["stages"]["prefill1"]["weights"] == {**status["stages"]["prefill0"]["weights"], "shared": True}
        assert _run(epd, _requests(9, 50)) == reference["b"]
        assert epd.stages["prefill1"].ready["mm_in_place_from"] == [0]  # encode1's arena is gone
        _idle(epd)
        # and back: a third encoder (indices never move), mapping encode0's tower
        back = {}
        assert _run(epd, _requests(6, 90), lambda: back.update(epd.switch_role("prefill", 1, "encode"))) == \
            reference["c"]
        assert back["to"] == "encode2"
        stages = _idle(epd)
        assert [s["from"] + ">" + s["to"] for s in epd.status()["switches"]] == ["encode1>prefill1", "prefill1>encode2"]
        assert stages["encode2"]["weights"]["shared"] and stages["prefill1"]["moved_to"] == "encode2"
        assert [h.name for h in epd.of_kind("encode") if h.alive()] == ["encode0", "encode2"]
        assert _run(epd, _requests(9)) == reference["a"]  # encode0 and encode2 serve, prefill0 alone
        assert sum(h.load for h in epd.stages.values()) == 0


def test_impossible_switches_are_refused_with_the_reason(tiny_llava: Path, reference, tmp_path: Path) -> None:
    with EPDEngine(tiny_llava, placement="E:cpu P:cpu D:cpu", backend="torch", device="cpu",
                   kv_cache_tokens=4096) as epd:
        cases = [(("encode", 0, "prefill"), "the last live encode stage"),
                 (("prefill", 0, "encode"), "the last live prefill stage"),
                 (("encode", 3, "prefill"), "there is no stage encode3"),
                 (("encode", 0, "encode"), "already serves as encode"),
                 (("encode", 0, "vision"), "kinds are encode, prefill, decode")]
        for args, why in cases:
            with pytest.raises(RequestError, match=why):
                epd.switch_role(*args)
        assert epd.status()["switches"] == []
    with EPDEngine(tiny_llava, placement="E:cpu P:cpu,cpu D:cpu", backend="torch", device="cpu",
                   kv_cache_tokens=4096) as epd:
        with pytest.raises(RequestError, match="prefill0's weights are mapped by prefill1, decode0; switch those"):
            epd.switch_role("prefill", 0, "decode")
        stages = epd.load()["stages"]  # so --dynamic's allocator never picks it
        assert "mapped by prefill1, decode0" in stages["prefill0"]["pinned"] and "pinned" not in stages["prefill1"]
    with EPDEngine(tiny_llava, placement="E:cpu,cpu P:cpu D:cpu", backend="torch", device="cpu",
                   kv_cache_tokens=4096) as epd:  # prefill0 and decode0 share one KV arena; over RPC
        import threading

        from ipc.client import RPCClient, RPCError
        from ipc.server import RPCServer

        server = RPCServer(epd, str(tmp_path / "epd.sock"), b"k")
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            client = RPCClient(server.address, b"k", timeout_s=120)
            done = client.switch_role("encode", 1, "prefill")
            assert done["from"] == "encode1" and done["to"] == "prefill1" and done["seconds"] > 0
            with pytest.raises(RPCError, match="prefill0's KV arena is shared with a decode stage"):
                client.switch_role("prefill", 0, "encode")
            with pytest.raises(RPCError, match="there is no stage encode1 \\(the encode stages: \\['encode0'\\]\\)"):
                client.switch_role("encode", 1, "decode")
            with pytest.raises(RPCError, match="params.index = -1; must be an int >= 0"):
                client.switch_role("encode", -1, "decode")
            req = _requests(3)[1]
            msgs = list(client.generate(req.prompt, images=req.images, max_tokens=SP.max_tokens, ignore_eos=True))
            assert msgs[-1]["output"]["token_ids"] == reference["a"][1]
            assert [s["to"] for s in client.status()["switches"]] == ["prefill1"]
            client.stop()
        finally:
            thread.join(timeout=60)


def test_http_admin_route_switches_while_chats_go_on(tiny_llava: Path, reference) -> None:
    """POST /admin/switch_role behind the API key: 200 with the record once the new role serves,
    while chat completions run; the reasons for refusals come back as 400s."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    httpx = pytest.importorskip("httpx")
    import base64
    import threading

    from engine.serving import EngineLoop
    from ipc.http_server import UvicornThread, build_app

    with EPDEngine(tiny_llava, placement="E:cpu,cpu P:cpu D:cpu", share_kv_arena=False, backend="torch",
                   device="cpu", kv_cache_tokens=4096) as epd:
        loop = EngineLoop(epd)
        loop.start()
        srv = UvicornThread(build_app(loop, "tiny", api_key="key"), "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{srv.port}"
        auth = {"Authorization": "Bearer key"}
        reqs = _requests(9)
        codes: dict[int, int] = {}

        def chat(i: int) -> None:
            r = reqs[i]
            content = [{"type": "text", "text": r.prompt}] + [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(x).decode()}}
                for x in r.images or []]
            body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": SP.max_tokens,
                    "temperature": 0}
            got = httpx.post(f"{url}/v1/chat/completions", json=body, headers=auth, timeout=120)
            codes[i] = got.status_code

        try:
            threads = [threading.Thread(target=chat, args=(i,)) for i in range(len(reqs))]
            for t in threads:
                t.start()
            got = httpx.post(f"{url}/admin/switch_role", json={"kind": "encode", "index": 1, "new_kind": "prefill"},
                             headers=auth, timeout=120)
            assert got.status_code == 200, got.text
            assert got.json()["to"] == "prefill1" and got.json()["drain_s"] >= 0
            for t in threads:
                t.join(120)
            assert codes == {i: 200 for i in range(len(reqs))}  # none lost or failed
            refused = httpx.post(f"{url}/admin/switch_role", json={"kind": "encode", "index": 0, "new_kind": "decode"},
                                 headers=auth, timeout=60)
            assert refused.status_code == 400 and "the last live encode stage" in refused.text
            bad = httpx.post(f"{url}/admin/switch_role", json={"kind": "encode", "index": "0"}, headers=auth,
                             timeout=60)
            assert bad.status_code == 400 and "index = '0'" in bad.text
            assert httpx.post(f"{url}/admin/switch_role", json={}, timeout=60).status_code == 401
        finally:
            assert srv.stop()
            loop.stop()
            assert loop.join(60)


def test_decode_to_prefill_hands_its_running_requests_over(tiny_llava: Path) -> None:
    """A decode switched to prefill while it decodes: each of its requests moves, with the KV
    written so far, to the other decode (pulled from the old one's arena) and continues there;
    the greedy tokens equal the aggregated engine's, nothing is lost, no block stays used."""
    sp = SamplingParams(max_tokens=24, ignore_eos=True)
    reqs = _requests(8, 200)
    expected = [o.token_ids for o in LLM(tiny_llava, backend="torch", device="cpu").generate(reqs, sp)]
    with EPDEngine(tiny_llava, placement="E:cpu P:cpu D:cpu,cpu", backend="torch", device="cpu",
                   kv_cache_tokens=4096) as epd:
        seqs = [epd.add_request(r, sp) for r in reqs]
        index = {s.seq_id: i for i, s in enumerate(seqs)}
        out: dict[int, list[int]] = {}
        started = {}
        deadline = time.monotonic() + 120
        while len(out) < len(reqs) and time.monotonic() < deadline:
            for ev in epd.step(timeout_s=0.05):
                assert ev.error is None, ev.error
                if ev.output is not None:
                    out[index[ev.index]] = ev.output.token_ids
            on_d0 = [f for f in epd.flights.values() if f.decode == 0 and len(f.seq.output_ids) >= 3]
            if not started and on_d0:
                started["moved"] = len(on_d0)
                started.update(epd.switch_role("decode", 0, "prefill"))
        assert started["moved"] >= 1 and started["to"] == "prefill1"
        assert [out[i] for i in range(len(reqs))] == expected
        stages = _idle_all(epd)
        assert stages["decode0"]["moved_to"] == "prefill1" and stages["decode1"]["running"] == 0
        assert sum(h.load for h in epd.stages.values()) == 0
        # the new prefill serves: requests go through both prefills and the remaining decode
        assert [o.token_ids for o in epd.generate(reqs, sp)] == expected


def _idle_all(epd: EPDEngine) -> dict:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stages = epd.status()["stages"]
        if all(s.get(k, {}).get("used", 0) == 0 for s in stages.values() if "moved_to" not in s
               for k in ("kv_blocks", "mm_blocks")):
            return stages
        epd.step(timeout_s=0.05)
    raise AssertionError(f"blocks still used: {epd.status()['stages']}")


def test_a_worker_killed_during_its_switch_is_a_dead_stage(tiny_llava: Path, reference) -> None:
    """The switching worker dies before its new role is ready: switch_role raises naming it, the
    engine serves on with the stages left (the old handle is a dead stage: nothing was on it)."""
    import os
    import signal

    from engine.stage_handles import StageError

    with EPDEngine(tiny_llava, placement="E:cpu,cpu P:cpu D:cpu", backend="torch", device="cpu",
                   kv_cache_tokens=4096) as epd:
        name = epd.begin_switch("encode", 1, "prefill")
        os.kill(epd.procs["encode1"].pid, signal.SIGKILL)
        with pytest.raises(StageError, match="switch to prefill1 failed: the stage died"):
            deadline = time.monotonic() + 60
            while epd.switch_done(name) is None and time.monotonic() < deadline:
                events = epd.step(timeout_s=0.05)
                epd.late_events.extend(events)
        assert epd.broken is None
        assert _run(epd, _requests(9)) == reference["a"]  # on encode0, prefill0, decode0
        alive = epd.status()["stages_alive"]
        assert alive["encode0"] and not alive["encode1"] and not alive["prefill1"] and alive["prefill0"]


def test_a_switching_stage_gets_its_weights_over_gloo_from_a_peer(tiny_llava: Path, reference) -> None:
    """weights="peer": the new prefill's LM is copied from prefill0 over a PeerLink (gloo on the
    CPU) while prefill0 serves on; it owns that copy (not shared); outputs equal aggregated.
    weights="disk" reads the checkpoint; a source that does not exist is refused."""
    with EPDEngine(tiny_llava, placement="E:cpu,cpu,cpu P:cpu D:cpu", share_kv_arena=False, backend="torch",
                   device="cpu", kv_cache_tokens=4096) as epd:
        done = {}
        assert _run(epd, _requests(9), lambda: done.update(epd.switch_role("encode", 1, "prefill", weights="peer"))) \
            == reference["a"]
        assert done["weights"] == "copied from prefill0 over gloo"
        stages = epd.status()["stages"]
        assert stages["prefill1"]["weights"]["shared"] is False
        assert stages["prefill1"]["weights"]["bytes"] == stages["prefill0"]["weights"]["bytes"]
        assert epd.switch_role("encode", 2, "decode", weights="disk")["weights"] == "read from disk"
        assert _run(epd, _requests(9, 50)) == reference["b"]
        with pytest.raises(RequestError, match="weights = 'nccl'; use one of auto, map, peer, disk"):
            epd.switch_role("decode", 1, "prefill", weights="nccl")


def test_pd_mode_decode_to_prefill_maps_the_whole_model(tiny_llava: Path) -> None:
    """pd mode: the new prefill encodes images too, so it maps prefill0's whole model (tower and
    LM); outputs equal aggregated; encoders do not exist there, and a switch to one is refused."""
    sp = SamplingParams(max_tokens=12, ignore_eos=True)
    reqs = _requests(6, 300)
    expected = [o.token_ids for o in LLM(tiny_llava, backend="torch", device="cpu").generate(reqs, sp)]
    with EPDEngine(tiny_llava, placement="P:cpu D:cpu,cpu", mode="pd", backend="torch", device="cpu",
                   kv_cache_tokens=4096) as epd:
        assert epd.switch_role("decode", 1, "prefill")["weights"] == "mapped from prefill0"
        assert epd.status()["stages"]["prefill1"]["weights"]["parts"] == "all"
        assert [o.token_ids for o in epd.generate(reqs, sp)] == expected
        with pytest.raises(RequestError, match="pd mode has no encoders"):
            epd.switch_role("prefill", 1, "encode")


@pytest.mark.parametrize("where", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_draining_encoder_hands_its_work_over_while_the_prefill_is_blocked(tiny_llava: Path, where: str) -> None:
    """An encoder switched away while the prefill is blocked (decode's KV arena full: the prefill
    holds its prompts, the encoders' MM arenas are full of their embeddings, tasks wait for
    blocks) does not wait for those prefills: the tasks it has not started go to the other
    encoder (Unencoded), and the prefill copies the embeddings its queued prompts hold in that
    encoder's arena into its own MM blocks (EncoderDraining). The switch is over while prompts
    still wait; the greedy tokens equal the aggregated engine's, and no block stays used. On a GPU
    (the cuda backend, bf16) in batch-invariant mode, so that the batches' shapes cannot move a
    token."""
    if where == "cuda":
        pytest.importorskip("epd_kernels._epd_C")
        if not __import__("torch").cuda.is_available():
            pytest.skip("needs CUDA")
    sp = SamplingParams(max_tokens=40, ignore_eos=True)
    reqs = [Request(f"Describe picture {i}", images=[_png(300 + i)]) for i in range(40)]
    kw = ({"backend": "torch", "device": "cpu"} if where == "cpu" else
          {"backend": "cuda", "device": "cuda", "dtype": "bfloat16", "deterministic": True, "mm_cache_items": 0})
    expected = [o.token_ids for o in LLM(tiny_llava, **kw).generate(reqs, sp)]
    # 256 KV tokens per stage: decode holds 2 requests (92 tokens each), the prefill 4 more; 16 MM
    # blocks per encoder: of encode1's ~20 tasks some wait for blocks
    placement = "E:cpu,cpu P:cpu D:cpu" if where == "cpu" else "E:0,0 P:0 D:0"
    with EPDEngine(tiny_llava, placement=placement, share_kv_arena=False, kv_cache_tokens=256, max_model_len=128,
                   **kw) as epd:
        seqs = [epd.add_request(r, sp) for r in reqs]
        index = {s.seq_id: i for i, s in enumerate(seqs)}
        out: dict[int, object] = {}

        def take(events) -> None:
            for ev in events:
                assert ev.error is None, ev.error
                if ev.output is not None:
                    out[index[ev.index]] = ev.output

        def on_encode1() -> int:
            return sum(e == 1 for f in epd.flights.values() for e, _ in f.parts.values())

        deadline = time.monotonic() + 60
        while not (sum(f.prefill is not None for f in epd.flights.values()) >= 16 and on_encode1() and len(out) < 4):
            assert time.monotonic() < deadline, "the prefill never blocked with encoded prompts queued"
            take(epd.step(timeout_s=0.02))
        record = epd.switch_role("encode", 1, "decode")
        waiting = sum(f.prefill is not None for f in epd.flights.values())  # not prefilled yet
        assert waiting >= 2, f"the switch waited for the prefills ({waiting} prompts left)"
        assert record["to"] == "decode1" and record["drain_s"] < 10 and record["handed_over"] >= 1, record
        take(epd.late_events)
        epd.late_events.clear()
        while len(out) < len(reqs) and time.monotonic() < deadline + 60:
            take(epd.step(timeout_s=0.05))
        assert [out[i].token_ids for i in range(len(reqs))] == expected
        copied = [i for i in range(len(reqs)) if out[i].handoff.get("mm_bytes", 0) > 0]
        assert copied, "no prompt's embeddings were copied out of the draining encoder"
        stages = _idle_all(epd)
        assert stages["encode1"]["moved_to"] == "decode1"
        assert sum(h.load for h in epd.stages.values()) == 0


def test_a_prefill_that_starts_while_an_encoder_drains_is_told_of_it() -> None:
    """Overlapping switches: a prefill role that reaches its Peers after an encoder began to drain
    (start_switch told only the prefills that read arenas then) is told too, right after its Peers,
    so that it copies out that encoder's embeddings as the others do instead of holding its
    blocks (and the switch) while it waits for KV blocks."""
    from types import SimpleNamespace

    from engine import switching
    from engine.messages import EncoderDraining, Exported, Peers
    from engine.stage_handles import StageHandle

    class Inbox(list):
        put = list.append

    running = SimpleNamespace(is_alive=lambda: True)

    def handle(kind: str, index: int, **kw) -> StageHandle:
        return StageHandle(kind, index, "cpu", running, Inbox(), None, **kw)

    enc0, enc1 = handle("encode", 0, arena="mm0"), handle("encode", 1, arena="mm1", switching="decode1")
    old = handle("decode", 1, switching="prefill1")
    new = handle("prefill", 1, starting=True)
    stages = {h.name: h for h in (enc0, enc1, handle("prefill", 0, arena="kv0"), handle("decode", 0), old, new)}
    epd = SimpleNamespace(stages=stages, addresses={}, of_kind=lambda k: [h for h in stages.values() if h.kind == k])
    switching.advance(epd, new, Exported("prefill1", "kv1"))
    assert new.inbox == [Peers(["mm0", "mm1"]), EncoderDraining(1)], new.inbox
    assert enc0.inbox == [] and enc1.inbox == []
