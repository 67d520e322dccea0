"""The RPC server on the torch backend: streaming generate, concurrency, auth, bad calls, stop."""

from __future__ import annotations

import threading
import time
from multiprocessing.connection import AuthenticationError, Client
from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from ipc.client import RPCClient, RPCError
from ipc.server import RPCServer

KEY = b"test-key"


@pytest.fixture()
def server(tiny_llama: Path, tmp_path: Path):
    llm = LLM(tiny_llama, backend="torch", device="cpu")
    srv = RPCServer(llm, str(tmp_path / "epd.sock"), KEY)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    if not srv.stopping.is_set():  # a test may have stopped it already
        RPCClient(srv.address, KEY).stop()
    thread.join(timeout=30)
    assert not thread.is_alive(), "server did not shut down"


def _collect(client: RPCClient, prompt: str, **sampling) -> tuple[str, dict]:
    text, done = "", None
    for msg in client.generate(prompt, **sampling):
        if msg["event"] == "token":
            text += msg["text"]
        else:
            done = msg["output"]
    return text, done


def test_generate_streams_the_offline_result(server: RPCServer, tiny_llama: Path) -> None:
    text, out = _collect(RPCClient(server.address, KEY), "Count the birds", max_tokens=10, ignore_eos=True)
    ref = LLM(tiny_llama, backend="torch", device="cpu").generate(
        "Count the birds", SamplingParams(max_tokens=10, ignore_eos=True))[0]
    assert out["token_ids"] == ref.token_ids and text == out["text"] == ref.text


def test_concurrent_clients(server: RPCServer) -> None:
    results: dict[int, list[int]] = {}

    def run(i: int) -> None:
        _, out = _collect(RPCClient(server.address, KEY), f"Prompt number {i}", max_tokens=8, ignore_eos=True)
        results[i] = out["token_ids"]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == [0, 1, 2, 3] and all(len(v) == 8 for v in results.values())
    alone = _collect(RPCClient(server.address, KEY), "Prompt number 2", max_tokens=8, ignore_eos=True)[1]
    assert alone["token_ids"] == results[2]  # batching with others changed nothing


def test_wrong_key_is_rejected_and_server_carries_on(server: RPCServer) -> None:
    with pytest.raises(AuthenticationError):
        Client(server.address, authkey=b"wrong")
    client = RPCClient(server.address, KEY)
    assert _collect(client, "Hello", max_tokens=3)[1]["token_ids"]
    for _ in range(100):  # counted by the connection's own thread, after the client saw the failure
        status = client.status()
        if status["rejected_connections"] >= 1:
            break
        time.sleep(0.05)
    assert status["rejected_connections_by_reason"]["auth_failed"] >= 1


def test_malformed_calls_get_errors(server: RPCServer) -> None:
    client = RPCClient(server.address, KEY)
    client.conn.send(["not", "a", "dict"])
    assert "a call is a dict" in client.conn.recv()["error"]
    with pytest.raises(RPCError, match="unknown method 'launch'"):
        next(client.call("launch"))
    with pytest.raises(RPCError, match="sampling.temperature"):
        next(client.generate("Hi", temperature=-1.0))
    with pytest.raises(RPCError, match="params.prompt must be a string"):
        next(client.call("generate", prompt=5))
    with pytest.raises(RPCError, match="unknown params"):
        next(client.call("generate", prompt="x", colour="red"))
    with pytest.raises(RPCError, match="context length"):
        next(client.generate("Hi", max_tokens=100000))
    assert _collect(client, "Still fine?", max_tokens=3)[1]["token_ids"]


def test_disconnect_mid_stream_frees_blocks(server: RPCServer) -> None:
    client = RPCClient(server.address, KEY)
    stream = client.generate("A long answer please", max_tokens=200, ignore_eos=True)
    next(stream)
    client.close()
    probe = RPCClient(server.address, KEY)
    for _ in range(200):
        status = probe.status()
        if status["running"] == 0 and status["kv_blocks_free"] == status["kv_blocks_total"]:
            break
    assert status["kv_blocks_free"] == status["kv_blocks_total"]


def test_status_and_stop(server: RPCServer) -> None:
    client = RPCClient(server.address, KEY)
    _collect(client, "Hi", max_tokens=2)
    status = client.status()
    assert status["requests"] >= 1 and status["finished"] >= 1 and status["running"] == 0
    client.stop()
    assert server.stopping.is_set()  # set before the reply (the fixture's teardown relies on it)


def test_calls_after_stop_get_an_error_not_a_hang(server: RPCServer) -> None:
    """A client connected before `stop` gets an error for its next call instead of waiting
    forever on an engine that is gone."""
    other = RPCClient(server.address, KEY)
    RPCClient(server.address, KEY).stop()
    # once the engine is gone the server hangs up: the other client sees EOF (before the fix its
    # next call was queued for the engine and waited forever)
    assert other.conn.poll(30), "the server did not hang up on its other client"
    result: list[BaseException | None] = []

    def call() -> None:
        try:
            other.status()
            result.append(None)
        except BaseException as e:  # noqa: BLE001  (asserted below)
            result.append(e)

    waiter = threading.Thread(target=call, daemon=True)
    waiter.start()
    waiter.join(timeout=30)
    assert result and isinstance(result[0], RPCError), result or "the call hung"
    assert "closed the connection" in str(result[0])


@pytest.mark.parametrize("mode", ["aggregated", "epd"])
def test_serve_script_end_to_end(mode: str, tiny_llava: Path, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys
    import time

    sock = tmp_path / "serve.sock"
    env = {**os.environ, "EPD_AUTHKEY": KEY.decode()}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, str(root / "scripts" / "serve.py"), "--model", str(tiny_llava),
                             "--socket", str(sock), "--device", "cpu", "--mode", mode], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not sock.exists():
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.2)
        client = RPCClient(str(sock), KEY)
        assert len(_collect(client, "Hello", max_tokens=4, ignore_eos=True)[1]["token_ids"]) == 4
        assert client.status()["mode"] == mode
        client.stop()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_script_needs_a_key(tiny_llama: Path) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "EPD_AUTHKEY"}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "scripts" / "serve.py"), "--model", str(tiny_llama),
                           "--api", "rpc"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "EPD_AUTHKEY" in proc.stderr


def test_kv_sessions(server: RPCServer, tiny_llama: Path) -> None:
    client = RPCClient(server.address, KEY)
    offline = LLM(tiny_llama, backend="torch", device="cpu")
    prompt = "Tell me about the sky"
    ref = offline.generate(prompt, SamplingParams(max_tokens=12, ignore_eos=True))[0]
    session, first = client.kv_init(prompt, max_tokens=1)
    assert first == ref.token_ids[0]
    assert client.kv_step(session, token_id=ref.token_ids[0]) == ref.token_ids[1]  # forcing the sampled token
    assert client.kv_generate(session, 10) == ref.token_ids[2:12]  # 10 steps back to back
    # teacher forcing with other tokens: deterministic across sessions, and it changes the answer
    forced = [7, 100, 300, 450]
    a = [client.kv_step(client.kv_init(prompt, max_tokens=1)[0], token_id=t) for t in forced]
    b = [client.kv_step(client.kv_init(prompt, max_tokens=1)[0], token_id=t) for t in forced]
    assert a == b and any(x != ref.token_ids[1] for x in a)
    with pytest.raises(RPCError, match="num_steps = 0"):
        client.kv_generate(session, 0)
    with pytest.raises(RPCError, match="no kv session 999"):
        client.kv_step(999)
    with pytest.raises(RPCError, match="outside the vocabulary"):
        client.kv_step(session, token_id=10**9)
    assert client.status()["kv_sessions"] == 1 + 2 * len(forced)
    assert client.kv_close(session) == len(ref.prompt_token_ids) + 12
    other = RPCClient(server.address, KEY)
    with pytest.raises(RPCError, match="on this connection"):
        other.kv_step(1 + 1)  # sessions belong to their connection
    client.close()  # disconnect closes the remaining sessions
    for _ in range(100):
        status = other.status()
        if status["kv_sessions"] == 0:
            break
    assert status["kv_sessions"] == 0 and status["kv_blocks_free"] == status["kv_blocks_total"]
