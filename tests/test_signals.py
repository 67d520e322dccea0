"""scripts/serve.py under signals, in every server mode: SIGTERM and SIGINT stop it as the `stop`
call does (exit 0, no traceback, the stream in flight ends with "server stopped" or its full
answer, the socket file removed, no descendant process left, no /dev/shm arena left); a socket
left by a SIGKILLed server is replaced on restart; a live one is refused before the model loads."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ipc.client import RPCClient, RPCError

ROOT = Path(__file__).resolve().parents[1]
KEY = "signal-test-key"
EPD_PLACEMENT = "E:cpu,cpu P:cpu D:cpu"
START_TIMEOUT_S = 180  # four stage processes importing torch on a busy 2-core machine


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(ppid, start time, state) of a process, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text.rpartition(")")[2].split()  # after "pid (comm)": state ppid ... starttime is field 22
    return int(fields[1]), int(fields[19]), fields[0]


def descendants(root: int) -> dict[int, int]:
    """Every live descendant of root: pid -> start time (to tell a reused pid apart)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            children.setdefault(st[0], []).append(int(entry))
            starts[int(entry)] = st[1]
    found, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = starts[child]
            todo.append(child)
    return found


def still_alive(procs: dict[int, int], timeout_s: float = 20.0) -> list[int]:
    """The pids of procs still running after timeout_s (zombies count as gone)."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [pid for pid, start in procs.items()
                 if (st := _stat(pid)) is not None and st[1] == start and st[2] != "Z"]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def shm_arenas() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("epd-*")}


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def start_server(model: Path, sock: Path, log: Path, mode: str = "aggregated") -> subprocess.Popen:
    args = [sys.executable, str(ROOT / "scripts" / "serve.py"), "--model", str(model), "--socket", str(sock),
            "--device", "cpu", "--backend", "torch", "--mode", mode]
    if mode != "aggregated":
        args += ["--placement", EPD_PLACEMENT]
    with log.open("w") as err:
        return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "EPD_AUTHKEY": KEY})


def connect(proc: subprocess.Popen, sock: Path, log: Path) -> RPCClient:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        assert proc.poll() is None, f"server exited with {proc.returncode}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"server not up in {START_TIMEOUT_S} s:\n{log.read_text()}"
        if sock.exists():
            try:
                return RPCClient(str(sock), KEY.encode(), timeout_s=30)
            except (OSError, RPCError):
                pass
        time.sleep(0.2)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


@pytest.mark.parametrize("mode", ["aggregated", "epd"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_cleanly(tiny_llava: Path, tmp_path: Path, mode: str, signum: int) -> None:
    sock, log = tmp_path / "serve.sock", tmp_path / "stderr.txt"
    arenas_before = shm_arenas()
    proc = start_server(tiny_llava, sock, log, mode)
    try:
        client = connect(proc, sock, log)
        family = descendants(proc.pid)
        if mode == "epd":  # two encoders, prefill and decode (and multiprocess's resource tracker)
            assert len(family) >= 4, family
        max_tokens = 400
        stream = client.generate("Describe the picture in detail.", images=[png_bytes()] if mode == "epd" else [],
                                 max_tokens=max_tokens, ignore_eos=True)
        assert next(stream)["event"] == "token"  # the request is in flight
        os.kill(proc.pid, signum)
        outcome = None
        try:
            for msg in stream:
                if msg["event"] == "done":
                    outcome = msg
        except RPCError as e:
            outcome = str(e)
        assert proc.wait(timeout=90) == 0, log.read_text()
    finally:
        stop(proc)
    err = log.read_text()
    assert "Traceback" not in err and "terminate called" not in err, err
    assert outcome == "server stopped" or (isinstance(outcome, dict)
                                           and len(outcome["output"]["token_ids"]) == max_tokens), outcome
    assert f"{signal.Signals(signum).name}: stopping the server" in err, err
    assert not sock.exists(), "socket file left behind"
    assert still_alive(family) == [], f"orphans: {still_alive(family, 0)} of {len(family)} descendants"
    assert shm_arenas() - arenas_before == set(), "arena files left in /dev/shm"


def test_stale_socket_restart_and_live_socket_refused(tiny_llava: Path, tmp_path: Path) -> None:
    sock = tmp_path / "serve.sock"
    first = start_server(tiny_llava, sock, tmp_path / "first.txt")
    try:
        connect(first, sock, tmp_path / "first.txt").status()
        first.kill()  # SIGKILL: no clean-up, the socket file stays
        first.wait(timeout=30)
    finally:
        stop(first)
    assert sock.exists(), "SIGKILL should leave the socket file (the case under test)"

    second_log = tmp_path / "second.txt"
    second = start_server(tiny_llava, sock, second_log)
    try:
        client = connect(second, sock, second_log)  # the stale file was replaced
        done = list(client.generate("Hello", max_tokens=3, ignore_eos=True))[-1]
        assert len(done["output"]["token_ids"]) == 3

        third_log = tmp_path / "third.txt"
        started = time.monotonic()
        third = start_server(tiny_llava, sock, third_log)
        try:
            rc = third.wait(timeout=120)
        finally:
            stop(third)
        elapsed = time.monotonic() - started
        err = third_log.read_text()
        assert rc == 2, err
        lines = [line for line in err.splitlines() if line.strip()]
        assert lines[-1].startswith("error: ") and str(sock) in lines[-1], err
        assert "Traceback" not in err and "LLM ready" not in err, err  # refused before the model loaded
        assert elapsed < 30, f"the refusal took {elapsed:.1f} s"
        assert client.status()["mode"] == "aggregated"  # the live server is untouched
        os.kill(second.pid, signal.SIGTERM)
        assert second.wait(timeout=60) == 0, second_log.read_text()
    finally:
        stop(second)
    assert not sock.exists()
