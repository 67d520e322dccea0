"""Stages on different hosts (issue 18): placement host labels, and EPD whose stages share no memory
across a host boundary: image bytes travel in the tasks, embeddings and KV blocks over links
(ipc/linked_arena.py), never a mapped arena; role switches there (weights over a gloo PeerLink, arenas
mapped or linked per pair). Host labels without a cluster run on this machine, each label a host of
its own, so CI runs the cross-host path for real."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from engine import LLM
from engine.epd import EPDEngine
from engine.placement import Placement
from engine.request import RequestError
from engine.runner import kv_block_bytes
from tests.test_epd import SP, _requests


def test_placement_host_labels() -> None:
    p = Placement.parse("E:node0/0,node0/1 P:node1/0 D:node1/1", "epd")
    assert p.devices == {"encode": ("cuda:0", "cuda:1"), "prefill": ("cuda:0",), "decode": ("cuda:1",)}
    assert p.hosts_of("encode") == ("node0", "node0") and p.hosts_of("decode") == ("node1",)
    assert p.multi_host
    local = Placement.parse("E:0,0 P:0 D:0", "epd")
    assert not local.multi_host and local.hosts_of("prefill") == ("",) and local.shares_kv_device()
    assert not Placement.parse("E:a/cpu P:a/cpu D:b/cpu", "epd").shares_kv_device(), "no shared arena across hosts"
    assert Placement.parse("E:cpu P:b/cpu D:b/cpu", "epd").shares_kv_device()
    with pytest.raises(ValueError, match="host '1a' in '1a/0' must be a name like node0"):
        Placement.parse("E:1a/0 P:0 D:0", "epd")
    with pytest.raises(ValueError, match="neither a GPU index nor 'cpu'"):
        Placement.parse("E:a/gpu P:0 D:0", "epd")
    # with a cluster, only this host's GPUs are checked here (the nodes' are theirs)
    remote = Placement.parse("E:node0/3 P:1 D:node1/2", "epd")
    remote.check_devices(2, remote_hosts=True)
    with pytest.raises(ValueError, match="names GPU 3, but this machine has 2 CUDA devices"):
        remote.check_devices(2)
    with pytest.raises(ValueError, match="names GPU 1, but this machine has 1 CUDA device"):
        remote.check_devices(1, remote_hosts=True)


def _reference(tiny_llava: Path) -> list[list[int]]:
    return [o.token_ids for o in LLM(tiny_llava, backend="torch", device="cpu").generate(_requests(), SP)]


def _reported(engine: EPDEngine, stage: str, key: str, want, timeout_s: float = 20.0):
    """A stage's reported figure once it reaches `want` (reports are asynchronous), else its last."""
    deadline = time.monotonic() + timeout_s
    while (got := engine.status()["stages"][stage].get(key)) != want and time.monotonic() < deadline:
        engine.step(timeout_s=0.05)
    return got


def _exit_codes(engine: EPDEngine) -> dict[str, int | None]:
    return {name: proc.exitcode for name, proc in engine.procs.items()}


def test_encoder_on_another_host_matches_aggregated(tiny_llava: Path) -> None:
    """E on host a, P and D on host b: embeddings pulled over a link, KV shared on host b."""
    expected = _reference(tiny_llava)
    engine = EPDEngine(tiny_llava, placement="E:a/cpu P:b/cpu D:b/cpu", backend="torch", device="cpu")
    try:
        assert engine.image_bytes is None, "no shared memory with another host: image bytes go in the tasks"
        assert engine.stages["prefill0"].ready["mm_linked_from"] == [0]
        assert engine.stages["prefill0"].ready["mm_in_place_from"] == []
        outputs = engine.generate(_requests(), SP)
        assert [o.token_ids for o in outputs] == expected
        with_images = [o for o, r in zip(outputs, _requests()) if r.images]
        assert all(o.handoff["mm_bytes"] > 0 for o in with_images), "embeddings copied over the link"
        assert all(o.handoff["kv_bytes"] == 0 for o in outputs), "prefill and decode share host b's arena"
        served = sum(len(r.images) for r in _requests())  # one block per LLaVA-1.5 image
        assert _reported(engine, "encode0", "arena_served_blocks", served) == served
        with pytest.raises(RequestError, match="encode0 is the last live encode stage"):
            engine.switch_role("encode", 0, "prefill")
    finally:
        engine.shutdown()
    assert _exit_codes(engine) == dict.fromkeys(engine.procs, 0), "every stage exits cleanly, links closed"


def test_kv_and_embeddings_cross_hosts(tiny_llava: Path) -> None:
    """E here, P on host a, D on host b: both hand-offs over links; the same tokens."""
    expected = _reference(tiny_llava)
    engine = EPDEngine(tiny_llava, placement="E:cpu P:a/cpu D:b/cpu", backend="torch", device="cpu")
    try:
        assert engine.stages["decode0"].ready["kv_linked_from"] == [0]
        assert engine.stages["prefill0"].ready["mm_linked_from"] == [0]
        outputs = engine.generate(_requests(), SP)
        assert [o.token_ids for o in outputs] == expected
        assert all(o.handoff["kv_bytes"] > 0 for o in outputs), "KV pulled over the link"
        blocks = sum(o.handoff["kv_bytes"] for o in outputs) // kv_block_bytes(engine.config, engine.cfg)
        assert _reported(engine, "prefill0", "arena_served_blocks", blocks) == blocks > 0
    finally:
        engine.shutdown()
    assert _exit_codes(engine) == dict.fromkeys(engine.procs, 0)


def _served_some(engine: EPDEngine, stage: str, timeout_s: float = 20.0) -> int:
    """The blocks `stage` has served over links, once its reports say some (else 0)."""
    deadline = time.monotonic() + timeout_s
    while not (got := engine.status()["stages"][stage].get("arena_served_blocks", 0)) and time.monotonic() < deadline:
        engine.step(timeout_s=0.05)
    return got


def test_role_switches_on_a_host_of_several(tiny_llava: Path) -> None:
    """E:a/cpu,a/cpu P:b/cpu D:b/cpu (one encoder more than E:a/cpu P:b/cpu D:b/cpu, so that each
    kind keeps a live stage): encode1 becomes a prefill on host a, its LM copied from prefill0 on
    host b over gloo; it reads encode0 (host a) in place and decode0 (host b) pulls its KV over a
    link. Then back to an encoder on host a, mapping encode0's tower there; prefill0 reads it over
    a link, and decode0 has closed its link to prefill1's arena. Greedy tokens equal aggregated's
    at each step; every stage exits 0 (each link closed from its reading end)."""
    expected = _reference(tiny_llava) * 2
    requests = _requests() * 2  # enough for every instance to get some
    engine = EPDEngine(tiny_llava, placement="E:a/cpu,a/cpu P:b/cpu D:b/cpu", backend="torch", device="cpu",
                       kv_cache_tokens=4096, mm_cache=False)  # no cache: images go to the least-loaded encoder
    try:
        assert engine.stages["decode0"].ready["kv_arena_of"] == "prefill0", "P and D share host b's arena"
        record = engine.switch_role("encode", 1, "prefill")
        assert record["to"] == "prefill1" and record["weights"] == "copied from prefill0 on host b over gloo"
        prefill1 = engine.stages["prefill1"]
        assert prefill1.host == "a" and prefill1.ready["mm_in_place_from"] == [0]
        assert prefill1.ready["mm_linked_from"] == [] and prefill1.ready["weights"]["shared"] is False
        outputs = engine.generate(requests, SP)
        assert [o.token_ids for o in outputs] == expected
        # prefill0's KV is read in place (one arena with decode0); prefill1's pulled over the link
        blocks = sum(o.handoff["kv_bytes"] for o in outputs) // kv_block_bytes(engine.config, engine.cfg)
        assert _reported(engine, "prefill1", "arena_served_blocks", blocks) == blocks > 0
        back = engine.switch_role("prefill", 1, "encode")
        assert back["to"] == "encode2" and back["weights"] == "mapped from encode0"
        assert engine.stages["encode2"].host == "a" and engine.status()["stages"]["encode2"]["weights"]["shared"]
        outputs = engine.generate(requests, SP)
        assert [o.token_ids for o in outputs] == expected
        assert all(o.handoff["kv_bytes"] == 0 for o in outputs), "prefill0 alone: KV in place"
        assert _served_some(engine, "encode2") > 0, "prefill0 read encode2 over a link"
        assert [s["from"] + ">" + s["to"] for s in engine.status()["switches"]] == ["encode1>prefill1",
                                                                                    "prefill1>encode2"]
    finally:
        engine.shutdown()
    assert _exit_codes(engine) == dict.fromkeys(engine.procs, 0), "every stage exits cleanly, links closed"


def test_role_switches_with_encoders_on_two_hosts(tiny_llava: Path) -> None:
    """E:a/cpu,b/cpu P:b/cpu D:b/cpu,a/cpu: encode0 (host a) becomes a prefill there (LM copied
    from prefill0 over gloo), linked to encode1 on host b; decode0 (b) pulls its KV over a link,
    decode1 (a) maps it. Then that prefill becomes an encoder again (no packed tower anywhere: read
    from disk), read by prefill0 over a link. A decode whose requests would move to a decode on
    another host is refused, naming why. Tokens equal aggregated's; every stage exits 0."""
    expected = _reference(tiny_llava) * 2
    requests = _requests() * 2
    engine = EPDEngine(tiny_llava, placement="E:a/cpu,b/cpu P:b/cpu D:b/cpu,a/cpu", backend="torch", device="cpu",
                       kv_cache_tokens=4096, mm_cache=False)
    try:
        record = engine.switch_role("encode", 0, "prefill")
        assert record["to"] == "prefill1" and record["weights"] == "copied from prefill0 on host b over gloo"
        assert engine.stages["prefill1"].ready["mm_linked_from"] == [1]  # encode0 is gone: encode1, over a link
        assert engine.stages["prefill1"].ready["mm_in_place_from"] == []
        outputs = engine.generate(requests, SP)
        assert [o.token_ids for o in outputs] == expected
        assert _served_some(engine, "encode1") > 0, "prefill1 read encode1 over a link"
        with pytest.raises(RequestError, match="decode1 would hand its running requests over to decode0 on another "
                                               "host, which cannot map its KV arena"):
            engine.switch_role("decode", 1, "prefill")
        back = engine.switch_role("prefill", 1, "encode")
        assert back["to"] == "encode2" and back["weights"] == "read from disk"
        with pytest.raises(RequestError, match="weights='map', but no live stage on a/cpu holds packed lm weights"):
            engine.switch_role("encode", 2, "prefill", weights="map")
        outputs = engine.generate(requests, SP)
        assert [o.token_ids for o in outputs] == expected
        assert _served_some(engine, "encode2") > 0, "prefill0 read encode2 over a link"
        assert [s["weights"] for s in engine.status()["switches"]] == ["copied from prefill0 on host b over gloo",
                                                                       "read from disk"]
    finally:
        engine.shutdown()
    assert _exit_codes(engine) == dict.fromkeys(engine.procs, 0), "every stage exits cleanly, links closed"


def test_dynamic_across_hosts_starts(tiny_llava: Path) -> None:
    """dynamic=True with stages on several hosts: the allocator runs (a switch it decides is built
    as above); with one stage of each kind every switch it may try is refused, and outputs are
    aggregated's."""
    expected = _reference(tiny_llava)
    engine = EPDEngine(tiny_llava, placement="E:a/cpu P:b/cpu D:b/cpu", backend="torch", device="cpu", dynamic=True)
    try:
        assert "allocator" in engine.status()
        assert [o.token_ids for o in engine.generate(_requests(), SP)] == expected
    finally:
        engine.shutdown()
    assert _exit_codes(engine) == dict.fromkeys(engine.procs, 0)


def test_a_stage_of_the_orchestrators_host_listens_here() -> None:
    """link_address for a stage of the orchestrator's own host (""), with or without a cluster:
    its address, a port free on this machine (no cluster task is asked; "" names no node)."""
    from engine.stage_handles import link_address

    address, port = link_address("", {"": "10.1.2.3", "node1": "10.1.2.4"})
    assert address == "10.1.2.3" and 0 < port < 65536
    assert link_address("a", {})[0] == "127.0.0.1", "a host label without a cluster: this machine"
