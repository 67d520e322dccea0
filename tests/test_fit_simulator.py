"""The simulator's calibration (engine/simulator/cost_model.py's "calibration" section), the EPD
encoders' cache of repeated images, and scripts/fit_simulator.py: each parameter moves predictions
the way it should, a cost model without the section reads and simulates as before, and the fitter
recovers a known calibration from records simulated with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.simulator.compare import compare, simulate_runs
from engine.simulator.cost_model import Calibration, CostModel
from engine.simulator.events import EventLoop, ProcessorSharing
from engine.simulator.metrics import percentile
from engine.simulator.sim import Simulation, make_requests
from engine.simulator.workload import Phase
from scripts import fit_simulator
from scripts import simulate as simulate_cli

SIZE = (1920, 1080)


def costs_dict(**extra) -> dict:
    """A synthetic cost model (test_simulator.py's shape)."""
    return {"version": 1, "device": "synthetic", "model": "none", "backend": "cuda", "dtype": "bfloat16",
            "block_size": 16, "image_tokens": 576,
            "preprocess": {"1920x1080": [[1, 0.004], [8, 0.016], [32, 0.04]]},
            "tower": [[1, 0.004], [8, 0.012], [32, 0.04]],
            "prefill": [[64, 0.01], [640, 0.03], [8192, 0.3]],
            "decode": [[1, 640, 0.004], [1, 4096, 0.006], [64, 640, 0.008], [64, 4096, 0.016]],
            "handoff": {"fixed_s": 0.0005, "mm_item_s": 0.0002, "kv_token_s": 1e-6}} | extra


BASE = CostModel.from_dict(costs_dict())


def records(costs: CostModel, rates: tuple[float, ...] = (10.0, 25.0), n: int = 40, images: int = 2) -> list[dict]:
    """bench_serve-like records of a --rates run, simulated (each rate seed + i, request ids 0..n-1)."""
    out = []
    for i, rate in enumerate(rates):
        reqs = make_requests([Phase(n, rate, images, SIZE, max_tokens=5)], costs, seed=i, phased=False)
        out += [r.record() for r in Simulation(costs, "epd", "E:0,0 P:0 D:0").run(reqs)]
    return out


def ttfts(costs: CostModel, recs: list[dict], repeated: bool = False) -> list[float]:
    runs = simulate_runs(costs, "epd", None, recs, [SIZE], repeated_images=repeated)
    return [r["ttft_s"] for _, _, predicted in runs for r in predicted]


# ---------------------------------------------------------------- the cost model's section


def test_a_file_without_calibration_reads_and_simulates_as_before(tmp_path: Path) -> None:
    assert BASE.calibration is None and BASE.calib == Calibration() and "calibration" not in BASE.to_dict()
    zeros = CostModel.from_dict(costs_dict(calibration={}))
    assert zeros.calibration == Calibration() and zeros.to_dict()["calibration"]["colocation_factor"] == 0.0
    recs = records(BASE, rates=(20.0,), n=20)
    assert ttfts(BASE, recs) == ttfts(zeros, recs)  # all zeros: exactly the profile alone

    fitted = {"request_overhead_s": 0.02, "encode_batch_overhead_s": 0.01, "colocation_factor": 0.1,
              "fit": {"records": "x.jsonl"}}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(costs_dict(calibration=fitted)))
    model = CostModel.load(path)
    assert model.calib.params() == {k: v for k, v in fitted.items() if k != "fit"} and model.calib.fit == fitted["fit"]
    assert CostModel.from_dict(model.to_dict()) == model and model.to_dict()["calibration"] == fitted
    assert model.calibrated(colocation_factor=0.3).calib.request_overhead_s == 0.02
    for bad in ({"colocation": 1}, {"request_overhead_s": -1}, {"colocation_factor": "x"}, [], {"fit": 3}):
        with pytest.raises(ValueError, match="calibration"):
            CostModel.from_dict(costs_dict(calibration=bad))


# ---------------------------------------------------------------- each parameter's direction


def test_request_overhead_adds_itself_to_every_ttft() -> None:
    recs = records(BASE, n=30)
    before, after = ttfts(BASE, recs), ttfts(BASE.calibrated(request_overhead_s=0.025), recs)
    assert after == pytest.approx([t + 0.025 for t in before], abs=1e-9)


def test_more_encode_batch_overhead_more_ttft() -> None:
    recs = records(BASE, rates=(10.0,), n=40)  # below the prefill's saturation: the encoders' time shows
    p50 = [percentile(ttfts(BASE.calibrated(encode_batch_overhead_s=e), recs), 50) for e in (0.0, 0.01, 0.03)]
    assert p50[0] < p50[1] < p50[2]
    assert p50[1] - p50[0] >= 0.01 - 1e-9  # at least the overhead itself: every image waits for its batch
    # images cached (the run's second rate resends the first's): no preprocessing, no overhead
    repeated = records(BASE, rates=(40.0, 41.0), n=40)  # (runs are told apart by their rates)
    second = [ttfts(BASE.calibrated(encode_batch_overhead_s=e), repeated, repeated=True)[40:] for e in (0.0, 0.03)]
    assert second[0] == pytest.approx(second[1])


def test_more_colocation_more_ttft_and_shared_gpu_slower() -> None:
    loop, done = EventLoop(), []
    gpu = ProcessorSharing(loop, colocation_factor=0.5)
    for _ in range(2):
        gpu.submit(1.0, lambda: done.append(loop.now))
    loop.run()
    assert done == pytest.approx([3.0, 3.0])  # two 1 s jobs: 2 x (1 + 0.5)
    loop, done = EventLoop(), []
    gpu = ProcessorSharing(loop, colocation_factor=0.5)
    gpu.submit(1.0, lambda: done.append(loop.now))
    loop.run()
    assert done == [1.0]  # alone: as fast as ever

    recs = records(BASE, rates=(25.0,), n=40)
    p90 = [percentile(ttfts(BASE.calibrated(colocation_factor=f), recs), 90) for f in (0.0, 0.2, 0.5)]
    assert p90[0] < p90[1] < p90[2]


def test_repeated_images_are_encoded_once() -> None:
    """bench_serve.py's rates resend request i's images: after the first rate (and the warm-up's
    request 0) they are cache hits, through no tower; without repeated_images every one is new."""
    recs = records(BASE, rates=(30.0, 31.0), n=30)
    sim_runs = simulate_runs(BASE, "epd", None, recs, [SIZE], repeated_images=True)
    first, second = (predicted for _, _, predicted in sim_runs)
    assert first[0]["breakdown"]["tower_s"] == 0  # the warm-up's images
    assert all(r["breakdown"]["tower_s"] > 0 for r in first[1:])
    assert all(r["breakdown"]["tower_s"] == 0 and r["breakdown"]["preprocess_s"] == 0 for r in second)
    fresh = [r["ttft_s"] for _, _, p in simulate_runs(BASE, "epd", None, recs, [SIZE]) for r in p][30:]
    assert sum(r["ttft_s"] for r in second) < sum(fresh)
    rows = compare(BASE, "epd", None, recs, [SIZE], repeated_images=True, warmup=0)
    assert len(rows) == 2 and rows[1]["predicted"]["ttft_p50_ms"] < rows[0]["predicted"]["ttft_p50_ms"]


# ---------------------------------------------------------------- the fitter


def test_a_rate_listed_twice_is_two_runs_pooled() -> None:
    """bench_serve.py --rates 10,25,10 marks each record with its run (its place in --rates): each
    run is simulated alone (two runs of 10 req/s overlaid would be 20 req/s), then pooled by rate."""
    recs = records(BASE, rates=(10.0, 25.0, 10.0), n=30)
    for i in range(3):
        for r in recs[30 * i:30 * (i + 1)]:
            r["run"] = i
    runs = simulate_runs(BASE, "epd", None, recs, [SIZE])
    assert [(key, len(m), len(p)) for key, m, p in runs] == [(10.0, 60, 60), (25.0, 30, 30)]
    alone = [p for i in (0, 2) for _, _, p in simulate_runs(BASE, "epd", None, recs[30 * i:30 * (i + 1)], [SIZE])]
    assert runs[0][2] == alone[0] + alone[1]
    overlaid = simulate_runs(BASE, "epd", None, [{k: v for k, v in r.items() if k != "run"} for r in recs], [SIZE])
    assert [r["ttft_s"] for r in overlaid[0][2]] != [r["ttft_s"] for r in runs[0][2]]
    rows = compare(BASE, "epd", None, recs, [SIZE])
    assert [(r["rate"], r["requests"]) for r in rows] == [(10.0, 60), (25.0, 30)]


def test_fitter_recovers_a_known_calibration() -> None:
    """Records simulated with a known calibration (every image new, so the encoders' overhead shows
    at every rate); the fit on them finds it again, and its tables say every rate is within."""
    truth = Calibration(request_overhead_s=0.013, encode_batch_overhead_s=0.007, colocation_factor=0.27)  # off-grid
    measured = records(BASE.calibrated(**truth.params()), rates=(10.0, 25.0, 40.0), n=40)
    problem = fit_simulator.Problem(BASE, measured, sizes=[SIZE], repeated_images=False)
    grids = {"colocation_factor": (0.0, 0.1, 0.2, 0.3, 0.4), "encode_batch_overhead_s": (0.0, 0.005, 0.01, 0.02)}
    found, value = fit_simulator.fit(problem, grids, refinements=2)
    assert value < 0.5
    assert found.colocation_factor == pytest.approx(0.27, abs=0.03)
    assert found.encode_batch_overhead_s == pytest.approx(0.007, abs=0.003)
    assert found.request_overhead_s == pytest.approx(0.013, abs=0.003)
    rows = problem.rows(BASE.calibrated(**found.params()))
    assert all(fit_simulator.within(r) for r in rows) and "3 of 3 rates within" in fit_simulator.format_table(rows)


def test_fit_and_check_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    truth = {"request_overhead_s": 0.015, "colocation_factor": 0.1}
    costs, model = tmp_path / "costs.json", BASE.calibrated(**truth)
    costs.write_text(json.dumps(costs_dict()))
    fit_on, check_on = tmp_path / "fit.jsonl", tmp_path / "check.jsonl"
    fit_on.write_text("".join(json.dumps(r) + "\n" for r in records(model, rates=(10.0, 20.0), n=20)))
    check_on.write_text("".join(json.dumps(r) + "\n" for r in records(model, rates=(30.0,), n=20)))
    out = tmp_path / "calibrated.json"
    argv = ["--costs", str(costs), "--records", str(fit_on), "--check", str(check_on), "--out", str(out),
            "--fresh-images"]
    assert fit_simulator.main(argv) == 0
    printed = capsys.readouterr().out
    assert "2 of 2 rates within +-10" in printed and "1 of 1 rates within +-10" in printed
    calibrated = CostModel.load(out)
    assert calibrated.calib.request_overhead_s == pytest.approx(0.015, abs=0.005)
    assert calibrated.calib.fit["records"] == "fit.jsonl"
    # the calibrated file checked as is, and simulate.py reading it
    assert fit_simulator.main(["--costs", str(out), "--check", str(check_on), "--fresh-images"]) == 0
    assert "calibration: request_overhead_s" in capsys.readouterr().out
    assert simulate_cli.main(["--costs", str(out), "--compare", str(check_on), "--image-size", "1920x1080",
                              "--repeated-images"]) == 0
    for bad in ([], ["--out", str(out), "--check", str(check_on)], ["--records", str(fit_on), "--placement", "X:0"]):
        assert simulate_cli.run_main(lambda bad=bad: fit_simulator.main(["--costs", str(costs), *bad])) == 2
