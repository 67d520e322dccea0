"""engine/simulator/ and scripts/simulate.py on synthetic cost models: queueing theory (M/D/1
waits), the cost model's interpolation, processor sharing, workloads and arrivals (bench_serve's),
batching caps, the placement search, the CLI and --compare."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest

from engine.simulator.cost_model import CostModel, interpolate
from engine.simulator.events import EventLoop, ProcessorSharing, Unshared
from engine.simulator.search import SearchSettings, enumerate_placements, search
from engine.simulator.sim import SimConfig, Simulation, make_requests, parse_devices, simulate
from engine.simulator.workload import Phase, arrival_offsets, format_phases, parse_phases, phase_arrivals
from scripts import bench_serve
from scripts import simulate as simulate_cli

ROOT = Path(__file__).resolve().parents[1]


def costs_dict(**tables) -> dict:
    """A synthetic cost model: fast everything, overridable per table."""
    d = {"version": 1, "device": "synthetic", "model": "none", "backend": "cuda", "dtype": "bfloat16",
         "block_size": 16, "image_tokens": 576,
         "preprocess": {"1920x1080": [[1, 0.004], [8, 0.016], [32, 0.04]], "336x336": [[1, 0.001], [32, 0.008]]},
         "tower": [[1, 0.004], [8, 0.012], [32, 0.04]],
         "prefill": [[64, 0.01], [640, 0.03], [8192, 0.3]],
         "decode": [[1, 640, 0.004], [1, 4096, 0.006], [64, 640, 0.008], [64, 4096, 0.016]],
         "handoff": {"fixed_s": 0.0005, "mm_item_s": 0.0002, "kv_token_s": 1e-6}}
    return d | tables


# ---------------------------------------------------------------- (a) queueing theory


@pytest.mark.parametrize("rho", [0.5, 0.8])
def test_md1_wait_matches_pollaczek_khinchine(rho: float) -> None:
    """One prefill serving text-only one-token requests one at a time (max_num_seqs 1) in a fixed
    S: an M/D/1 queue. Mean wait (TTFT - S) = rho S / (2 (1 - rho)); M/M/1's would be twice that."""
    service = 0.01
    costs = CostModel.from_dict(costs_dict(prefill=[[1, service], [10**6, service]]))
    n = 40_000
    reqs = make_requests([Phase(n, rho / service, images=0, max_tokens=1)], costs, seed=0)
    Simulation(costs, "pd", "P:0 D:0", SimConfig(max_num_seqs=1)).run(reqs)
    wait = sum(r.first_token - r.arrival - service for r in reqs) / n
    expected = rho * service / (2 * (1 - rho))
    assert wait == pytest.approx(expected, rel=0.04)


# ---------------------------------------------------------------- (b) cost model


def test_interpolation_and_extrapolation() -> None:
    xs, ys = [1.0, 8.0, 32.0], [0.004, 0.012, 0.04]
    assert interpolate(xs, ys, 8) == pytest.approx(0.012)
    assert interpolate(xs, ys, 4.5) == pytest.approx(0.008)  # halfway between 1 and 8
    assert interpolate(xs, ys, 64) == pytest.approx(0.04 + 32 * (0.028 / 24))  # the last segment goes on
    assert interpolate([10.0, 20.0], [1.0, 3.0], 0.0) == 0.0  # extrapolated below 0: clamped
    assert interpolate([10.0, 20.0], [1.0, 3.0], 5.0) == pytest.approx(0.0)
    assert interpolate([5.0], [0.3], 100) == 0.3
    c = CostModel.from_dict(costs_dict())
    assert c.tower_s(8) == pytest.approx(0.012) and c.tower_s(0) == 0.0
    assert c.prefill_s(352) == pytest.approx(0.02) and c.prefill_s(0) == 0.0
    assert c.handoff_s(2, 1000) == pytest.approx(0.0005 + 0.0004 + 0.001)


def test_decode_bilinear_and_preprocess_scaling() -> None:
    c = CostModel.from_dict(costs_dict())
    assert c.decode_s(1, 640) == pytest.approx(0.004) and c.decode_s(64, 4096) == pytest.approx(0.016)
    mid_b, mid_c = (1 + 64) / 2, (640 + 4096) / 2
    assert c.decode_s(mid_b, mid_c) == pytest.approx((0.004 + 0.006 + 0.008 + 0.016) / 4)
    assert c.decode_s(128, 640) == pytest.approx(0.008 + 0.004 * 64 / 63)  # past the grid: linear
    assert c.decode_s(0, 640) == 0.0
    assert c.preprocess_s((1920, 1080), 8) == pytest.approx(0.016)
    # 1280x720 was not measured: 1920x1080 is nearest by pixels; scaled by the pixel ratio 4/9
    assert c.preprocess_s((1280, 720), 8) == pytest.approx(0.016 * 4 / 9)
    assert c.preprocess_s((448, 448), 1) == pytest.approx(0.001 * 448**2 / 336**2)  # nearest: 336x336
    assert c.preprocess_s((336, 336), 0) == 0.0


def test_cost_model_file_round_trip_errors_and_residuals(tmp_path: Path) -> None:
    path = tmp_path / "costs.json"
    path.write_text(json.dumps(costs_dict()))
    c = CostModel.load(path)
    assert CostModel.from_dict(c.to_dict()) == c and c.meta["device"] == "synthetic"
    for bad, match in [({"version": 2}, "version"), ({"tower": []}, "tower"), ({"tower": [[1, -1.0]]}, "tower"),
                       ({"decode": [[1, 2]]}, "decode"), ({"preprocess": {"big": [[1, 1]]}}, "big"),
                       ({"handoff": {"fixed": 1}}, "handoff"), ({"prefill": [[1, 1], [1, 2]]}, "twice")]:
        with pytest.raises(ValueError, match=match):
            CostModel.from_dict(costs_dict(**bad))
    with pytest.raises(ValueError, match="missing 'handoff'"):
        CostModel.from_dict({k: v for k, v in costs_dict().items() if k != "handoff"})
    linear = CostModel.from_dict(costs_dict(prefill=[[0, 0.0], [100, 1.0], [200, 2.0], [400, 4.0]]))
    assert linear.residuals()["prefill"] == pytest.approx(0.0, abs=1e-12)
    assert c.residuals()["tower"] > 0.0  # tower is not linear through its middle point


# ---------------------------------------------------------------- (c) processor sharing


def _finish_times(sharing: type, jobs: list[tuple[float, float]]) -> list[float]:
    """Submit (at, seconds) jobs to one GPU; when each finished."""
    loop = EventLoop()
    gpu = sharing(loop)
    done = [math.nan] * len(jobs)
    for i, (at, seconds) in enumerate(jobs):
        loop.at(at, lambda i=i, s=seconds: gpu.submit(s, lambda: done.__setitem__(i, loop.now)))
    loop.run()
    return done


def test_processor_sharing() -> None:
    assert _finish_times(ProcessorSharing, [(0, 1.0), (0, 1.0)]) == pytest.approx([2.0, 2.0])
    assert _finish_times(ProcessorSharing, [(0, 1.0), (0, 3.0)]) == pytest.approx([2.0, 4.0])
    # 2 s from 0; 0.5 s from 1: B takes 1 s at half speed, A has 1 - 0.5 left at 2
    assert _finish_times(ProcessorSharing, [(0, 2.0), (1, 0.5)]) == pytest.approx([2.5, 2.0])
    assert _finish_times(ProcessorSharing, [(0, 1.0), (5, 1.0)]) == pytest.approx([1.0, 6.0])
    assert _finish_times(Unshared, [(0, 1.0), (0, 1.0)]) == pytest.approx([1.0, 1.0])
    # a two-core CPU (each job one thread): two jobs at full speed, a third shares: 3 jobs of 1 s
    # each at 2/3 speed end at 1.5. 1 s from 0, then 2 s and 1 s from 0.5: three share two cores
    # until the first ends (0.5 + 0.5 x 1.5 = 1.25), the other two have 1.5 and 0.5 left at full speed
    two_cores = partial(ProcessorSharing, servers=2)
    assert _finish_times(two_cores, [(0, 1.0), (0, 1.0)]) == pytest.approx([1.0, 1.0])
    assert _finish_times(two_cores, [(0, 1.0), (0, 1.0), (0, 1.0)]) == pytest.approx([1.5, 1.5, 1.5])
    assert _finish_times(two_cores, [(0, 1.0), (0.5, 2.0), (0.5, 1.0)]) == pytest.approx([1.25, 2.75, 1.75])


def test_two_instances_on_one_gpu_take_twice_as_long() -> None:
    service = 0.1
    costs = CostModel.from_dict(costs_dict(prefill=[[1, service], [10**6, service]]))
    both = [Phase(2, math.inf, images=0, max_tokens=1)]  # two at once: one to each prefill (least loaded)

    def ttfts(placement: str, sharing: type = ProcessorSharing) -> list[float]:
        return [r["ttft_s"] for r in simulate(costs, "pd", placement, both, sharing=sharing).records]

    assert ttfts("P:0,0 D:1") == pytest.approx([2 * service] * 2)
    assert ttfts("P:0,1 D:2") == pytest.approx([service] * 2)
    assert ttfts("P:0,0 D:1", Unshared) == pytest.approx([service] * 2)


# ---------------------------------------------------------------- (d) workloads and arrivals


def test_arrival_offsets_are_bench_serves() -> None:
    assert bench_serve.arrival_offsets is arrival_offsets  # one formula
    # values of bench_serve's formula before it moved here (numpy gamma, seed masked to 32 bits)
    assert arrival_offsets(5, 2.0, 1.0, 0) == pytest.approx(
        [0.0, 0.3399659519844548, 0.8497645027173871, 0.8596678340119148, 0.8608024973525289], rel=1e-12)
    assert arrival_offsets(4, 8.0, 0.5, 7) == pytest.approx(
        [0.0, 0.10367380612898108, 0.30652492704847645, 0.3290498766978282], rel=1e-12)
    assert arrival_offsets(3, 1.0, 4.0, 2**33 + 5) == pytest.approx([0.0, 0.5838686456250227, 1.3867074499998646],
                                                                  rel=1e-12)
    assert arrival_offsets(3, math.inf) == [0.0] * 3


def test_parse_phases_and_arrivals() -> None:
    text = "requests=3,rate=8,images=2,size=1920x1080,max_tokens=5;requests=2,rate=inf,images=0,prompt_tokens=40"
    a, b = parse_phases(text)
    assert a == Phase(3, 8.0, images=2, image_size=(1920, 1080), max_tokens=5)
    assert b == Phase(2, math.inf, images=0, prompt_tokens=40)
    assert parse_phases(format_phases([a, b])) == [a, b]
    assert parse_phases(" requests = 4 , rate = 2 , burstiness = 0.5 ") == [Phase(4, 2.0, burstiness=0.5)]
    for bad, match in [("requests=3,rate=8,colour=red", "unknown key 'colour'"), ("requests=x,rate=1", "requests='x'"),
                       ("requests=3", "needs rate"), ("rate=3", "needs requests"), ("requests=1,rate=1;", "empty"),
                       ("requests=1,rate=1,size=12", "size='12'"), ("requests=0,rate=1", "requests=0"),
                       ("requests=1,rate=0", "rate=0"), ("requests=1,rate=1,rate=2", "twice"),
                       ("requests=1,rate", "'rate' in phase 0 has no value"),
                       ("requests=1,rate=1,images=-1", "images")]:
        with pytest.raises(ValueError, match=match):
            parse_phases(bad)
    arrivals = phase_arrivals([a, b], seed=3)
    times = [t for t, _ in arrivals]
    assert [p for _, p in arrivals] == [a] * 3 + [b] * 2
    assert times[:3] == arrival_offsets(3, 8.0, 1.0, 3)  # phase 0: seed + 0
    assert times[3:] == [times[2]] * 2  # phase 1 (all at once) starts at phase 0's last send
    assert [t for t, _ in phase_arrivals([a], seed=5)] == arrival_offsets(3, 8.0, 1.0, 5)


# ---------------------------------------------------------------- (e) batching caps


@pytest.mark.parametrize("mode,placement", [("epd", "E:0,0 P:0 D:0"), ("aggregated", "A:0"), ("pd", "P:0 D:1")])
def test_batching_caps(mode: str, placement: str) -> None:
    costs = CostModel.from_dict(costs_dict())
    config = SimConfig(max_num_seqs=3, max_num_batched_tokens=2500, max_images_per_batch=4)
    phases = [Phase(40, math.inf, images=2, max_tokens=30)]  # prompts of 22 + 2 x 576 = 1174 tokens
    result = simulate(costs, mode, placement, phases, config=config)
    by_kind: dict[str, list] = {}
    for b in result.batches:
        by_kind.setdefault(b.kind, []).append(b)
    if mode != "pd":  # pd encodes inside prefill
        assert max(b.items for b in by_kind["encode"]) == 4  # filled up to the cap, never past it
        assert sum(b.items for b in by_kind["encode"]) == 80
    assert max(b.tokens for b in by_kind["prefill"]) == 2 * 1174 <= 2500
    assert max(b.seqs for b in by_kind["prefill"]) == 2 and sum(b.seqs for b in by_kind["prefill"]) == 40
    assert max(b.seqs for b in by_kind["decode"]) == 3  # max_num_seqs
    assert all(b.start <= b.end for b in result.batches)
    assert all(r["success"] and r["output_tokens"] == 30 and r["ttft_s"] <= r["e2el_s"] for r in result.records)
    s = result.summary
    assert (s["completed"], s["failed"]) == (40, 0)
    breakdown = result.records[-1]["breakdown"]
    assert sum(breakdown.values()) == pytest.approx(result.records[-1]["ttft_s"])
    alone = simulate(costs, mode, placement, phases, config=SimConfig(max_num_batched_tokens=1000))
    assert all(b.seqs == 1 for b in alone.batches if b.kind == "prefill")  # a longer prompt goes alone


def test_runs_are_deterministic_and_placements_checked() -> None:
    costs = CostModel.from_dict(costs_dict())
    phases = [Phase(30, 20.0, images=2, image_size=(1920, 1080))]
    one = simulate(costs, "epd", "E:0,1 P:2 D:3", phases, seed=4)
    assert one.records == simulate(costs, "epd", "E:0,1 P:2 D:3", phases, seed=4).records
    assert one.records != simulate(costs, "epd", "E:0,1 P:2 D:3", phases, seed=5).records
    assert parse_devices("aggregated", "A:0,1") == {"aggregated": ("0", "1")}
    engine_config = type("EngineConfig", (), {"max_num_seqs": 8, "max_num_batched_tokens": 512, "model": "m"})()
    assert SimConfig.of(engine_config) == SimConfig(max_num_seqs=8, max_num_batched_tokens=512)
    for mode, bad in [("epd", "P:0 D:0"), ("pd", "E:0 P:0 D:0"), ("aggregated", "E:0"), ("fast", None)]:
        with pytest.raises(ValueError):
            parse_devices(mode, bad)


# ---------------------------------------------------------------- (f) placement search


def test_search_more_encoders_win_when_the_tower_is_the_bottleneck() -> None:
    tower_bound = costs_dict(tower=[[1, 0.05], [64, 3.2]],  # 50 ms an item, no gain from batching
                             prefill=[[1, 0.002], [8192, 0.05]],
                             decode=[[1, 100, 0.002], [64, 100, 0.004], [1, 4096, 0.003], [64, 4096, 0.006]])
    costs = CostModel.from_dict(tower_bound)
    candidates = enumerate_placements(4)
    assert len({c.placement for c in candidates}) == len(candidates) == 11
    rows = search(costs, 4, [Phase(60, 1.0, images=2)], settings=SearchSettings(iterations=4))
    assert len(rows) == len(candidates)
    per_gpu = [r["goodput_per_gpu"] for r in rows]
    assert per_gpu == sorted(per_gpu, reverse=True) and per_gpu[0] > 0
    splits = [r for r in rows if r["mode"] == "epd" and r["placement"].count(",") == 1]  # one per GPU, E = 2
    singles = [r for r in rows if r["mode"] == "epd" and r["placement"].startswith("E:0 ")]  # E = 1
    assert splits and len(singles) == 2
    assert splits[0]["goodput"] > 1.8 * max(r["goodput"] for r in singles)
    best = rows[0]  # the best encodes on every GPU: its encoders (or pd prefills) cover GPUs 0-3
    encoding = parse_devices(best["mode"], best["placement"])
    kind = {"epd": "encode", "pd": "prefill", "aggregated": "aggregated"}[best["mode"]]
    assert len(set(encoding[kind])) == 4


# ---------------------------------------------------------------- (g) the CLI, --compare


def test_simulate_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps(costs_dict()))
    out, records = tmp_path / "sim.json", tmp_path / "sim.jsonl"
    common = ["--costs", str(costs), "--images-per-request", "2", "--image-size", "1920x1080", "--max-tokens", "5"]
    assert simulate_cli.main(common + ["--rates", "2,inf", "--num-requests", "20", "--out", str(out),
                                       "--records", str(records)]) == 0
    printed = capsys.readouterr().out
    assert "rate 2 req/s" in printed and "rate inf req/s" in printed and "predicted goodput" in printed
    summary = json.loads(out.read_text())
    assert [r["rate"] for r in summary["rates"]] == [2.0, "inf"] and summary["placement"] == "E:0,0 P:0 D:0"
    assert summary["rates"][0]["completed"] == 20 and summary["goodput"]["by_attainment"] == "inf"
    recs = [json.loads(line) for line in records.read_text().splitlines()]
    assert len(recs) == 40 and all(r["output_tokens"] == 5 and r["phase"] is None for r in recs)

    # the predicted records as "measured": the same requests again, so prediction == measurement
    assert simulate_cli.main(common + ["--compare", str(records), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["compare"]
    assert [r["rate"] for r in rows] == [2.0, "inf"]
    assert all(r["attainment_diff_points"] == 0 and r["predicted"] == r["measured"] for r in rows)

    phases = "requests=6,rate=10,images=1,size=336x336;requests=4,rate=inf,images=0,max_tokens=3"
    assert simulate_cli.main(["--costs", str(costs), "--phases", phases, "--records", str(records)]) == 0
    assert "phase 1, rate inf" in capsys.readouterr().out
    assert [json.loads(x)["phase"] for x in records.read_text().splitlines()] == [0] * 6 + [1] * 4

    assert simulate_cli.main(["--costs", str(costs), "--search", "--gpus", "1", "--num-requests", "10",
                              "--out", str(out)]) == 0
    ranked = json.loads(out.read_text())["search"]
    assert {r["placement"] for r in ranked} == {c.placement for c in enumerate_placements(1)}
    for argv in (["--placement", "X:0"], ["--phases", "requests=2,rate=1,shape=x"], ["--search"],
                 ["--phases", "requests=1,rate=1", "--rates", "1"], ["--mode", "pd", "--placement", "E:0 P:0 D:0"]):
        assert simulate_cli.run_main(lambda argv=argv: simulate_cli.main(["--costs", str(costs), *argv])) == 2
    assert simulate_cli.run_main(lambda: simulate_cli.main(["--costs", str(tmp_path / "none.json")])) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 6 and "Traceback" not in err


def test_compare_reads_bench_serve_records(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Records as bench_serve.py writes them (strict JSON: rate "inf"), one of them failed."""
    def rec(rate: object, i: int, ttft: float | None, ok: bool = True) -> dict:
        return {"label": "epd", "rate": rate, "request_id": i, "phase": None, "scheduled_s": 0.1 * i if rate != "inf"
                else 0.0, "start_s": 0.1 * i, "images": 1, "max_tokens": 4, "ttft_s": ttft,
                "e2el_s": None if ttft is None else ttft + 0.03, "itls_s": [0.01] * 3 if ok else [],
                "tpot_s": 0.01 if ok else None, "output_tokens": 4 if ok else 0, "prompt_tokens": 600 if ok else None,
                "finish_reason": "length" if ok else None, "epd_metrics": None, "success": ok,
                "error": None if ok else "HTTP 500"}

    lines = [rec(10.0, i, 0.05 + 0.01 * i) for i in range(5)] + [rec("inf", i, 2.0) for i in range(3)]
    lines.append(rec("inf", 3, None, ok=False))
    path = tmp_path / "epd.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps(costs_dict()))
    out = tmp_path / "cmp.json"
    assert simulate_cli.main(["--costs", str(costs), "--compare", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "pred / meas" in printed
    rows = {r["rate"]: r for r in json.loads(out.read_text())["compare"]}
    assert set(rows) == {10.0, "inf"}
    assert rows[10.0]["measured"]["ttft_p50_ms"] == pytest.approx(70.0)
    assert rows[10.0]["measured"]["attainment"] == 1.0
    assert rows["inf"]["measured"]["attainment"] == 0.0 and rows["inf"]["requests"] == 4  # TTFT 2 s, one failed
    assert rows["inf"]["predicted"]["completed"] == 4 and 0 < rows["inf"]["predicted"]["ttft_p50_ms"] < 1400
    assert rows["inf"]["attainment_diff_points"] == pytest.approx(100.0)
    path.write_text('{"rate": 1}\n')
    assert simulate_cli.run_main(lambda: simulate_cli.main(["--costs", str(costs), "--compare", str(path)])) == 2


def test_simulator_imports_no_torch() -> None:
    """The simulator's modules run without torch (engine/__init__.py itself imports the LLM)."""
    code = ("import sys, types; pkg = types.ModuleType('engine'); pkg.__path__ = ['engine']; "
            "sys.modules['engine'] = pkg; "
            "import engine.simulator.sim, engine.simulator.search, engine.simulator.compare; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
