"""Fault campaign against the RPC server: handshake garbage and silent clients, oversized
messages, engines that raise, dead EPD stages, shutdown from a signal handler, socket paths,
local image paths; and the tokenize / capture verbs."""

from __future__ import annotations

import _thread
import io
import os
import random
import re
import signal
import socket
import struct
import threading
import time
from multiprocessing.connection import AuthenticationError, Client, Connection
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from engine import LLM
from engine.sampling import RequestError
from ipc.client import RPCClient, RPCError
from ipc.connections import ClientConnection
from ipc.server import AddressError, AddressInUse, RPCServer, claim_address

KEY = b"fault-key"
OFF_TEXT = ("images[0]: local file paths are disabled on this server; start it with --allowed-local-media-path DIR, "
            "or send the image as bytes or a data URL")


def _png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _serve(srv: RPCServer) -> threading.Thread:
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    return thread


def _stop(srv: RPCServer, thread: threading.Thread) -> None:
    srv.shutdown()
    thread.join(timeout=30)
    assert not thread.is_alive(), "serve_forever did not return"


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="module")
def server(tiny_llava: Path, media_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One server for the campaign: it must survive every case, in order."""
    llm = LLM(tiny_llava, backend="torch", device="cpu")
    sock = tmp_path_factory.mktemp("sock") / "faults.sock"
    srv = RPCServer(llm, str(sock), KEY, handshake_timeout_s=1.0, max_message_bytes=1 << 20,
                    allowed_local_media_path=media_dir)
    thread = _serve(srv)
    yield srv
    _stop(srv, thread)
    assert not sock.exists(), "the socket file was left behind"


def _answered(srv: RPCServer, within_s: float = 10.0) -> None:
    """A normal client gets a generate answered within within_s."""
    start = time.monotonic()
    client = RPCClient(srv.address, KEY, timeout_s=within_s)
    msgs = list(client.generate("Hello there", max_tokens=3, ignore_eos=True))
    client.close()
    assert msgs[-1]["event"] == "done" and len(msgs[-1]["output"]["token_ids"]) == 3
    assert time.monotonic() - start < within_s


def _rejections(srv: RPCServer) -> dict[str, int]:
    return dict(srv.acceptor.stats()["rejected_connections_by_reason"])


def _wait_rejected(srv: RPCServer, before: dict[str, int], reasons: set[str], timeout_s: float = 10.0) -> str:
    """The reason of one new rejection (polled: the server counts after the client saw the end)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = _rejections(srv)
        grown = {r for r in now if now[r] > before.get(r, 0)}
        if grown:
            assert grown <= reasons, (grown, reasons)
            return grown.pop()
        time.sleep(0.02)
    raise AssertionError(f"no rejection counted (expected one of {reasons}); counts {_rejections(srv)}")


def _raw(srv: RPCServer) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(10)
    sock.connect(srv.address)
    return sock


def _read_challenge(sock: socket.socket) -> bytes:
    size = struct.unpack("!i", sock.recv(4, socket.MSG_WAITALL))[0]
    return sock.recv(size, socket.MSG_WAITALL)


def _until_eof(sock: socket.socket) -> None:
    """Read until the server hangs up (10 s at most); a reset (it closed with our bytes unread)
    is a hang-up too."""
    sock.settimeout(10)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass


# ---------------------------------------------------------------------- handshake campaign

def _connect_close(srv: RPCServer) -> None:
    _raw(srv).close()


def _random_bytes(srv: RPCServer) -> None:
    with _raw(srv) as sock:
        sock.sendall(random.Random(4096).randbytes(4096))
        _until_eof(sock)


def _http_get(srv: RPCServer) -> None:
    with _raw(srv) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        _until_eof(sock)


def _huge_length_prefix(srv: RPCServer) -> None:
    with _raw(srv) as sock:
        _read_challenge(sock)
        sock.sendall(struct.pack("!i", -1) + struct.pack("!Q", 1 << 62))
        _until_eof(sock)  # the server refuses it at once (it allocates nothing)


def _wrong_key(srv: RPCServer) -> None:
    with pytest.raises(AuthenticationError):
        Client(srv.address, authkey=b"not-the-key")


def _no_key(srv: RPCServer) -> None:
    with _raw(srv) as sock:
        assert b"CHALLENGE" in _read_challenge(sock)
        start = time.monotonic()
        _until_eof(sock)  # never answered: hung up at the handshake deadline (1 s)
        assert time.monotonic() - start < 5


CAMPAIGN = {
    "connect_close": (_connect_close, {"closed", "io_error"}),
    "random_bytes": (_random_bytes, {"bad_length", "auth_failed"}),
    "http_get": (_http_get, {"bad_length"}),
    "huge_length_prefix": (_huge_length_prefix, {"bad_length"}),
    "wrong_key": (_wrong_key, {"auth_failed"}),
    "no_key": (_no_key, {"timeout"}),
}


@pytest.mark.parametrize("case", list(CAMPAIGN))
def test_bad_handshake_is_counted_and_the_server_carries_on(server: RPCServer, case: str,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    attack, reasons = CAMPAIGN[case]
    before = _rejections(server)
    with caplog.at_level("WARNING", logger="ipc.connections"):
        attack(server)
        reason = _wait_rejected(server, before, reasons)
    assert any("rejected connection" in r.message and reason in r.message for r in caplog.records)
    _answered(server)
    status = RPCClient(server.address, KEY, timeout_s=10).status()
    assert status["rejected_connections_by_reason"][reason] >= 1
    assert status["rejected_connections"] == sum(status["rejected_connections_by_reason"].values())


def test_silent_clients_do_not_hold_up_others(server: RPCServer) -> None:
    """Eight clients connect and say nothing; a ninth is served at once, not after them."""
    server.acceptor.handshake_timeout_s = 30.0  # the silent ones stay pending for the whole test
    silent = []
    try:
        before = _rejections(server)
        silent = [_raw(server) for _ in range(8)]
        _answered(server, within_s=10.0)
        assert _rejections(server) == before  # they are still in their handshake
    finally:
        server.acceptor.handshake_timeout_s = 1.0
        for sock in silent:
            sock.close()


def test_oversized_message_after_auth_is_refused_without_allocating(server: RPCServer) -> None:
    conn = Client(server.address, authkey=KEY)
    os.write(conn.fileno(), struct.pack("!i", (1 << 20) + 1))  # the header of max_message_bytes + 1
    assert conn.poll(10)
    assert "max_message_bytes = 1048576" in conn.recv()["error"]
    assert conn.poll(10)
    with pytest.raises(EOFError):
        conn.recv()  # then hung up: the stream cannot be resynchronised
    conn = Client(server.address, authkey=KEY)
    os.write(conn.fileno(), struct.pack("!i", -1) + struct.pack("!Q", 1 << 62))  # a 4 EiB message
    assert conn.poll(10) and "max_message_bytes" in conn.recv()["error"]
    _answered(server)


def test_undecodable_message_gets_an_error_and_the_connection_goes_on(server: RPCServer) -> None:
    client = RPCClient(server.address, KEY, timeout_s=10)
    client.conn.send_bytes(b"\x80\x05not a pickle")
    assert client.conn.poll(10) and "malformed message" in client.conn.recv()["error"]
    client.conn.send_bytes(b"")  # a frame no client sends: answered, then hung up
    assert client.conn.poll(10) and "empty or negative-length" in client.conn.recv()["error"]
    with pytest.raises(RPCError, match="closed the connection"):
        client.status()
    assert RPCClient(server.address, KEY, timeout_s=10).status()["running"] == 0


def test_replies_to_a_client_that_does_not_read_never_block_the_sender() -> None:
    """ClientConnection.send queues: with the peer's socket full, 10000 sends return at once and
    the connection is hung up once max_queued replies pile up (before: the engine thread
    blocked in send and every client stalled)."""
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    client = ClientConnection(Connection(ours.detach()), "slow", max_queued=100)
    start = time.monotonic()
    for i in range(10_000):
        client.send({"id": i, "event": "token", "text": "x" * 100})
    assert time.monotonic() - start < 2.0
    assert not client.open
    client.finish(timeout_s=5)
    theirs.settimeout(10)
    while theirs.recv(65536):  # the peer sees what fit, then EOF
        pass
    theirs.close()


def test_client_timeout_on_a_server_that_never_answers(tmp_path: Path) -> None:
    path = str(tmp_path / "mute.sock")
    mute = socket.socket(socket.AF_UNIX)
    mute.bind(path)
    mute.listen(4)  # accepts (in the backlog) and never says a word
    try:
        start = time.monotonic()
        with pytest.raises(RPCError, match="did not complete the key handshake within 0.5 s"):
            RPCClient(path, KEY, timeout_s=0.5)
        assert time.monotonic() - start < 5
    finally:
        mute.close()


# ---------------------------------------------------------------------- engines that raise

class _FailingEngine:
    """Every method but has_work raises (step only once a request is in)."""

    mode = "fake"

    def __init__(self, add_fails: bool) -> None:
        self.add_fails = add_fails
        self.seqs: list[SimpleNamespace] = []

    def add_request(self, request, sampling, arrival=None):
        if self.add_fails:
            raise RuntimeError("add_request exploded")
        self.seqs.append(SimpleNamespace(seq_id=len(self.seqs)))
        return self.seqs[-1]

    def has_work(self) -> bool:
        return bool(self.seqs)

    def step(self, timeout_s: float = 0.05):
        raise RuntimeError("step exploded")

    def abort(self, seq) -> None:
        self.seqs = [s for s in self.seqs if s is not seq]
        raise RuntimeError("abort exploded")

    def status(self) -> dict:
        raise RuntimeError("status exploded")


@pytest.mark.parametrize("add_fails", [True, False], ids=["add_request", "step"])
def test_engine_exceptions_fail_the_call_not_the_server(tmp_path: Path, add_fails: bool,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    srv = RPCServer(_FailingEngine(add_fails), str(tmp_path / "f.sock"), KEY)
    thread = _serve(srv)
    client = RPCClient(srv.address, KEY, timeout_s=10)
    expected = "add_request exploded" if add_fails else "engine step failed: RuntimeError: step exploded"
    with caplog.at_level("ERROR", logger="ipc.server"):
        for _ in range(2):  # and again: the engine thread is still there
            with pytest.raises(RPCError, match=expected):
                list(client.generate("Hi", max_tokens=2))
    assert any(r.levelname == "ERROR" and r.exc_info for r in caplog.records)  # the traceback is logged
    status = client.status()
    assert status["engine_status_error"] == "RuntimeError: status exploded" and status["errors"] >= 1
    client.stop()
    thread.join(timeout=30)
    assert not thread.is_alive()


def test_dead_prefill_and_decode_in_epd(tiny_llava: Path, llava_llm: LLM, tmp_path: Path) -> None:
    """The last prefill and decode processes are killed: generate fails naming the stage, status
    answers, stop returns and serve_forever ends (before: the engine thread died on StageError
    and nothing answered again)."""
    from engine.epd import EPDEngine

    epd = EPDEngine(tiny_llava, placement="E:cpu P:cpu D:cpu", backend="torch", device="cpu")
    try:
        srv = RPCServer(epd, str(tmp_path / "epd.sock"), KEY)
        thread = _serve(srv)
        client = RPCClient(srv.address, KEY, timeout_s=30)
        text, ids = llava_llm.tokenize("Describe it", 1)
        assert client.tokenize("Describe it", images=[_png(0)]) == (ids, text)
        with pytest.raises(RPCError, match="in epd mode the decode stages capture their graphs at start"):
            client.capture_start()
        assert len(list(client.generate("Hi", images=[_png(1)], max_tokens=3, ignore_eos=True))) == 4
        for name in ("prefill0", "decode0"):
            epd.procs[name].kill()
            epd.procs[name].join(timeout=10)
        with pytest.raises(RPCError, match=r"stage (prefill0|decode0) died"):
            list(client.generate("Hi", max_tokens=3))
        with pytest.raises(RPCError, match="engine is broken"):
            list(client.generate("Hi again", max_tokens=3))
        status = client.status()
        assert status["stages_alive"]["prefill0"] is False and status["broken"]
        start = time.monotonic()
        client.stop()
        thread.join(timeout=30)
        assert not thread.is_alive() and time.monotonic() - start < 30
    finally:
        epd.shutdown()


# ---------------------------------------------------------------------- shutdown

def test_shutdown_from_a_signal_handler_while_serving_in_the_main_thread(llava_llm: LLM, tmp_path: Path) -> None:
    path = tmp_path / "sig.sock"
    srv = RPCServer(llava_llm, str(path), KEY)
    seen: dict[str, object] = {}

    def client_side() -> None:
        client = RPCClient(srv.address, KEY, timeout_s=20)
        stream = client.generate("A long answer", max_tokens=900, ignore_eos=True)
        next(stream)  # a live request
        os.kill(os.getpid(), signal.SIGUSR1)
        try:
            for _ in stream:
                pass
        except RPCError as e:
            seen["error"] = str(e)

    previous = signal.signal(signal.SIGUSR1, lambda *_: srv.shutdown())
    watchdog = threading.Timer(60, srv.stopping.set)  # never hang the test session
    worker = threading.Thread(target=client_side, daemon=True)
    try:
        watchdog.start()
        worker.start()
        srv.serve_forever()  # here, in the main thread, as the CLI runs it
    finally:
        watchdog.cancel()
        signal.signal(signal.SIGUSR1, previous)
    worker.join(timeout=20)
    assert seen.get("error") == "server stopped"
    assert not path.exists(), "the socket file was left behind"


def test_interrupted_serve_forever_still_cleans_up(llava_llm: LLM, tmp_path: Path) -> None:
    """KeyboardInterrupt inside serve_forever (no signal handler installed): the socket file is
    removed and connected clients are hung up."""
    path = tmp_path / "int.sock"
    srv = RPCServer(llava_llm, str(path), KEY)
    connected = threading.Event()
    peer: list[RPCClient] = []

    def interrupt() -> None:
        peer.append(RPCClient(srv.address, KEY, timeout_s=20))  # serve_forever is running
        connected.set()
        _thread.interrupt_main()

    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        srv.serve_forever()
    assert connected.is_set() and not path.exists()
    assert peer[0].conn.poll(10)
    with pytest.raises(EOFError):
        peer[0].conn.recv()


# ---------------------------------------------------------------------- socket paths

def _stale_socket(path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()  # the file stays, nothing listens: what a killed server leaves


def test_stale_socket_is_replaced(llava_llm: LLM, tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    _stale_socket(path)
    claim_address(str(path))
    assert not path.exists()
    _stale_socket(path)
    srv = RPCServer(llava_llm, str(path), KEY)  # binds over the stale file (before: Address already in use)
    thread = _serve(srv)
    _answered(srv)
    _stop(srv, thread)
    assert not path.exists()


def test_live_socket_and_regular_file_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "live.sock"
    live = RPCServer(_FailingEngine(True), str(path), KEY)
    thread = _serve(live)
    with pytest.raises(AddressInUse, match=f"socket {path} is in use by a live server; stop it or pick another"):
        claim_address(str(path))
    with pytest.raises(AddressInUse):
        RPCServer(_FailingEngine(True), str(path), KEY)
    assert path.exists() and "engine_status_error" in RPCClient(str(path), KEY, timeout_s=10).status()  # serves on
    _stop(live, thread)
    assert not path.exists()
    regular = tmp_path / "notes.txt"
    regular.write_text("keep me")
    with pytest.raises(AddressError, match="exists and is not a socket"):
        claim_address(str(regular))
    assert regular.read_text() == "keep me"


def test_tcp_port_in_use_is_refused() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(AddressInUse, match=f"port 127.0.0.1:{port} is in use"):
            claim_address(("127.0.0.1", port))
    claim_address(("127.0.0.1", port))  # free again


def test_server_removes_only_its_own_socket_file(tmp_path: Path) -> None:
    path = tmp_path / "own.sock"
    srv = RPCServer(_FailingEngine(True), str(path), KEY)
    thread = _serve(srv)
    path.unlink()
    _stale_socket(path)  # someone else's socket at the same path now
    _stop(srv, thread)
    assert path.exists()
    never_served = RPCServer(_FailingEngine(True), str(tmp_path / "idle.sock"), KEY)
    never_served.close()
    assert not (tmp_path / "idle.sock").exists()


# ---------------------------------------------------------------------- local image paths

class _RecordingEngine(_FailingEngine):
    def __init__(self) -> None:
        super().__init__(add_fails=True)

    def add_request(self, request, sampling, arrival=None):
        raise RequestError(f"got images {request.images!r}")


def test_local_image_paths_are_off_by_default(tmp_path: Path) -> None:
    image = tmp_path / "cat.png"
    image.write_bytes(_png(0))
    srv = RPCServer(_RecordingEngine(), str(tmp_path / "m.sock"), KEY)
    thread = _serve(srv)
    client = RPCClient(srv.address, KEY, timeout_s=10)
    for path in (str(image), image):
        with pytest.raises(RPCError) as info:
            list(client.generate("Hi", images=[path]))
        assert str(info.value) == OFF_TEXT
    data_url = "data:image/png;base64,AAAA"
    for ok in (_png(0), data_url):  # bytes and data URLs reach the engine untouched
        with pytest.raises(RPCError, match="got images"):
            list(client.generate("Hi", images=[ok]))
    with pytest.raises(RPCError, match=OFF_TEXT.replace("[0]", r"\[0\]")):
        client.kv_init("Hi", images=[str(image)])
    _stop(srv, thread)


def test_local_image_paths_inside_the_allowed_directory(server: RPCServer, media_dir: Path, tmp_path: Path) -> None:
    (media_dir / "sub").mkdir(exist_ok=True)
    (media_dir / "sub" / "cat.png").write_bytes(_png(3))
    outside = tmp_path / "secret.png"
    outside.write_bytes(_png(4))
    link = media_dir / "link.png"
    if not link.exists():
        link.symlink_to(outside)
    inner_link = media_dir / "inner.png"
    if not inner_link.exists():
        inner_link.symlink_to(media_dir / "sub" / "cat.png")
    client = RPCClient(server.address, KEY, timeout_s=30)
    reference = list(client.generate("Describe", images=[_png(3)], max_tokens=4, ignore_eos=True))[-1]
    for ok in (str(media_dir / "sub" / "cat.png"), "sub/cat.png", str(inner_link), str(media_dir / "x/../sub/cat.png")):
        out = list(client.generate("Describe", images=[ok], max_tokens=4, ignore_eos=True))[-1]
        assert out["output"]["token_ids"] == reference["output"]["token_ids"], ok
    escapes = [str(outside), str(link), "../" + outside.name, str(media_dir / ".." / outside.name),
               f"sub/../../{outside.name}"]
    for bad in escapes:
        with pytest.raises(RPCError, match=re.escape(f"is outside the allowed media directory {media_dir.resolve()}")):
            list(client.generate("Describe", images=[_png(1), bad]))
    with pytest.raises(RPCError, match=r"images\[1\]"):
        list(client.generate("Describe", images=[_png(1), str(link)]))


# ---------------------------------------------------------------------- tokenize, capture verbs

def test_tokenize_matches_what_generate_prefills(server: RPCServer) -> None:
    client = RPCClient(server.address, KEY, timeout_s=30)
    done = list(client.generate("What is shown here?", images=[_png(2)], max_tokens=2, ignore_eos=True))[-1]
    ids, text = client.tokenize("What is shown here?", images=1)
    assert ids == done["output"]["prompt_token_ids"] and "What is shown here?" in text and text != ids
    assert client.tokenize("What is shown here?", images=[_png(2)]) == (ids, text)
    raw_ids, raw_text = client.tokenize("plain words", raw_prompt=True)
    assert raw_text == "plain words" and len(raw_ids) < len(client.tokenize("plain words")[0])
    with pytest.raises(RPCError, match=r"tokenize: params.images must be a count"):
        client.tokenize("x", images=-1)
    with pytest.raises(RPCError, match="1 <image> tag"):
        client.tokenize("one <image> tag", images=2)
    with pytest.raises(RPCError, match="lone surrogate"):
        client.tokenize("bad \ud800 text")


CPU_CAPTURE = "CUDA graphs need the cuda backend on a GPU; this server runs the torch backend on cpu"


def test_capture_verbs_on_the_cpu_say_why_not(server: RPCServer) -> None:
    client = RPCClient(server.address, KEY, timeout_s=10)
    for call in (client.capture_start, client.capture_stop, lambda: client.capture_wait(1.0)):
        with pytest.raises(RPCError) as info:
            call()
        assert str(info.value) == CPU_CAPTURE
    with pytest.raises(RPCError, match=r"capture_wait: params.timeout_s = -1; must be a number in \[0, 86400\]"):
        next(client.call("capture_wait", timeout_s=-1))
    status = client.status()
    assert (status["decode_graphs_captured"], status["decode_graphs_pending"], status["decode_graphs_capture"]) \
        == ([], [], "unavailable")


def _fake_graphs(monkeypatch: pytest.MonkeyPatch):
    from graphs.decode_graphs import DecodeGraphs

    # nothing runs a step here: capture is faked, so the step's dependencies may be empty
    graphs = DecodeGraphs(model=None, ops=None, kv_arena=None, block_size=16, penalty_counts=None,
                          penalty_prompt_mask=None, device=torch.device("cpu"), max_batch=64, max_blocks_per_seq=4)
    monkeypatch.setattr(graphs, "warm_up", lambda: None)
    return graphs


def test_decode_graphs_capture_stops_after_the_bucket_in_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    graphs = _fake_graphs(monkeypatch)
    order: list[int] = []

    def fake_capture(rows: int, stream=None) -> None:
        order.append(rows)
        if len(order) == 2:
            graphs.stop_capture()  # asked while bucket 48 is being captured
        graphs.graphs[rows] = object()

    monkeypatch.setattr(graphs, "capture", fake_capture)
    assert graphs.pending == [64, 48, 32, 24, 16, 8, 4, 2, 1] and graphs.capture_state == "idle"
    graphs.capture_all()
    assert order == [64, 48]  # the bucket in progress finished, no other started
    assert graphs.pending == [32, 24, 16, 8, 4, 2, 1] and graphs.capture_state == "stopped"
    graphs.capture_all()  # resumes with what is pending, largest first
    assert order == [64, 48, 32, 24, 16, 8, 4, 2, 1]
    assert graphs.pending == [] and graphs.capture_state == "idle" and graphs.join_capture(0)


# ---------------------------------------------------------------------- GPU: the real capture verbs

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_capture_verbs_on_the_gpu(tmp_path: Path) -> None:
    try:
        from epd_kernels import _epd_C  # noqa: F401
    except ImportError:
        pytest.skip("epd_kernels._epd_C is not built")
    from scripts.make_tiny_model import make_tiny_llava

    model = make_tiny_llava(tmp_path / "small-llava", dtype=torch.bfloat16,
                            vision_sizes={"hidden_size": 128, "num_attention_heads": 2, "intermediate_size": 256},
                            text_sizes={"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 4,
                                        "intermediate_size": 512})
    llm = LLM(model, backend="cuda", device="cuda", kv_cache_tokens=4096, max_num_seqs=8, cuda_graphs=False)
    buckets = llm.runner.decode_graphs.buckets
    srv = RPCServer(llm, str(tmp_path / "gpu.sock"), KEY)
    thread = _serve(srv)
    client = RPCClient(srv.address, KEY, timeout_s=120)
    prompts = ["Count the birds", "Hello", "What colour is the sky?"]

    def answers() -> list[list[int]]:
        return [list(client.generate(p, max_tokens=16, ignore_eos=True))[-1]["output"]["token_ids"] for p in prompts]

    eager = answers()
    status = client.status()
    assert status["decode_graphs_pending"] == sorted(buckets, reverse=True) and status["decode_graphs_captured"] == []
    started = client.capture_start()
    assert started["started"] is True
    stopped = client.capture_stop()
    assert stopped["state"] in ("running", "stopped", "idle")
    after_stop = client.capture_wait(60)  # ends at once if the stop came before the first bucket began
    assert after_stop["state"] in ("stopped", "idle")
    assert sorted(after_stop["captured"] + after_stop["pending"]) == sorted(buckets)
    assert client.capture_start()["started"] is bool(after_stop["pending"])  # resumes what is left
    done = client.capture_wait(120)
    assert done == {"captured": sorted(buckets), "pending": [], "state": "idle"}
    assert client.capture_start()["started"] is False  # all captured: a no-op
    assert answers() == eager  # graph replay == eager decode
    _stop(srv, thread)
