"""The OpenAI HTTP server (ipc/http_server.py) on 127.0.0.1, ephemeral ports, every wait bounded:
the official openai client (chat with a data-URL image, streamed and not, completions, models),
greedy answers equal to LLM.generate for the same Request, health / metrics, each bad request
answered with its status and a message naming the field (and the next request served as
before), client disconnects abort, --max-waiting answers 429, and epd through the CLI."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from PIL import Image  # noqa: E402

from engine import LLM  # noqa: E402
from engine.request import Request  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402
from engine.serving import EngineLoop  # noqa: E402
from ipc.http_server import UvicornThread, build_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KEY = "http-test-key"
MODEL = "tiny-llava"
T = 60  # seconds: the bound on any one wait


def _png(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


IMAGE_URL = _data_url(_png())


def _user(text: str, *images: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("media")
    (d / "red.png").write_bytes(_png())
    (d.parent / "outside.png").write_bytes(_png())
    return d


@pytest.fixture(scope="module")
def engine_loop(tiny_llava: Path):
    llm = LLM(tiny_llava, backend="torch", device="cpu", max_images_per_batch=1)  # 2 images fit the MM arena
    loop = EngineLoop(llm)
    loop.start()
    yield loop
    loop.stop()
    assert loop.join(T)


@pytest.fixture(scope="module")
def server(engine_loop: EngineLoop, media_dir: Path):
    app = build_app(engine_loop, MODEL, api_key=KEY, max_request_bytes=256 * 1024,
                    allowed_local_media_path=media_dir)
    srv = UvicornThread(app, "127.0.0.1", 0).start()
    yield srv
    assert srv.stop()


@pytest.fixture(scope="module")
def client(server: UvicornThread):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=KEY, max_retries=0, timeout=T)


def _url(server: UvicornThread, path: str) -> str:
    return f"http://127.0.0.1:{server.port}{path}"


def _post(server: UvicornThread, path: str, body: object = None, key: str | None = KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    headers.update(kw.pop("headers", {}))
    if body is not None:
        kw["content"] = body if isinstance(body, (bytes, str)) or callable(getattr(body, "__next__", None)) \
            else json.dumps(body)
    kw.setdefault("timeout", T)
    return httpx.post(_url(server, path), headers={"Content-Type": "application/json", **headers}, **kw)


def _status(loop: EngineLoop) -> dict:
    done = threading.Event()
    box: dict = {}

    def got(result, error) -> None:
        box.update(result or {"error": error}, live=len(loop.live))
        done.set()

    loop.call(loop.status_now, got)
    assert done.wait(T)
    return box


def _wait_idle(loop: EngineLoop, timeout_s: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        st = _status(loop)
        if st["live"] == 0 and st["running"] == 0 and st["waiting_prefill"] == 0:
            return st
        assert time.monotonic() < deadline, f"the request was not freed: {st}"
        time.sleep(0.05)


# ----------------------------------------------------------------------------- the happy paths

def test_models_health_metrics(client, server: UvicornThread) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(_url(server, "/health"), timeout=T).json()["status"] == "ok"
    client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, temperature=0)
    text = httpx.get(_url(server, "/metrics"), timeout=T).text  # open: no key
    assert 'epd_requests_total{endpoint="completions",outcome="success"}' in text
    for name in ("epd_time_to_first_token_seconds_bucket", "epd_time_per_output_token_seconds_bucket",
                 "epd_e2e_request_latency_seconds_bucket", 'epd_queue_length{stage="aggregated",state="running"}',
                 'epd_blocks_in_use{arena="kv",stage="aggregated"}', "epd_engine_up 1.0",
                 'epd_mm_cache_hits_total{stage="aggregated"}', 'epd_mm_cache_misses_total{stage="aggregated"}'):
        assert name in text, name


def test_chat_with_image_equals_llm_generate(client, llava_llm: LLM) -> None:
    r = client.chat.completions.create(model=MODEL, messages=_user("Describe it", IMAGE_URL), max_tokens=8,
                                       temperature=0, extra_body={"ignore_eos": True})
    tok = llava_llm.tokenizer
    prompt = tok.render_chat([{"role": "user", "content": "<image>Describe it"}])
    assert prompt == tok.build_prompt("<image>Describe it", 1)  # one user message: as the offline API renders it
    ref = llava_llm.generate(Request(prompt, images=[IMAGE_URL], raw_prompt=True),
                             SamplingParams(max_tokens=8, ignore_eos=True))[0]
    assert r.choices[0].message.content == ref.text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ref.prompt_token_ids), 8)
    m = r.model_extra["epd_metrics"]
    assert set(m) == {"ttft_s", "e2e_s", "tokens_per_s", "queue_s", "preprocess_s", "encode_s", "wait_s", "prefill_s",
                      "token_times_s", "handoff"}
    assert len(m["token_times_s"]) == 8 and m["encode_s"] > 0 and 0 < m["ttft_s"] <= m["e2e_s"]


def test_chat_stream(client) -> None:
    kw = dict(model=MODEL, messages=_user("What colour?", IMAGE_URL), max_tokens=10, temperature=0,
              extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert len(finals[0].model_extra["epd_metrics"]["token_times_s"]) == 10
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_completions_raw_prompt(client, llava_llm: LLM) -> None:
    ref = llava_llm.generate(Request("Once upon a time", raw_prompt=True), SamplingParams(max_tokens=6))[0]
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0)
    assert r.choices[0].text == ref.text and r.usage.prompt_tokens == len(ref.prompt_token_ids)
    streamed = client.completions.create(model=MODEL, prompt=["Once upon a time"], max_tokens=6, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == ref.text
    lp = client.completions.create(model=MODEL, prompt="Once", max_tokens=3, temperature=0, logprobs=2)
    assert len(lp.choices[0].logprobs.tokens) == 3 and len(lp.choices[0].logprobs.top_logprobs[0]) == 2


def test_multi_turn_and_sampling_fields(client, llava_llm: LLM) -> None:
    messages = [{"role": "system", "content": "Be brief."}, *_user("Describe it", IMAGE_URL),
                {"role": "assistant", "content": "A red box."}, {"role": "user", "content": "Again?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0.7, top_p=0.9,
                                       seed=3, n=2, stop=["zz", "qq"], presence_penalty=0.5, frequency_penalty=0.5,
                                       logprobs=True, top_logprobs=2, extra_body={"top_k": 5})
    rendered = llava_llm.tokenizer.render_chat([
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>Describe it"},
        {"role": "assistant", "content": "A red box."}, {"role": "user", "content": "Again?"}])
    assert rendered.count("USER:") == 2 and rendered.endswith("ASSISTANT:")
    assert r.usage.prompt_tokens == len(llava_llm.tokenize(rendered, 1, raw_prompt=True)[1])
    assert [c.index for c in r.choices] == [0, 1]
    assert len(r.choices[0].logprobs.content[0].top_logprobs) == 2
    again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0.7, seed=3)
    assert again.choices[0].message.content == client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=4, temperature=0.7, seed=3).choices[0].message.content


def test_local_and_http_image_urls(client, media_dir: Path) -> None:
    for url in (str(media_dir / "red.png"), "red.png", f"file://{media_dir / 'red.png'}"):
        r = client.chat.completions.create(model=MODEL, messages=_user("Hi", url), max_tokens=2)
        assert r.usage.completion_tokens >= 1

    png = _png((0, 200, 0))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200 if self.path == "/img.png" else 404)
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args) -> None:
            pass

    host = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{host.server_address[1]}"
        r = client.chat.completions.create(model=MODEL, messages=_user("Hi", f"{base}/img.png"), max_tokens=2)
        assert r.usage.completion_tokens >= 1
        with pytest.raises(openai.BadRequestError, match="answered 404"):
            client.chat.completions.create(model=MODEL, messages=_user("Hi", f"{base}/nope.png"), max_tokens=2)
    finally:
        host.shutdown()


# ----------------------------------------------------------------------------- bad requests

def _chat(**fields) -> dict:
    return {"model": MODEL, "messages": _user("Hi"), "max_tokens": 2, **fields}


def _chunks(n: int):
    yield b'{"model": "' + MODEL.encode() + b'", "prompt": "'
    for _ in range(n):
        yield b"a" * 65536
    yield b'"}'


BAD = [  # (id, path, body, extra, status, param or None, substring of the message)
    ("invalid-json", "/v1/chat/completions", b'{"model": ', {}, 400, "body", "invalid JSON"),
    ("not-an-object", "/v1/chat/completions", b"[1, 2]", {}, 400, "body", "must be a JSON object"),
    ("no-messages", "/v1/chat/completions", {"model": MODEL}, {}, 422, "messages", "messages: Field required"),
    ("bad-role", "/v1/chat/completions", _chat(messages=[{"role": "robot", "content": "x"}]), {}, 422,
     "messages.0.role", "messages.0.role"),
    ("unknown-model", "/v1/chat/completions", _chat(model="gpt-9"), {}, 404, "model", "'gpt-9' is not served"),
    ("not-an-image", "/v1/chat/completions",
     _chat(messages=_user("Hi", "data:image/png;base64," + base64.b64encode(b"hello").decode())), {}, 400, None,
     "cannot decode"),
    ("too-many-images", "/v1/chat/completions", _chat(messages=_user("Hi", IMAGE_URL, IMAGE_URL, IMAGE_URL)), {},
     400, None, "request has 3 images; at most 2 fit"),
    ("max-tokens-over-context", "/v1/chat/completions", _chat(max_tokens=5000), {}, 400, None,
     "> the context length 1024"),
    ("temperature", "/v1/chat/completions", _chat(temperature=-1), {}, 400, "temperature",
     "sampling.temperature = -1"),
    ("top-p", "/v1/chat/completions", _chat(top_p=0), {}, 400, "top_p", "sampling.top_p = 0"),
    ("stop-type", "/v1/chat/completions", _chat(stop=5), {}, 422, "stop", "stop"),
    ("wrong-key", "/v1/chat/completions", _chat(), {"key": "nope"}, 401, "authorization", "Bearer"),
    ("no-key", "/v1/models", None, {"key": None}, 401, "authorization", "Bearer"),
    ("content-length-over-cap", "/v1/completions", b"x" * (300 * 1024), {}, 413, "body", "--max-request-bytes"),
    ("streamed-body-over-cap", "/v1/completions", "chunks", {}, 413, "body", "more than 262144 bytes"),
    ("path-outside", "/v1/chat/completions", "outside", {}, 400, None, "outside the allowed media directory"),
    ("bad-scheme", "/v1/chat/completions", _chat(messages=_user("Hi", "ftp://x/y.png")), {}, 400, None,
     "unsupported URL scheme"),
    ("unknown-route", "/v1/nothing", {}, {}, 404, None, "/v1/nothing"),
]


@pytest.mark.parametrize(("path", "body", "extra", "status", "param", "expected"),
                         [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_request(server: UvicornThread, client, media_dir: Path, path: str, body, extra: dict, status: int,
                     param: str | None, expected: str) -> None:
    if body == "chunks":
        body = _chunks(5)  # no Content-Length: chunked, capped as it streams
    elif body == "outside":
        body = _chat(messages=_user("Hi", str(media_dir / ".." / "outside.png")))
    method = httpx.get if body is None else None
    if method is not None:
        key = extra.get("key", KEY)
        r = method(_url(server, path), headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=T)
    else:
        r = _post(server, path, body, key=extra.get("key", KEY))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert expected in err["message"] and {"message", "type", "param", "code"} <= set(err), err
    if param is not None:
        assert err["param"] == param, err
    # the server serves the next request as before
    ok = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=3, temperature=0)
    assert ok.usage.completion_tokens == 3 and ok.choices[0].text == _reference_text(client)


_REF: dict[str, str] = {}


def _reference_text(client) -> str:
    if "text" not in _REF:
        _REF["text"] = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=3,
                                                 temperature=0).choices[0].text
    return _REF["text"]


# ----------------------------------------------------------------------------- disconnects, admission, loading

def test_disconnect_mid_stream_aborts(server: UvicornThread, engine_loop: EngineLoop) -> None:
    body = _chat(messages=_user("Tell a story"), max_tokens=900, ignore_eos=True, stream=True)
    with httpx.Client(timeout=T) as c, c.stream("POST", _url(server, "/v1/chat/completions"), content=json.dumps(body),
                                                  headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(4):  # the role chunk and a few tokens
            while not next(lines).startswith("data: "):
                pass
        assert _status(engine_loop)["live"] == 1
    _wait_idle(engine_loop)
    metrics = httpx.get(_url(server, "/metrics"), timeout=T).text
    assert 'epd_requests_total{endpoint="chat",outcome="aborted"} 1.0' in metrics
    assert 'epd_requests_total{endpoint="chat",outcome="client_error"}' in metrics  # the bad requests before


def test_disconnect_without_stream_aborts(server: UvicornThread, engine_loop: EngineLoop) -> None:
    body = _chat(messages=_user("Tell a story"), max_tokens=900, ignore_eos=True)
    with pytest.raises(httpx.ReadTimeout):
        _post(server, "/v1/chat/completions", body, timeout=1.0)
    _wait_idle(engine_loop)


def test_max_waiting_answers_429(engine_loop: EngineLoop) -> None:
    srv = UvicornThread(build_app(engine_loop, MODEL, max_waiting=1), "127.0.0.1", 0).start()
    try:
        body = _chat(messages=_user("Tell a story"), max_tokens=900, ignore_eos=True, stream=True)
        with httpx.Client(timeout=T) as c, c.stream("POST", _url(srv, "/v1/chat/completions"),
                                                      content=json.dumps(body)) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # kept: a dropped iterator closes the stream (a disconnect: the request aborts)
            next(lines)
            busy = _post(srv, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1})
            assert busy.status_code == 429 and "--max-waiting" in busy.json()["error"]["message"]
        _wait_idle(engine_loop)
        deadline = time.monotonic() + T
        while (ok := _post(srv, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1})).status_code \
                == 429 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ok.status_code == 200
        assert 'outcome="rejected"} 1.0' in httpx.get(_url(srv, "/metrics"), timeout=T).text
    finally:
        assert srv.stop()


def test_health_503_while_loading() -> None:
    app = build_app(None, MODEL)
    srv = UvicornThread(app, "127.0.0.1", 0).start()
    try:
        assert httpx.get(_url(srv, "/health"), timeout=T).status_code == 503
        r = _post(srv, "/v1/completions", {"model": MODEL, "prompt": "x"})
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        assert "epd_engine_up 0.0" in httpx.get(_url(srv, "/metrics"), timeout=T).text
    finally:
        assert srv.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_epd_chat_and_sigterm(tiny_llava: Path) -> None:
    from test_signals import descendants, still_alive

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("EPD_AUTHKEY", "EPD_API_KEY")}
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "serve.py"), "--model", str(tiny_llava),
                             "--port", str(port), "--mode", "epd", "--placement", "E:cpu P:cpu D:cpu",
                             "--served-model-name", MODEL], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline, seen = time.monotonic() + 180, set()
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            try:
                code = httpx.get(base + "/health", timeout=5).status_code
                seen.add(code)
                if code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert 503 in seen  # the port answers while the stages load
        stages = descendants(proc.pid)
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=T)
        r = client.chat.completions.create(model=MODEL, messages=_user("Describe it", IMAGE_URL), max_tokens=5,
                                           temperature=0, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 5 and r.model_extra["epd_metrics"]["encode_s"] > 0
        assert "handoff" in r.model_extra["epd_metrics"]
        assert re.search(r'epd_queue_length\{stage="decode0",state="running"\}',
                         httpx.get(base + "/metrics", timeout=T).text)
        # a stage kind with no live process left: /health says broken (503)
        stage = min(pid for pid in stages if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text())
        os.kill(stage, signal.SIGKILL)
        deadline = time.monotonic() + T
        while (health := httpx.get(base + "/health", timeout=T)).status_code == 200:
            assert time.monotonic() < deadline, "a dead stage was never reported"
            time.sleep(0.1)
        assert health.status_code == 503 and health.json()["status"] == "broken", health.text
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=T)
        assert proc.returncode == 0, out
        assert "Traceback" not in out and "stopped" in out, out
        assert not still_alive(stages), out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
