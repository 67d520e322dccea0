"""The load estimator, the allocator's policy, and dynamic EPD end to end (engine/estimator.py,
engine/allocator.py, engine/dynamic.py)."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine import LLM, Request, SamplingParams
from engine.allocator import Allocator, AllocatorPolicy
from engine.epd import EPDEngine
from engine.estimator import LoadEstimator

KINDS = {"encode0": "encode", "prefill0": "prefill", "decode0": "decode"}


def test_estimator_on_a_scripted_load() -> None:
    """An encoder fed 1 task (4 items) every 0.5 s that takes 0.2 s: arrival 2/s, utilization
    0.4, 0.05 s per item; a backlog of 10 items then predicts a 0.5 s wait."""
    est = LoadEstimator(tau_s=2.0)
    t = 0.0
    for i in range(40):
        est.sent("encode0", i, 4, t)
        est.done("encode0", i, t + 0.2)
        t += 0.5
    s = est.snapshot(t - 0.25, KINDS)["stages"]["encode0"]  # mid-period: decayed sums swing with the phase
    assert s["arrival_rate"] == pytest.approx(2.0, rel=0.15)
    assert s["utilization"] == pytest.approx(0.4, rel=0.15)
    assert s["s_per_unit"] == pytest.approx(0.05, rel=0.01)
    assert s["queued_units"] == 0 and s["predicted_wait_s"] == 0
    est.sent("encode0", 100, 6, t)
    est.sent("encode0", 101, 4, t)
    s = est.snapshot(t + 0.1, KINDS)
    assert s["stages"]["encode0"]["queued_requests"] == 2
    assert s["kinds"]["encode"]["predicted_wait_s"] == pytest.approx(0.5, rel=0.05)
    est.done("encode0", 999, t)  # never sent: ignored
    assert est.snapshot(t + 0.1, KINDS)["stages"]["encode0"]["queued_units"] == 10
    # a batch answering eight tasks at once is counted right: 8 x 2 items in 0.4 s of work
    est2 = LoadEstimator(tau_s=2.0)
    for r in range(8):
        est2.sent("encode0", r, 2, 0.0)
    for r in range(8):
        est2.done("encode0", r, 0.4)
    assert est2.snapshot(0.4, KINDS)["stages"]["encode0"]["s_per_unit"] == pytest.approx(0.025)
    # decode: steps every 20 ms over 5 requests
    for r in range(5):
        est.sent("decode0", r, 0, 0.0)
    for k in range(50):
        est.steps("decode0", 5, 0.02 * k)
    d = est.snapshot(1.0, KINDS)["stages"]["decode0"]
    assert d["running"] == 5 and d["step_s"] == pytest.approx(0.02)
    assert d["tokens_per_s"] == pytest.approx(250, rel=0.01)
    with pytest.raises(ValueError, match="tau_s"):
        LoadEstimator(0)


def _snapshot(encode: float, prefill: float, decode_step: float, n: dict[str, int] | None = None) -> dict:
    """Kind totals as the estimator gives them: encode and prefill utilizations, decode step."""
    n = {"encode": 2, "prefill": 2, "decode": 1, **(n or {})}
    kinds = {"encode": {"instances": n["encode"], "utilization": encode, "predicted_wait_s": 0.0},
             "prefill": {"instances": n["prefill"], "utilization": prefill, "predicted_wait_s": 0.0},
             "decode": {"instances": n["decode"], "utilization": 0.5, "running": 1, "step_s": decode_step}}
    stages = {f"{k}{i}": {"kind": k, "queued_units": i, "running": 0} for k in kinds for i in range(n[k])}
    return {"kinds": kinds, "stages": stages}


def test_the_allocator_moves_a_cool_instance_to_a_hot_kind_after_confirmation() -> None:
    a = Allocator(AllocatorPolicy(interval_s=1.0, confirm=2))
    hot = _snapshot(encode=0.95, prefill=0.2, decode_step=0.01)
    assert a.evaluate(hot, 0.0) is None  # once is not enough
    assert a.evaluate(hot, 0.5) is None  # between intervals
    d = a.evaluate(hot, 1.0)
    assert d is not None and (d.from_kind, d.to_kind, d.stage) == ("prefill", "encode", "prefill0")
    assert "encode pressure 0.95" in d.reason and d.pressures["encode"] == 0.95
    # a donor whose pressure after losing one instance would pass `low` gives nothing
    b = Allocator(AllocatorPolicy(confirm=1))
    assert b.evaluate(_snapshot(encode=0.95, prefill=0.3, decode_step=0.01), 0.0) is None  # 0.3 x 2 > 0.5
    # nor one with a single instance; decode's pressure is its step against the TPOT SLO
    c = Allocator(AllocatorPolicy(confirm=1, slo_tpot_s=0.04))
    d = c.evaluate(_snapshot(encode=0.1, prefill=0.1, decode_step=0.039, n={"prefill": 1}), 0.0)
    assert d is not None and (d.from_kind, d.to_kind) == ("encode", "decode")
    # below `high` nothing moves
    assert Allocator(AllocatorPolicy(confirm=1)).evaluate(_snapshot(0.7, 0.1, 0.01), 0.0) is None


def test_the_allocator_skips_a_pinned_instance() -> None:
    """A donor instance that cannot change role (EPDEngine.load marks it "pinned": others map
    its weights) is not picked; the other one is, at once; with every instance pinned, nothing."""
    hot = _snapshot(encode=0.95, prefill=0.2, decode_step=0.01)
    hot["stages"]["prefill0"]["pinned"] = "prefill0's weights are mapped by prefill1; switch those first"
    d = Allocator(AllocatorPolicy(confirm=1)).evaluate(hot, 0.0)
    assert d is not None and d.stage == "prefill1"  # prefill0 has less queued work, but is pinned
    hot["stages"]["prefill1"]["pinned"] = "its KV arena is shared with a decode stage"
    assert Allocator(AllocatorPolicy(confirm=1)).evaluate(hot, 0.0) is None


def test_the_allocator_does_not_flap_on_an_oscillating_load() -> None:
    """Load that swaps between encode-heavy and prefill-heavy every 3 s for 60 s: the cooldown
    (10 x the switch's cost, 5 s at least), the dwell and the reverse delay allow few switches,
    and never the reverse of the last within reverse_after_s."""
    policy = AllocatorPolicy(interval_s=0.5, confirm=2, min_cooldown_s=5.0, cost_factor=10.0, min_dwell_s=10.0,
                             reverse_after_s=30.0)
    a = Allocator(policy)
    switches = []
    n = {"encode": 2, "prefill": 2}
    t = 0.0
    while t < 60.0:
        heavy = "encode" if int(t // 3) % 2 == 0 else "prefill"
        snap = _snapshot(encode=0.95 if heavy == "encode" else 0.1, prefill=0.95 if heavy == "prefill" else 0.1,
                         decode_step=0.01, n=n)
        d = a.evaluate(snap, t)
        if d is not None:
            switches.append((t, d.from_kind, d.to_kind))
            n[d.from_kind] -= 1
            n[d.to_kind] += 1
            a.switched(d, 0.4, t)
        t += 0.25
    assert 1 <= len(switches) <= 3, switches
    for (t0, f0, to0), (t1, f1, to1) in zip(switches, switches[1:]):
        assert t1 - t0 >= 5.0
        if (f1, to1) == (to0, f0):
            assert t1 - t0 >= 30.0, switches


def test_a_slow_switch_lengthens_the_cooldown() -> None:
    a = Allocator(AllocatorPolicy(confirm=1, interval_s=0.1, min_cooldown_s=1.0, cost_factor=10.0))
    hot = _snapshot(encode=0.95, prefill=0.1, decode_step=0.01, n={"prefill": 4})
    d = a.evaluate(hot, 0.0)
    a.switched(d, 3.0, 0.0)  # it took 3 s: 30 s of cooldown
    assert a.evaluate(hot, 29.0) is None
    assert a.evaluate(hot, 30.5) is not None


TRACE_KINDS = {"encode0": "encode", "encode1": "encode", "prefill0": "prefill", "prefill1": "prefill",
               "decode0": "decode"}


def _decode_trace(policy: AllocatorPolicy, phases: list[tuple[float, float, int]], seed: int,
                  step_s: float = 0.010, per_request_s: float = 0.00025) -> list[tuple[float, str, str]]:
    """A synthetic estimator trace: Poisson arrivals at one decode, phases of (seconds, req/s, tokens
    each), whose step takes step_s + per_request_s x running (the CPU's: 25 ms at ~60 running); the
    encoders and prefills idle. The allocator evaluates after every step; its decisions (a decision
    is not carried out: the first is what counts)."""
    rng = np.random.default_rng(seed)
    arrivals, end = [], 0.0
    for seconds, rate, tokens in phases:
        t = end
        while (t := t + rng.exponential(1 / rate)) < end + seconds:
            arrivals.append((t, tokens))
        end += seconds
    est, alloc = LoadEstimator(2.0), Allocator(policy)
    left: dict[int, int] = {}
    t, i, decisions = 0.0, 0, []
    while t < end:
        while i < len(arrivals) and arrivals[i][0] <= t:
            est.sent("decode0", i, 0, arrivals[i][0])
            left[i] = arrivals[i][1]
            i += 1
        if not left:
            t = arrivals[i][0] if i < len(arrivals) else end
        else:
            t += step_s + per_request_s * len(left)
            est.steps("decode0", len(left), t)
            for r in list(left):
                left[r] -= 1
                if left[r] == 0:
                    del left[r]
                    est.done("decode0", r, t)
        d = alloc.evaluate(est.snapshot(t, TRACE_KINDS), t)
        if d is not None:
            decisions.append((t, d.from_kind, d.to_kind))
            alloc.switched(d, 0.1, t)
    return decisions


def test_the_allocator_sees_a_decode_heavy_phase_coming() -> None:
    """The CPU's shifting workload as a synthetic trace: 20 s of short answers (10 req/s, 2 tokens),
    then 18 req/s of 128 tokens, where decode settles at ~0.95 of the TPOT SLO. Judged by its step
    alone, decode's pressure passes `high` late on some seeds (9-10 s into the phase: the step's
    EWMA creeps up as the batch fills); with arrivals beyond departures counted lookahead_s ahead
    it is seen within ~5 s on every seed. A steady load at ~0.6 of the SLO, from idle, moves
    nothing in 60 s (the growth of its first seconds is not taken for more)."""
    shift = [(20.0, 10.0, 2), (30.0, 18.0, 128)]
    lags = {}
    for name, policy in (("ahead", AllocatorPolicy(slo_tpot_s=0.025)),
                         ("now", AllocatorPolicy(slo_tpot_s=0.025, lookahead_s=0.0))):
        first = [_decode_trace(policy, shift, seed)[0] for seed in range(8)]
        assert all(to == "decode" and t > 20.0 for t, _, to in first), first
        lags[name] = [t - 20.0 for t, _, _ in first]
    assert max(lags["ahead"]) < 5.5 and max(lags["now"]) > 8.0, lags
    assert all(a <= n + 1e-9 for a, n in zip(lags["ahead"], lags["now"])), lags
    for seed in range(8):
        assert _decode_trace(AllocatorPolicy(slo_tpot_s=0.025), [(60.0, 10.0, 128)], seed) == []
        assert _decode_trace(AllocatorPolicy(slo_tpot_s=0.025), [(60.0, 10.0, 2)], seed) == []


def test_decode_figures_for_the_lookahead() -> None:
    """departure_rate counts answered requests; step_slope_s is the step's growth per request from
    (batch, step) pairs; an idle spell between requests is not taken for a step."""
    est = LoadEstimator(tau_s=2.0)
    t, req = 0.0, 0
    for batch in (4, 8, 12, 16) * 10:  # steps of 10 ms + 1 ms per request (none answered yet: req running)
        while req < batch:
            est.sent("decode0", req, 0, t)
            req += 1
        t += 0.010 + 0.001 * batch
        est.steps("decode0", batch, t)
    d = est.snapshot(t, KINDS)["stages"]["decode0"]
    assert d["step_slope_s"] == pytest.approx(0.001, rel=0.01)
    assert d["departure_rate"] == 0.0
    for r in range(req):
        est.done("decode0", r, t)
    assert est.snapshot(t, KINDS)["kinds"]["decode"]["departure_rate"] == pytest.approx(req / 2.0, rel=0.01)
    # one short request at a time, 1 s apart, each 2 steps of 5 ms: the step stays 5 ms
    idle = LoadEstimator(tau_s=2.0)
    for r in range(10):
        idle.sent("decode0", r, 0, r * 1.0)
        idle.steps("decode0", 1, r * 1.0 + 0.005)
        idle.steps("decode0", 1, r * 1.0 + 0.010)
        idle.done("decode0", r, r * 1.0 + 0.010)
    s = idle.snapshot(10.0, KINDS)["stages"]["decode0"]
    assert s["step_s"] == pytest.approx(0.005) and s["step_slope_s"] is None


def test_policy_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="low"):
        AllocatorPolicy(low=0.9, high=0.8)
    with pytest.raises(ValueError, match="slo_ttft_s"):
        AllocatorPolicy(slo_ttft_s=0)
    with pytest.raises(ValueError, match="lookahead_s"):
        AllocatorPolicy(lookahead_s=-1)
    with pytest.raises(ValueError, match="growth"):
        AllocatorPolicy(growth=-0.1)


def _png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (200 + seed % 7, 240, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_dynamic_epd_moves_a_prefill_to_encode_under_image_load(tiny_llava: Path) -> None:
    """One encoder, two prefills, requests of 4 images each: the encoder is the bottleneck, a
    prefill switches to encode (logged with its reason), outputs equal the aggregated engine's."""
    requests = [Request("Look: <image> <image> <image> <image>", images=[_png(4 * i + k) for k in range(4)])
                for i in range(24)]
    sp = SamplingParams(max_tokens=4, ignore_eos=True)
    reference = [o.token_ids for o in LLM(tiny_llava, backend="torch", device="cpu").generate(requests, sp)]
    policy = AllocatorPolicy(slo_ttft_s=0.3, interval_s=0.1, confirm=2, min_cooldown_s=0.5, min_dwell_s=1.0)
    with EPDEngine(tiny_llava, placement="E:cpu P:cpu,cpu D:cpu", backend="torch", device="cpu",
                   max_images_per_batch=2, mm_cache=False, dynamic=policy) as epd:
        for _ in range(6):  # load in waves until the allocator has switched one (bounded)
            outputs = epd.generate(requests, sp)
            assert [o.token_ids for o in outputs] == reference
            deadline = time.monotonic() + 30  # a switch it started completes on later steps
            while epd.status()["allocator"]["switching_to"] and time.monotonic() < deadline:
                epd.step(0.05)
            if any("new_stage" in d for d in epd.status()["allocator"]["decisions"]):
                break
        status = epd.status()
        done = [d for d in status["allocator"]["decisions"] if "new_stage" in d]
        assert done, status["allocator"]
        d = done[0]
        assert (d["from"], d["to"]) == ("prefill", "encode") and "encode pressure" in d["reason"]
        assert d["seconds"] > 0 and d["new_stage"].startswith("encode") and d["new_stage"] in status["stages"]
        assert any("refused" in x for x in status["allocator"]["decisions"]) or d["stage"] == "prefill1"
        assert status["load"]["kinds"]["encode"]["instances"] == 2
        assert [o.token_ids for o in epd.generate(requests, sp)] == reference  # and after it
        deadline = time.monotonic() + 20
        while epd.status()["requests_in_flight"] and time.monotonic() < deadline:
            epd.step(0.05)


def test_metrics_show_the_estimator_per_stage() -> None:
    pytest.importorskip("prometheus_client")
    from ipc.http_metrics import HTTPMetrics

    est = LoadEstimator()
    est.sent("encode0", 1, 3, 0.0)
    est.sent("decode0", 1, 0, 0.0)
    est.steps("decode0", 1, 0.0)
    est.steps("decode0", 1, 0.025)
    status = {"mode": "epd", "stages": {}, "switches": [{"from": "encode1", "to": "prefill1"}],
              "load": est.snapshot(0.05, KINDS)}
    text = HTTPMetrics().render(status, admitted=0, up=True).decode()
    assert 'epd_stage_load{figure="queued_units",stage="encode0"} 3.0' in text
    assert 'epd_stage_load{figure="step_s",stage="decode0"} 0.025' in text
    assert "epd_role_switches 1.0" in text


def test_bench_dynamic_runs_static_and_dynamic(tiny_llava: Path, capsys: pytest.CaptureFixture) -> None:
    from scripts import bench_dynamic

    with pytest.raises(SystemExit) as done:
        bench_dynamic.main(["--model", str(tiny_llava), "--backend", "torch", "--placement", "E:cpu,cpu P:cpu D:cpu",
                            "--requests", "6", "--short", "2", "--short-tokens", "3", "--long-tokens", "8",
                            "--image-size", "64", "--interval", "0.1", "--cooldown", "0.5", "--dwell", "1"])
    out = capsys.readouterr().out
    assert done.value.code == 0, out
    assert "| static | 6/6 |" in out and "| dynamic | 6/6 |" in out


def test_a_prefill_queue_behind_full_decode_slots_calls_for_decode() -> None:
    """Decode's 64 slots are taken and prefill's queue (the requests decode has no slot for) is
    long: the instance goes to decode, not to prefill."""
    snap = _snapshot(encode=0.05, prefill=0.3, decode_step=0.01, n={"encode": 2, "prefill": 1})
    snap["kinds"]["prefill"]["predicted_wait_s"] = 5.0
    snap["kinds"]["decode"]["running"] = 64
    a = Allocator(AllocatorPolicy(confirm=1, max_num_seqs=64))
    pressures = a.pressures(snap)
    assert pressures["decode"] > 5 and pressures["prefill"] == 0.0
    d = a.evaluate(snap, 0.0)
    assert d is not None and (d.from_kind, d.to_kind) == ("encode", "decode")
    snap["kinds"]["decode"]["running"] = 10  # slots free: the prefill queue is prefill's own
    d = Allocator(AllocatorPolicy(confirm=1, max_num_seqs=64)).evaluate(snap, 0.0)
    assert d is not None and (d.from_kind, d.to_kind) == ("encode", "prefill")


def test_a_full_prefill_kv_arena_calls_for_decode_and_is_shown() -> None:
    """The estimator shows each stage's KV use from its block report; a prefill whose arena is
    full (the KV of requests waiting for decode) makes its queue decode's pressure."""
    est = LoadEstimator()
    est.sent("prefill0", 1, 600, 0.0)
    snap = est.snapshot(0.1, {"prefill0": "prefill", "decode0": "decode"},
                        {"prefill0": {"kv_blocks": {"used": 250, "total": 256}, "mm_blocks": {"used": 1, "total": 4}},
                         "decode0": {"kv_blocks": None}})
    assert snap["stages"]["prefill0"]["kv_used"] == pytest.approx(0.977) and snap["kinds"]["prefill"]["kv_full"]
    assert "kv_used" not in snap["stages"]["decode0"] and not snap["kinds"]["decode"]["kv_full"]
    assert snap["stages"]["prefill0"]["mm_used"] == 0.25 and not snap["kinds"]["prefill"]["mm_full"]
    s = _snapshot(encode=0.05, prefill=0.3, decode_step=0.01, n={"encode": 2, "prefill": 1})
    s["kinds"]["prefill"]["predicted_wait_s"] = 5.0
    s["kinds"]["prefill"]["kv_full"] = True
    d = Allocator(AllocatorPolicy(confirm=1)).evaluate(s, 0.0)
    assert d is not None and (d.from_kind, d.to_kind) == ("encode", "decode")


def test_encoders_waiting_on_a_blocked_prefill_are_a_donor() -> None:
    """The seed's offline case on the CPU: the prefill's KV arena is full (decode has no room for
    its requests) and the encoders' MM arenas are full of embeddings it has not read, so they look
    busy. Their pressure is then decode's, and an encoder goes to decode at once, instead of ~60 s
    later when they drain; with the prefill not blocked, a full MM arena changes nothing."""
    s = _snapshot(encode=1.0, prefill=0.3, decode_step=0.01, n={"encode": 2, "prefill": 1})
    s["kinds"]["encode"]["predicted_wait_s"] = 12.0
    s["kinds"]["encode"]["mm_full"] = True
    s["kinds"]["prefill"]["predicted_wait_s"] = 5.0
    s["kinds"]["prefill"]["kv_full"] = True
    a = Allocator(AllocatorPolicy(confirm=1))
    pressures = a.pressures(s)
    assert pressures["encode"] == 0.0 and pressures["prefill"] == 0.0 and pressures["decode"] > 20
    d = a.evaluate(s, 0.0)
    assert d is not None and (d.from_kind, d.to_kind) == ("encode", "decode") and d.stage == "encode0"
    s["kinds"]["prefill"]["kv_full"] = False  # the prefill takes requests: the encoders are really busy
    s["kinds"]["prefill"]["predicted_wait_s"] = 0.0
    assert Allocator(AllocatorPolicy(confirm=1)).pressures(s)["encode"] > 20
    s["kinds"]["prefill"]["kv_full"], s["kinds"]["encode"]["mm_full"] = True, False  # encoders not full
    assert Allocator(AllocatorPolicy(confirm=1)).pressures(s)["encode"] > 20
