"""The CI smoke of issue 12: bench_serve.py against our own OpenAI server (tiny LLaVA, CPU, torch
backend, aggregated in-process) at two rates, then plot_serve.py's three PNGs from its output,
with the per-request stage timeline drawn from the server's epd_metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("matplotlib")

from engine import LLM  # noqa: E402
from engine.serving import EngineLoop  # noqa: E402
from ipc.http_server import UvicornThread, build_app  # noqa: E402
from scripts import bench_serve, plot_serve  # noqa: E402


def test_bench_serve_and_plots_against_our_server(tiny_llava: Path, tmp_path: Path) -> None:
    loop = EngineLoop(LLM(tiny_llava, backend="torch", device="cpu"))
    loop.start()
    server = UvicornThread(build_app(loop, "tiny-llava"), "127.0.0.1", 0).start()
    try:
        records, summary = tmp_path / "aggregated.jsonl", tmp_path / "aggregated.json"
        argv = ["--base-url", f"http://127.0.0.1:{server.port}", "--rates", "4,16", "--num-requests", "4",
                "--images-per-request", "1", "--image-size", "64x48", "--max-tokens", "5", "--ignore-eos",
                "--request-timeout", "60", "--no-progress", "--label", "aggregated", "--records", str(records),
                "--out", str(summary)]
        assert bench_serve.main(argv) == 0
    finally:
        assert server.stop()
        loop.stop()
        assert loop.join(30)
    recs = [json.loads(line) for line in records.read_text().splitlines()]
    assert len(recs) == 8 and all(r["success"] for r in recs)
    for r in recs:  # the server counted its tokens (usage) and sent its own per-request timings
        assert r["output_tokens"] == 5 and r["prompt_tokens"] > 22
        assert r["epd_metrics"]["ttft_s"] > 0 and r["epd_metrics"]["e2e_s"] >= r["epd_metrics"]["ttft_s"]
        assert r["epd_metrics"]["encode_s"] > 0  # the image went through the tower
    s = json.loads(summary.read_text())
    assert s["model"] == "tiny-llava" and [r["rate"] for r in s["rates"]] == [4.0, 16.0]
    assert all((r["completed"], r["failed"]) == (4, 0) for r in s["rates"])
    assert set(s["goodput"]) == {"by_attainment", "by_p99"}

    out = tmp_path / "plots"
    assert plot_serve.main([str(summary), "--out-dir", str(out)]) == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["attainment.png", "timeline_aggregated_rate16.png", "ttft_cdf_rate16.png"], pngs
    assert all((out / p).stat().st_size > 5000 for p in pngs)
