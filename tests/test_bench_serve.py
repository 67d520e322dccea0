"""scripts/bench_serve.py and scripts/plot_serve.py on the CPU: the pure functions (arrivals,
percentiles, SLO attainment, both goodputs, workloads, SSE parsing), then an end-to-end run against
a tiny fake OpenAI-compatible streaming server made here with the standard library."""

from __future__ import annotations

import io
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from scripts import bench_serve as bs

# ---------------------------------------------------------------- arrivals


@pytest.mark.parametrize("burstiness", [1.0, 0.5, 4.0])
def test_arrivals_mean_and_seed(burstiness: float) -> None:
    rate, n = 5.0, 4001
    offsets = bs.arrival_offsets(n, rate, burstiness, seed=3)
    assert offsets[0] == 0.0 and len(offsets) == n
    assert all(b >= a for a, b in zip(offsets, offsets[1:]))
    mean_gap = offsets[-1] / (n - 1)
    assert mean_gap == pytest.approx(1 / rate, rel=0.08)
    assert bs.arrival_offsets(n, rate, burstiness, seed=3) == offsets
    assert bs.arrival_offsets(n, rate, burstiness, seed=4) != offsets


def test_arrivals_burstiness_spread_and_inf() -> None:
    def cv(burstiness: float) -> float:  # coefficient of variation of the gaps: 1/sqrt(shape)
        o = bs.arrival_offsets(4001, 2.0, burstiness, seed=0)
        gaps = [b - a for a, b in zip(o, o[1:])]
        m = sum(gaps) / len(gaps)
        return math.sqrt(sum((g - m) ** 2 for g in gaps) / len(gaps)) / m

    assert cv(1.0) == pytest.approx(1.0, rel=0.1)
    assert cv(0.25) == pytest.approx(2.0, rel=0.15)
    assert cv(4.0) == pytest.approx(0.5, rel=0.1)
    assert bs.arrival_offsets(5, math.inf) == [0.0] * 5
    assert bs.arrival_offsets(0, 1.0) == []
    with pytest.raises(ValueError):
        bs.arrival_offsets(3, 0.0)


# ---------------------------------------------------------------- percentiles, SLOs, goodput


def test_percentile_matches_numpy() -> None:
    np = pytest.importorskip("numpy")
    xs = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0]
    for q in (0, 10, 50, 90, 99, 100):
        assert bs.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert bs.percentile([], 50) is None
    assert bs.percentile([4.0], 99) == 4.0
    st = bs.stats_ms([0.1, 0.2, 0.3])
    assert st["mean"] == pytest.approx(200.0) and st["p50"] == pytest.approx(200.0)
    assert bs.stats_ms([]) == {"mean": None, "p50": None, "p90": None, "p99": None}


def test_tpot_and_slo() -> None:
    assert bs.tpot_of(1.0, 0.1, 10) == pytest.approx(0.1)
    assert bs.tpot_of(1.0, 0.1, 1) is None
    assert bs.tpot_of(None, None, 0) is None
    ok = {"success": True, "ttft_s": 1.0, "tpot_s": 0.03}
    assert bs.meets_slo(ok, 1.4, 0.04)
    assert not bs.meets_slo({**ok, "ttft_s": 1.4}, 1.4, 0.04)  # strict <
    assert not bs.meets_slo({**ok, "tpot_s": 0.05}, 1.4, 0.04)
    assert bs.meets_slo({**ok, "tpot_s": None}, 1.4, 0.04)  # one token: TTFT alone
    assert not bs.meets_slo({**ok, "success": False}, 1.4, 0.04)
    assert not bs.meets_slo({"success": True, "ttft_s": None}, 1.4, 0.04)
    recs = [ok, ok, ok, {**ok, "ttft_s": 2.0}, {"success": False, "error": "x"}]
    assert bs.attainment(recs, 1.4, 0.04) == pytest.approx(0.6)
    assert bs.attainment([], 1.4, 0.04) == 0.0


def _rate_records(rate: float, ttfts: list[float], tpot: float, failed: int = 0) -> list[dict]:
    recs = [{"rate": rate, "success": True, "ttft_s": t, "tpot_s": tpot, "e2el_s": t + 9 * tpot,
             "itls_s": [tpot] * 9, "output_tokens": 10, "prompt_tokens": 22} for t in ttfts]
    return recs + [{"rate": rate, "success": False, "error": "HTTP 500", "ttft_s": None, "tpot_s": None}] * failed


def test_goodput_definitions() -> None:
    # rate 1: all fine; rate 2: 95% meet, but its p99 TTFT is over the SLO; rate 4: 50% meet; rate 8: fails
    by_rate = {1.0: _rate_records(1.0, [0.2] * 20, 0.02),
               2.0: _rate_records(2.0, [0.3] * 19 + [3.0], 0.02),
               4.0: _rate_records(4.0, [0.5] * 10 + [2.0] * 10, 0.02),
               8.0: _rate_records(8.0, [0.5] * 5, 0.02, failed=15)}
    per_rate = [bs.summarize_rate(r, recs, 10.0, 1.4, 0.04) for r, recs in by_rate.items()]
    att = {s["rate"]: s["attainment"] for s in per_rate}
    assert att == {1.0: 1.0, 2.0: 0.95, 4.0: 0.5, 8.0: 0.25}
    assert bs.goodput_by_attainment(per_rate, 0.9) == 2.0
    assert bs.goodput_by_attainment(per_rate, 0.96) == 1.0
    assert bs.goodput_by_attainment(per_rate, 1.0) == 1.0
    assert bs.goodput_by_p99(per_rate, 1.4, 0.04) == 8.0  # p99 over completed requests only: 8 passes
    assert bs.goodput_by_p99(per_rate[:3], 1.4, 0.04) == 1.0
    assert bs.goodput_by_p99(per_rate[:3], 1.4, 0.01) is None  # every TPOT is over
    assert bs.goodput_by_attainment([{"rate": 1.0, "attainment": 0.1}], 0.9) is None
    s8 = per_rate[3]
    assert (s8["completed"], s8["failed"]) == (5, 15)
    assert s8["request_throughput"] == pytest.approx(0.5)
    assert s8["output_throughput"] == pytest.approx(5.0)
    assert s8["good_request_throughput"] == pytest.approx(0.5)
    assert s8["errors"] == ["HTTP 500"]


def test_strict_json() -> None:
    obj = {"rate": math.inf, "x": [1.0, -math.inf, math.nan], "n": 3}
    assert bs.strict_json(obj) == {"rate": "inf", "x": [1.0, "-inf", None], "n": 3}
    assert float(bs.strict_json(math.inf)) == math.inf


def test_parse_flags_values() -> None:
    assert bs.parse_rates("1,2.5,inf") == [1.0, 2.5, math.inf]
    for bad in ("1,x", "0", "-1", "nan"):
        with pytest.raises(bs.CLIError):
            bs.parse_rates(bad)
    assert bs.parse_size("1920x1080") == (1920, 1080)
    for bad in ("336", "0x10", "axb"):
        with pytest.raises(bs.CLIError):
            bs.parse_size(bad)


# ---------------------------------------------------------------- workloads


def _decode(url: str):
    import base64

    from PIL import Image

    prefix = "data:image/jpeg;base64,"
    assert url.startswith(prefix)
    img = Image.open(io.BytesIO(base64.b64decode(url[len(prefix):])))
    img.load()
    assert img.format == "JPEG"
    return img


def test_workload_epd_synthetic() -> None:
    specs = bs.make_workload("epd-synthetic", 3, seed=1, images_per_request=2, image_size=(64, 48))
    assert len(specs) == 3 and [s.id for s in specs] == [0, 1, 2]
    for s in specs:
        assert len(s.prompt.split()) == bs.PROMPT_WORDS == 22
        assert s.max_tokens == 10 and len(s.images) == 2
        assert all(_decode(u).size == (64, 48) for u in s.images)
    assert len({u for s in specs for u in s.images}) == 6  # every image distinct
    again = bs.make_workload("epd-synthetic", 3, seed=1, images_per_request=2, image_size=(64, 48))
    assert [(s.prompt, s.images) for s in again] == [(s.prompt, s.images) for s in specs]
    other = bs.make_workload("epd-synthetic", 3, seed=2, images_per_request=2, image_size=(64, 48))
    assert other[0].images != specs[0].images


def test_workload_presets_and_large_image() -> None:
    mixed = bs.make_workload("mixed", 10, seed=0, images_per_request=1, image_size=(32, 32))
    assert sorted(len(s.images) for s in mixed) == [0] * 5 + [1] * 5
    assert all(s.max_tokens == 32 for s in mixed)
    long = bs.make_workload("long-output", 2, images_per_request=0)
    assert all(s.max_tokens == 256 and not s.images for s in long)
    assert bs.make_workload("long-output", 1, max_tokens=7)[0].max_tokens == 7
    with pytest.raises(bs.CLIError):
        bs.make_workload("nope", 1)
    big = _decode(bs.data_url(bs.make_jpeg(1920, 1080, seed=0)))
    assert big.size == (1920, 1080) and big.mode == "RGB"


def test_request_bodies() -> None:
    spec = bs.make_workload("epd-synthetic", 1, images_per_request=2, image_size=(16, 16))[0]
    body = bs.request_body(spec, "chat", "m", ignore_eos=True)
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    assert body["temperature"] == 0.0 and body["max_tokens"] == 10 and body["ignore_eos"] is True
    content = body["messages"][0]["content"]
    assert content[0] == {"type": "text", "text": spec.prompt}
    assert [c["type"] for c in content[1:]] == ["image_url", "image_url"]
    text = bs.RequestSpec(id=0, prompt="hi", max_tokens=3)
    assert bs.request_body(text, "chat", "m")["messages"] == [{"role": "user", "content": "hi"}]
    comp = bs.request_body(text, "completions", "m")
    assert comp["prompt"] == "hi" and "ignore_eos" not in comp and "messages" not in comp
    with pytest.raises(bs.CLIError):
        bs.request_body(spec, "completions", "m")


# ---------------------------------------------------------------- SSE


def _chat_chunk(content: str | None = None, finish: str | None = None, **extra) -> dict:
    delta = {} if content is None else {"content": content}
    return {"id": "c1", "object": "chat.completion.chunk", "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}


EPD = {"ttft_s": 0.05, "e2e_s": 0.2, "tokens_per_s": 20.0, "queue_s": 0.01, "encode_s": 0.02, "wait_s": 0.005,
       "prefill_s": 0.01, "token_times_s": [0.05, 0.1, 0.15, 0.2], "handoff": {"bytes": 1024}}


def test_sse_parsing_chat_stream() -> None:
    lines = [": keep-alive", "", "data: " + json.dumps(_chat_chunk("")), "",  # role chunk: no content
             "data: " + json.dumps(_chat_chunk("Hel")), "", "event: x", "data:" + json.dumps(_chat_chunk("lo")),
             "data: " + json.dumps(_chat_chunk("!", finish="length", epd_metrics=EPD)),
             "data: " + json.dumps({"id": "c1", "object": "chat.completion.chunk", "choices": [],
                                    "usage": {"prompt_tokens": 30, "completion_tokens": 3, "total_tokens": 33}}),
             "data: [DONE]", "data: " + json.dumps(_chat_chunk("late"))]
    assert bs.parse_sse_line("data: [DONE]") == bs.DONE
    assert bs.parse_sse_line(": comment") is None and bs.parse_sse_line("data: ") is None
    with pytest.raises(ValueError):
        bs.parse_sse_line("data: {bad")
    st = bs.StreamState(start=10.0)
    for i, line in enumerate(lines):
        if not st.done:
            st.feed(line, 10.0 + 0.1 * i)
    assert st.done and st.text == "Hello!"
    rec = st.record()
    assert rec["ttft_s"] == pytest.approx(0.4)  # the first chunk with content, at line 4
    assert rec["e2el_s"] == pytest.approx(0.8)
    assert rec["itls_s"] == pytest.approx([0.3, 0.1])
    assert rec["output_tokens"] == 3 and rec["prompt_tokens"] == 30
    assert rec["tpot_s"] == pytest.approx(0.2)
    assert rec["finish_reason"] == "length" and rec["epd_metrics"] == EPD


def test_sse_completions_and_no_usage() -> None:
    st = bs.StreamState(start=0.0)
    for i, text in enumerate(["a", "b", "c", "d"]):
        st.feed("data: " + json.dumps({"object": "text_completion", "choices": [{"text": text}]}), 1.0 + i)
    st.feed("data: [DONE]", 9.0)
    rec = st.record()
    assert rec["output_tokens"] == 4 and rec["prompt_tokens"] is None and rec["epd_metrics"] is None
    assert rec["tpot_s"] == pytest.approx(1.0)
    err = bs.StreamState(0.0)
    err.feed('data: {"error": {"message": "boom"}}', 1.0)
    assert err.error == "boom"


# ---------------------------------------------------------------- end to end, on a fake server


class FakeOpenAI(BaseHTTPRequestHandler):
    tokens = 4
    gap_s = 0.005
    bodies: list[dict] = []
    with_epd = True

    def log_message(self, *args) -> None:  # quiet
        pass

    def _json(self, code: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": "fake-llava", "object": "model"}]})
        else:
            self._json(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeOpenAI.bodies.append(body)
        if self.path != "/v1/chat/completions":
            self._json(404, {"error": {"message": "not found"}})
            return
        if body["messages"][0]["content"] == "FAIL":
            self._json(500, {"error": {"message": "injected"}})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        t0 = time.perf_counter()

        def send(obj) -> None:
            self.wfile.write(f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode())
            self.wfile.flush()

        send(_chat_chunk(""))
        n = min(self.tokens, body["max_tokens"])
        times = []
        for i in range(n):
            time.sleep(self.gap_s)
            times.append(time.perf_counter() - t0)
            last = i == n - 1
            extra = {}
            if last and self.with_epd:
                e2e = times[-1]
                extra["epd_metrics"] = {"ttft_s": times[0], "e2e_s": e2e, "tokens_per_s": n / e2e,
                                        "queue_s": times[0] * 0.1, "encode_s": times[0] * 0.4,
                                        "wait_s": times[0] * 0.1, "prefill_s": times[0] * 0.3,
                                        "token_times_s": times, "handoff": {}}
            send(_chat_chunk(f"t{i} ", finish="length" if last else None, **extra))
        if body.get("stream_options", {}).get("include_usage"):
            send({"object": "chat.completion.chunk", "choices": [],
                  "usage": {"prompt_tokens": 600, "completion_tokens": n, "total_tokens": 600 + n}})
        send("[DONE]")


@pytest.fixture
def fake_server():
    FakeOpenAI.bodies = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_end_to_end_with_plots(fake_server: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("httpx")
    records, summary = tmp_path / "epd.jsonl", tmp_path / "epd.json"
    common = ["--base-url", fake_server, "--rates", "20,inf", "--num-requests", "6", "--images-per-request", "2",
              "--image-size", "32x24", "--max-tokens", "4", "--ignore-eos", "--request-timeout", "30", "--seed", "1",
              "--no-progress"]
    assert bs.main(common + ["--records", str(records), "--out", str(summary), "--label", "epd"]) == 0
    printed = capsys.readouterr().out
    assert "rate 20 req/s" in printed and "rate inf req/s" in printed and "goodput:" in printed

    bodies = FakeOpenAI.bodies
    assert len(bodies) == 13 and all(b["model"] == "fake-llava" and b["ignore_eos"] for b in bodies)
    assert all(len(b["messages"][0]["content"]) == 3 for b in bodies)  # text + 2 images

    recs = [json.loads(line) for line in records.read_text().splitlines()]
    assert len(recs) == 12 and {r["rate"] for r in recs} == {20.0, "inf"}  # strict JSON: no Infinity
    for r in recs:
        assert r["success"] and r["error"] is None and r["label"] == "epd"
        assert r["output_tokens"] == 4 and r["prompt_tokens"] == 600 and len(r["itls_s"]) == 3
        assert 0 < r["ttft_s"] <= r["e2el_s"] < 30
        assert r["tpot_s"] == pytest.approx((r["e2el_s"] - r["ttft_s"]) / 3)
        assert r["epd_metrics"]["encode_s"] > 0 and r["start_s"] >= 0
    assert sorted(r["request_id"] for r in recs if r["rate"] == 20.0) == list(range(6))

    s = json.loads(summary.read_text())
    assert s["label"] == "epd" and s["model"] == "fake-llava" and s["workload"] == "epd-synthetic"
    assert [r["rate"] for r in s["rates"]] == [20.0, "inf"]
    for r in s["rates"]:
        assert (r["completed"], r["failed"]) == (6, 0)
        assert r["total_output_tokens"] == 24 and r["output_throughput"] > 0
        assert all(r[f"{m}_ms"]["p99"] is not None for m in bs.METRICS)
        assert r["attainment"] == 1.0  # ms-scale fake: well inside 1.4 s / 40 ms
    assert s["goodput"] == {"by_attainment": "inf", "by_p99": "inf"}
    assert "Infinity" not in summary.read_text() + records.read_text()

    # a second "mode" without epd_metrics, plotted from its records JSONL alone
    FakeOpenAI.with_epd = False
    try:
        other = tmp_path / "vllm.jsonl"
        assert bs.main(common + ["--records", str(other), "--label", "vllm"]) == 0
    finally:
        FakeOpenAI.with_epd = True
    assert all(json.loads(x)["epd_metrics"] is None for x in other.read_text().splitlines())

    pytest.importorskip("matplotlib")
    from scripts import plot_serve

    out = tmp_path / "plots"
    capsys.readouterr()
    assert plot_serve.main([str(summary), str(other), "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["attainment.png", "timeline_epd_rateinf.png", "ttft_cdf_rateinf.png"]
    for name in pngs:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / name).stat().st_size > 1000
    assert all(str(out / n) in printed for n in pngs)

    # records without epd_metrics only: the timeline is skipped with a message
    out2 = tmp_path / "plots2"
    assert plot_serve.main([str(other), "--out-dir", str(out2), "--rate", "20"]) == 0
    err = capsys.readouterr().err
    assert "no epd_metrics" in err
    assert sorted(p.name for p in out2.glob("*.png")) == ["attainment.png", "ttft_cdf_rate20.png"]


def test_phase_workload() -> None:
    phases = bs.parse_phases("requests=2,rate=4,images=2,size=64x48;requests=3,rate=inf,images=0,max_tokens=7,"
                             "prompt_tokens=5")
    specs = bs.make_phase_workload(phases, seed=1)
    assert [s.id for s in specs] == list(range(5)) and [s.phase for s in specs] == [0, 0, 1, 1, 1]
    assert [len(s.images) for s in specs] == [2, 2, 0, 0, 0] and [s.max_tokens for s in specs] == [10] * 2 + [7] * 3
    assert all(_decode(u).size == (64, 48) for s in specs for u in s.images)
    assert [len(s.prompt.split()) for s in specs] == [22, 22, 5, 5, 5]
    # one phase of the epd-synthetic shape: the same requests as --workload epd-synthetic
    one = bs.make_phase_workload(bs.parse_phases("requests=3,rate=1,images=2,size=64x48"), seed=1)
    plain = bs.make_workload("epd-synthetic", 3, seed=1, images_per_request=2, image_size=(64, 48))
    assert [(s.prompt, s.images, s.max_tokens) for s in one] == [(s.prompt, s.images, s.max_tokens) for s in plain]


def test_phases_one_run(fake_server: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("httpx")
    records, summary = tmp_path / "p.jsonl", tmp_path / "p.json"
    phases = "requests=3,rate=50,images=1,size=32x24,max_tokens=3;requests=2,rate=inf,images=0,max_tokens=2"
    assert bs.main(["--base-url", fake_server, "--phases", phases, "--ignore-eos", "--no-progress", "--seed", "2",
                    "--warmup-requests", "0", "--records", str(records), "--out", str(summary)]) == 0
    printed = capsys.readouterr().out
    assert "phase 0, rate 50 req/s" in printed and "phase 1, rate inf req/s" in printed and "phase all" in printed
    assert sorted(len(b["messages"][0]["content"]) if isinstance(b["messages"][0]["content"], list) else 0
                  for b in FakeOpenAI.bodies) == [0, 0, 2, 2, 2]  # text + 1 image in phase 0, text only in 1
    recs = sorted((json.loads(x) for x in records.read_text().splitlines()), key=lambda r: r["request_id"])
    assert [r["phase"] for r in recs] == [0, 0, 0, 1, 1] and [r["rate"] for r in recs] == [50.0] * 3 + ["inf"] * 2
    assert [r["output_tokens"] for r in recs] == [3, 3, 3, 2, 2] and [r["images"] for r in recs] == [1, 1, 1, 0, 0]
    offsets = [t for t, _ in bs.phase_arrivals(bs.parse_phases(phases), seed=2)]
    assert [r["scheduled_s"] for r in recs] == pytest.approx(offsets)
    assert recs[3]["scheduled_s"] == recs[4]["scheduled_s"] == recs[2]["scheduled_s"]  # back to back
    s = json.loads(summary.read_text())
    assert [p["requests"] for p in s["phases"]] == [3, 2]
    assert [(r["phase"], r["rate"], r["completed"]) for r in s["rates"]] == [(0, 50.0, 3), (1, "inf", 2)]
    assert s["overall"]["phase"] == "all" and s["overall"]["num_requests"] == 5 and s["overall"]["attainment"] == 1.0
    with pytest.raises(bs.CLIError, match="drop --rates"):
        bs.main(["--base-url", fake_server, "--phases", phases, "--rates", "1"])
    with pytest.raises(bs.CLIError, match="--phases: .*unknown key 'colour'"):
        bs.main(["--base-url", fake_server, "--phases", "requests=1,rate=1,colour=red"])


def test_failures_are_records(fake_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("httpx")
    real = bs.make_workload

    def failing(*args, **kwargs):
        specs = real(*args, **kwargs)
        specs[0].prompt, specs[0].images = "FAIL", []
        return specs

    monkeypatch.setattr(bs, "make_workload", failing)
    records, summary = tmp_path / "r.jsonl", tmp_path / "s.json"
    assert bs.main(["--base-url", fake_server, "--model", "x", "--rates", "inf", "--num-requests", "3",
                    "--images-per-request", "0", "--max-tokens", "2", "--records", str(records),
                    "--out", str(summary), "--no-progress", "--max-concurrency", "2", "--warmup-requests", "0"]) == 0
    recs = {r["request_id"]: r for r in map(json.loads, records.read_text().splitlines())}
    assert not recs[0]["success"] and "HTTP 500" in recs[0]["error"] and "injected" in recs[0]["error"]
    assert recs[1]["success"] and recs[2]["success"]
    s = json.loads(summary.read_text())["rates"][0]
    assert (s["completed"], s["failed"]) == (2, 1) and s["attainment"] == pytest.approx(2 / 3)


def test_unreachable_server_and_bad_flags(capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("httpx")
    import socket

    with socket.socket() as sock:  # a port with nobody listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(bs.CLIError, match="--model not given"):
        bs.main(["--base-url", url, "--num-requests", "1", "--no-progress", "--request-timeout", "5"])
    fast = ["--base-url", url, "--model", "m", "--num-requests", "2", "--rates", "inf", "--no-progress",
            "--images-per-request", "0", "--request-timeout", "5"]
    with pytest.raises(bs.CLIError, match="warm-up request .* failed"):
        bs.main(fast)
    # without the warm-up check every request fails fast (connection refused): exit 1, no hang
    assert bs.main(fast + ["--warmup-requests", "0"]) == 1
    assert "completed / failed:" in capsys.readouterr().out
    assert bs.run_main(lambda: bs.main(["--rates", "1,zero"])) == 2
    assert bs.run_main(lambda: bs.main(["--endpoint", "completions", "--num-requests", "1"])) == 2
    assert bs.run_main(lambda: bs.main(["--burstiness", "0"])) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 3 and "Traceback" not in err


# ---------------------------------------------------------------- scripts/serve_sweep.sh, on a fake serve.py

FAKE_SERVE = r'''
import argparse, json, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

p = argparse.ArgumentParser()
for flag in ("--model", "--mode", "--placement", "--host", "--port", "--backend", "--dtype", "--device"):
    p.add_argument(flag)
args = p.parse_args()
print("argv", json.dumps(sys.argv[1:]), flush=True)


class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_GET(self):
        data = json.dumps({"object": "list", "data": [{"id": "fake-" + args.mode}]}).encode()
        self.send_response(200 if self.path in ("/health", "/v1/models") else 404)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        n = body["max_tokens"]
        for i in range(n):
            time.sleep(0.002)
            finish = "length" if i == n - 1 else None
            c = {"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": finish}]}
            if i == n - 1 and args.mode == "epd":
                c["epd_metrics"] = {"ttft_s": 0.002, "e2e_s": 0.002 * n, "queue_s": 0.0005, "encode_s": 0.0005,
                                    "wait_s": 0.0005, "prefill_s": 0.0005}
            self.wfile.write(("data: " + json.dumps(c) + "\n\n").encode())
        usage = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": n}}
        self.wfile.write(("data: " + json.dumps(usage) + "\n\ndata: [DONE]\n\n").encode())


time.sleep(0.5)  # "loading"
ThreadingHTTPServer((args.host, int(args.port)), H).serve_forever()
'''


def test_serve_sweep_on_fake_server(tmp_path: Path) -> None:
    import os
    import shutil
    import socket
    import subprocess
    import sys

    pytest.importorskip("httpx")
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    root = Path(__file__).resolve().parents[1]
    tree = tmp_path / "tree" / "scripts"
    tree.mkdir(parents=True)
    (tree / "serve.py").write_text(FAKE_SERVE)
    for name in ("serve_sweep.sh", "bench_serve.py", "plot_serve.py"):
        (tree / name).symlink_to(root / "scripts" / name)  # bench/plot resolve their repo root through the link
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "out"
    env = {**os.environ, "MODEL": "/nonexistent-model", "MODES": "aggregated epd", "IMAGES": "1",
           "SIZES": "32x32", "RATES": "50,inf", "NUM_REQUESTS": "3", "PORT": str(port), "PYTHON": sys.executable,
           "HEALTH_TIMEOUT": "60", "STOP_TIMEOUT": "10", "BENCH_ARGS": "--ignore-eos --no-progress",
           "EPD_PLACEMENT": "E:0,1 P:2 D:3"}
    proc = subprocess.run(["bash", str(tree / "serve_sweep.sh"), str(out)], env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for mode in ("aggregated", "epd"):
        summary = json.loads((out / mode / "img1_32x32.json").read_text())
        assert summary["label"] == mode and summary["model"] == f"fake-{mode}"
        assert [r["completed"] for r in summary["rates"]] == [3, 3]
        assert len((out / mode / "img1_32x32.jsonl").read_text().splitlines()) == 6
    argv = json.loads((out / "epd" / "server.log").read_text().splitlines()[0][len("argv "):])
    assert argv[argv.index("--placement") + 1] == "E:0,1 P:2 D:3" and argv[argv.index("--mode") + 1] == "epd"
    agg = json.loads((out / "aggregated" / "server.log").read_text().splitlines()[0][len("argv "):])
    assert agg[agg.index("--device") + 1] == "cuda:0" and "--placement" not in agg
    pngs = sorted(p.name for p in (out / "plots" / "img1_32x32").glob("*.png"))
    if pngs:  # matplotlib installed
        assert pngs == ["attainment.png", "timeline_epd_rateinf.png", "ttft_cdf_rateinf.png"]
    with socket.socket() as sock:  # every server stopped: nothing listens on the port (TIME_WAIT is fine)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
    assert "stopping the server" in proc.stderr and "SIGKILL" not in proc.stderr


def test_each_rate_sends_fresh_images_unless_asked(fake_server: str) -> None:
    """A server's image cache must not answer rate 1 from rate 0's images (they are seeded per
    rate); --same-images sends rate 0's again."""
    pytest.importorskip("httpx")

    def images_by_rate(extra: list[str]) -> list[set[str]]:
        FakeOpenAI.bodies = []
        assert bs.main(["--base-url", fake_server, "--rates", "inf,inf", "--num-requests", "3", "--image-size",
                        "32x24", "--max-tokens", "2", "--request-timeout", "30", "--no-progress",
                        "--warmup-requests", "0", *extra]) == 0
        urls = [[part["image_url"]["url"] for part in b["messages"][0]["content"] if part.get("type") == "image_url"]
                for b in FakeOpenAI.bodies]
        return [{u for us in urls[:3] for u in us}, {u for us in urls[3:] for u in us}]

    first, second = images_by_rate([])
    assert len(first) == 3 and not first & second
    first, second = images_by_rate(["--same-images"])
    assert first == second
