"""RPC server in front of one engine: authenticated local socket, streaming generate, status, stop.

Transport: multiprocessing.connection (HMAC challenge with the authkey before any message is
read). A call is a dict {"id": any, "method": str, "params": dict}; replies carry the call's id:
  generate -> {"id", "event": "token", "token_id", "text"} ... then {"id", "event": "done", "output"}
  status   -> {"id", "event": "status", "status": {...}}
  stop     -> {"id", "event": "stopping"}; the server drains nothing further, shuts down and hangs
              up every connection (a client's later call ends with RPCError, never a hang)
  kv_init(prompt, images, raw_prompt, sampling) -> {"event": "session", "session", "token_id"}
  kv_step(session, token_id=None) / kv_generate(session, num_steps) -> {"event": "tokens", "token_ids"}
  kv_close(session) -> {"event": "closed", "num_tokens"}   (see ipc/sessions.py)
  any bad call -> {"id", "error": "<message naming the field>"}; the server carries on.
One engine thread owns the engine (the in-process `LLM` or the `EPDEngine` orchestrator: both
have add_request / step / abort / has_work / status); connection threads only parse calls and
queue them. kv sessions need the in-process engine (they drive its runner directly).
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
from dataclasses import asdict
from multiprocessing.connection import Connection, Listener
from typing import Any

from engine.epd import EPDEngine
from engine.images import ImageError
from engine.llm import LLM
from engine.request import Request, Sequence
from engine.sampling import RequestError, SamplingParams
from ipc.sessions import KVSessions

log = logging.getLogger(__name__)
METHODS = ("generate", "status", "stop", "kv_init", "kv_step", "kv_generate", "kv_close")
_SAMPLING_FIELDS = set(SamplingParams.__dataclass_fields__)


class _Client:
    """One connection: a lock so the engine and connection threads never interleave sends."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()
        self.open = True

    def send(self, msg: dict) -> None:
        with self.lock:
            if not self.open:
                return
            try:
                self.conn.send(msg)
            except (OSError, EOFError, BrokenPipeError):
                self.open = False

    def hang_up(self) -> None:
        """End the connection both ways: a read blocked on it, ours or the peer's, sees EOF."""
        with self.lock:
            self.open = False
            try:
                with socket.socket(fileno=os.dup(self.conn.fileno())) as sock:
                    sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # already closed
                pass


class RPCServer:
    def __init__(self, llm: LLM | EPDEngine, address: str | tuple[str, int], authkey: bytes) -> None:
        if not authkey:
            raise ValueError("authkey must be non-empty")
        self.llm = llm
        self.listener = Listener(address, authkey=authkey)
        self.address = self.listener.address
        self.inbox: queue.Queue = queue.Queue()  # (client, call id, method, params)
        self.live: dict[int, tuple[_Client, Any, Sequence]] = {}  # seq_id -> (client, call id, seq)
        self.sessions = KVSessions(llm) if isinstance(llm, LLM) else None
        self.session_owner: dict[int, _Client] = {}
        self.stopping = threading.Event()
        self.clients: set[_Client] = set()  # open connections, hung up at shutdown
        self.clients_lock = threading.Lock()
        self.stats = {"requests": 0, "finished": 0, "errors": 0, "rejected_connections": 0}

    # ------------------------------------------------------------------ connections

    def serve_forever(self) -> None:
        """Accept connections until a `stop` call; the engine runs in its own thread."""
        engine = threading.Thread(target=self._engine_loop, name="engine", daemon=True)
        engine.start()
        acceptor = threading.Thread(target=self._accept_loop, name="accept", daemon=True)
        acceptor.start()
        self.stopping.wait()
        engine.join()
        self.listener.close()
        # Calls that arrive from now on would wait forever for the engine: hang up instead, so
        # every client's pending or next call ends with an error.
        with self.clients_lock:
            for client in self.clients:
                client.hang_up()

    def _accept_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                conn = self.listener.accept()
            except OSError:  # listener closed
                return
            except Exception as e:  # AuthenticationError, or a client that hung up mid-handshake
                self.stats["rejected_connections"] += 1
                log.warning("rejected a connection: %s", e)
                continue
            client = _Client(conn)
            with self.clients_lock:  # a connection accepted while shutting down is hung up at once
                if self.stopping.is_set():
                    client.hang_up()
                    return
                self.clients.add(client)
            threading.Thread(target=self._read_loop, args=(client,), daemon=True).start()

    def _read_loop(self, client: _Client) -> None:
        while client.open and not self.stopping.is_set():
            try:
                call = client.conn.recv()
            except (EOFError, OSError):
                break
            except Exception as e:  # undecodable payload
                client.send({"id": None, "error": f"malformed message: {e}"})
                continue
            if not isinstance(call, dict) or not isinstance(call.get("method"), str):
                client.send({"id": call.get("id") if isinstance(call, dict) else None,
                             "error": "a call is a dict with 'method' (str), 'params' (dict) and 'id'"})
                continue
            method, params = call["method"], call.get("params", {})
            if method not in METHODS:
                client.send({"id": call.get("id"), "error": f"unknown method {method!r}; methods: {METHODS}"})
            elif not isinstance(params, dict):
                client.send({"id": call.get("id"), "error": "params must be a dict"})
            else:
                self.inbox.put((client, call.get("id"), method, params))
        client.open = False
        with self.clients_lock:
            self.clients.discard(client)
        self.inbox.put((client, None, "_disconnect", {}))

    # ------------------------------------------------------------------ engine

    def _engine_loop(self) -> None:
        while not self.stopping.is_set():
            block = not self.llm.has_work()
            try:
                while True:
                    self._handle(*self.inbox.get(block=block, timeout=0.1 if block else None))
                    block = False
            except queue.Empty:
                pass
            if self.llm.has_work():
                try:
                    events = self.llm.step()
                except Exception:  # a failed step must not leave requests hanging
                    log.exception("engine step failed")
                    self._fail_all("internal error in the engine step; see the server log")
                    continue
                for ev in events:
                    client, call_id, _ = self.live[ev.index]
                    if ev.error is not None:
                        client.send({"id": call_id, "error": ev.error})
                        del self.live[ev.index]
                        continue
                    client.send({"id": call_id, "event": "token", "token_id": ev.token_id, "text": ev.text_delta})
                    if ev.output is not None:
                        client.send({"id": call_id, "event": "done", "output": asdict(ev.output)})
                        del self.live[ev.index]
                        self.stats["finished"] += 1
        self._fail_all("server stopped")

    def _handle(self, client: _Client, call_id: Any, method: str, params: dict) -> None:
        if method == "_disconnect":
            for seq_id, (c, _, seq) in list(self.live.items()):
                if c is client:
                    self.llm.abort(seq)
                    del self.live[seq_id]
            for session, owner in list(self.session_owner.items()):
                if owner is client:
                    self.sessions.close(session)
                    del self.session_owner[session]
        elif method.startswith("kv_"):
            try:
                client.send({"id": call_id, **self._kv(client, method, params)})
            except (RequestError, ImageError, TypeError, ValueError) as e:
                self.stats["errors"] += 1
                client.send({"id": call_id, "error": str(e)})
        elif method == "status":
            client.send({"id": call_id, "event": "status", "status": self.status()})
        elif method == "stop":
            self.stopping.set()  # first: a client that has read the reply sees the server stopping
            client.send({"id": call_id, "event": "stopping"})
        elif method == "generate":
            try:
                request, sampling = _parse_generate(params)
                seq = self.llm.add_request(request, sampling)
            except (RequestError, ImageError, TypeError, ValueError) as e:
                self.stats["errors"] += 1
                client.send({"id": call_id, "error": str(e)})
                return
            self.live[seq.seq_id] = (client, call_id, seq)
            self.stats["requests"] += 1

    def _kv(self, client: _Client, method: str, params: dict) -> dict:
        if self.sessions is None:
            raise RequestError("kv sessions need the in-process (aggregated) engine")
        if method == "kv_init":
            request, sampling = _parse_generate(params)
            session, seq = self.sessions.init(request, sampling)
            self.session_owner[session] = client
            return {"event": "session", "session": session, "token_id": seq.output_ids[-1],
                    "prompt_tokens": len(seq.prompt_ids)}
        session = params.get("session")
        if self.session_owner.get(session) is not client:
            raise RequestError(f"no kv session {session!r} on this connection")
        if method == "kv_step":
            return {"event": "tokens", "token_ids": [self.sessions.step(session, params.get("token_id"))]}
        if method == "kv_generate":
            return {"event": "tokens", "token_ids": self.sessions.generate(session, params.get("num_steps"))}
        del self.session_owner[session]
        return {"event": "closed", "num_tokens": self.sessions.close(session)}

    def _fail_all(self, message: str) -> None:
        for seq_id, (client, call_id, seq) in list(self.live.items()):
            self.llm.abort(seq)
            client.send({"id": call_id, "error": message})
            del self.live[seq_id]

    def status(self) -> dict:
        sessions = len(self.sessions.sessions) if self.sessions else 0
        return {**self.stats, **self.llm.status(), "kv_sessions": sessions}


def _parse_generate(params: dict) -> tuple[Request, SamplingParams]:
    unknown = set(params) - {"prompt", "images", "raw_prompt", "sampling"}
    if unknown:
        raise RequestError(f"generate: unknown params {sorted(unknown)}")
    prompt = params.get("prompt")
    if not isinstance(prompt, str):
        raise RequestError("generate: params.prompt must be a string")
    images = params.get("images", [])
    if not isinstance(images, list):
        raise RequestError("generate: params.images must be a list")
    sampling = params.get("sampling", {})
    if not isinstance(sampling, dict) or set(sampling) - _SAMPLING_FIELDS:
        raise RequestError(f"generate: params.sampling must be a dict with keys from {sorted(_SAMPLING_FIELDS)}")
    return Request(prompt, images=images, raw_prompt=bool(params.get("raw_prompt", False))), \
        SamplingParams(**sampling)
