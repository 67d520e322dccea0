"""RPC server in front of one engine: authenticated local socket, streaming generate, status, stop.

Transport: multiprocessing.connection's framing (HMAC challenge with the authkey both ways
before any message is read; ipc/connections.py runs it per connection with a deadline). A call
is a dict {"id": any, "method": str, "params": dict}; replies carry the call's id:
  generate(prompt, images, raw_prompt, sampling)
           -> {"id", "event": "token", "token_id", "text", "sample"} ... then {"id", "event": "done", "output"}
  tokenize(prompt, images: count or list, raw_prompt)
           -> {"event": "tokens", "token_ids", "prompt"}: the ids generate would prefill (the
              checkpoint's chat template, each image expanded), and the text after the template
  status   -> {"id", "event": "status", "status": {...}}: counters, rejected connections by
              reason, the engine's status, decode_graphs_captured / _pending / _capture
  stop     -> {"id", "event": "stopping"}; live requests fail with "server stopped", every
              connection is hung up (a client's later call ends with RPCError, never a hang)
  kv_init(prompt, images, raw_prompt, sampling) -> {"event": "session", "session", "token_id"}
  kv_step(session, token_id=None) / kv_generate(session, num_steps) -> {"event": "tokens", "token_ids"}
  kv_close(session) -> {"event": "closed", "num_tokens"}   (see ipc/sessions.py)
  capture_start             -> {"event": "capture", "started", "captured", "pending", "state"}: capture
                               the decode buckets not captured yet in the background (serving goes on)
  capture_wait(timeout_s)   -> the same fields once every bucket is captured or timeout_s passed;
                               only this call waits (not the engine, not other clients)
  capture_stop              -> the same fields; the capture stops after the bucket in progress
              (aggregated engine on the cuda backend; elsewhere an error says why)
  any bad call -> {"id", "error": "<message naming the field>"}; the server carries on.
Images in generate / kv_init are bytes, data: URLs, or local paths; paths only inside
allowed_local_media_path (off by default: the server's files are not the clients').
One engine thread owns the engine (the in-process `LLM` or the `EPDEngine` orchestrator: both
have add_request / step / abort / has_work / status); connection threads only parse calls and
queue them. An exception from the engine fails the call (or, from step, the live requests) and
the loop goes on. kv sessions need the in-process engine (they drive its runner directly).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import asdict
from pathlib import Path, PurePath
from typing import Any

from engine.epd import EPDEngine, StageError
from engine.images import ImageError
from engine.llm import LLM
from engine.request import Request, Sequence
from engine.sampling import RequestError, SamplingParams
from ipc.connections import (
    Acceptor,
    AddressError,
    AddressInUse,
    BadFrame,
    ClientConnection,
    MessageTooLarge,
    SocketListener,
    claim_address,
    recv_message,
)
from ipc.sessions import KVSessions

__all__ = ["RPCServer", "claim_address", "AddressError", "AddressInUse", "METHODS"]
log = logging.getLogger(__name__)
METHODS = ("generate", "tokenize", "status", "stop", "kv_init", "kv_step", "kv_generate", "kv_close",
           "capture_start", "capture_wait", "capture_stop")
_SAMPLING_FIELDS = set(SamplingParams.__dataclass_fields__)
_LOCAL_PATHS_OFF = ("local file paths are disabled on this server; start it with --allowed-local-media-path DIR, "
                    "or send the image as bytes or a data URL")


class RPCServer:
    """Serves `llm` on `address` (a unix socket path or (host, port)). The socket is bound here
    (a stale socket file is replaced, a live one raises AddressInUse) and removed on exit."""

    def __init__(self, llm: LLM | EPDEngine, address: str | tuple[str, int], authkey: bytes,
                 handshake_timeout_s: float = 5.0, max_message_bytes: int = 256 * 2**20,
                 allowed_local_media_path: str | Path | None = None) -> None:
        if not authkey:
            raise ValueError("authkey must be non-empty")
        if not 0 < handshake_timeout_s <= 3600:
            raise ValueError(f"handshake_timeout_s = {handshake_timeout_s}; must be in (0, 3600]")
        if not 1024 <= max_message_bytes < 2**31:
            raise ValueError(f"max_message_bytes = {max_message_bytes}; must be in [1024, 2**31)")
        self.media_dir = None
        if allowed_local_media_path is not None:
            self.media_dir = Path(allowed_local_media_path).resolve()
            if not self.media_dir.is_dir():
                raise ValueError(f"allowed_local_media_path {allowed_local_media_path} is not a directory")
        self.llm = llm
        self.max_message_bytes = max_message_bytes
        self.inbox: queue.Queue = queue.Queue()  # (client, call id, method, params)
        self.live: dict[int, tuple[ClientConnection, Any, Sequence]] = {}  # seq_id -> (client, call id, seq)
        self.sessions = KVSessions(llm) if isinstance(llm, LLM) else None
        self.session_owner: dict[int, ClientConnection] = {}
        self.stopping = threading.Event()
        self._shutdown_requested = False
        self.stats = {"requests": 0, "finished": 0, "errors": 0}
        listener = SocketListener(address)  # last: nothing after the bind can fail
        self.address = listener.address
        self.acceptor = Acceptor(listener, authkey, self._read_loop, handshake_timeout_s)

    # ------------------------------------------------------------------ lifecycle

    def serve_forever(self) -> None:
        """Serve until a `stop` call or shutdown(); then fail live requests with "server
        stopped", hang up every client and remove the socket file (also when this raises)."""
        engine = threading.Thread(target=self._engine_loop, name="engine", daemon=True)
        try:
            engine.start()
            self.acceptor.thread.start()
            while not self.stopping.wait(0.1):
                if self._shutdown_requested:
                    self.stopping.set()
        finally:
            self.stopping.set()
            if engine.is_alive():
                engine.join(timeout=30)
                if engine.is_alive():
                    log.error("the engine thread did not stop within 30 s; hanging up its clients anyway")
            self.close()

    def shutdown(self) -> None:
        """Ask serve_forever to stop. Safe from any thread and from a signal handler in the
        thread that runs serve_forever: it only sets a flag (no lock), polled every 0.1 s."""
        self._shutdown_requested = True

    def close(self) -> None:
        """Stop accepting, remove the socket file and hang up every connection (idempotent;
        for a server whose serve_forever never ran)."""
        self.stopping.set()
        self.acceptor.close()

    def _read_loop(self, client: ClientConnection) -> None:
        """One authenticated connection: parse calls, queue them for the engine thread."""
        while client.open and not self.stopping.is_set():
            try:
                call = recv_message(client.conn, self.max_message_bytes)
            except (EOFError, OSError):
                break
            except (MessageTooLarge, BadFrame) as e:  # the stream is lost: answer, then hang up
                log.warning("%s: %s; hanging up", client.name, e)
                client.send({"id": None, "error": f"{e}; the server closed the connection"})
                break
            except Exception as e:  # a well-framed message that does not unpickle
                client.send({"id": None, "error": f"malformed message: {type(e).__name__}: {e}"})
                continue
            call_id = call.get("id") if isinstance(call, dict) else None
            if not isinstance(call, dict) or not isinstance(call.get("method"), str):
                client.send({"id": call_id, "error": "a call is a dict with 'method' (str), 'params' (dict) and 'id'"})
                continue
            method, params = call["method"], call.get("params", {})
            if method not in METHODS:
                client.send({"id": call_id, "error": f"unknown method {method!r}; methods: {METHODS}"})
            elif not isinstance(params, dict):
                client.send({"id": call_id, "error": "params must be a dict"})
            else:
                self.inbox.put((client, call_id, method, params))
        self.inbox.put((client, None, "_disconnect", {}))  # the acceptor then flushes and hangs up

    # ------------------------------------------------------------------ engine

    def _engine_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                block = not self.llm.has_work()
                try:
                    while True:
                        self._handle(*self.inbox.get(block=block, timeout=0.1 if block else None))
                        block = False
                except queue.Empty:
                    pass
                if self.llm.has_work() and not self.stopping.is_set():
                    self._step()
            except Exception:  # never end the loop: stop and status must keep answering
                log.exception("engine loop error")
                self.stopping.wait(0.1)
        self._fail_all("server stopped")

    def _step(self) -> None:
        try:
            events = self.llm.step()
        except Exception as e:  # a failed step must not leave requests hanging
            log.exception("engine step failed")
            self.stats["errors"] += len(self.live)
            self._fail_all(f"engine step failed: {_describe(e)} (traceback in the server log)")
            return
        for ev in events:
            entry = self.live.get(ev.index)
            if entry is None:  # a late event for a request already failed or aborted
                continue
            client, call_id, _ = entry
            if ev.error is not None:
                client.send({"id": call_id, "error": ev.error})
                del self.live[ev.index]
                self.stats["errors"] += 1
                continue
            client.send({"id": call_id, "event": "token", "token_id": ev.token_id, "text": ev.text_delta,
                         "sample": getattr(ev, "sample", 0)})
            if ev.output is not None:
                client.send({"id": call_id, "event": "done", "output": asdict(ev.output)})
                del self.live[ev.index]
                self.stats["finished"] += 1

    def _handle(self, client: ClientConnection, call_id: Any, method: str, params: dict) -> None:
        """Run one call on the engine thread; whatever it raises fails only this call."""
        if method == "_disconnect":
            self._disconnect(client)
            return
        try:
            reply = getattr(self, f"_call_{method}")(client, call_id, params)
        except (ValueError, ImageError) as e:  # RequestError and the like: the caller's input
            self.stats["errors"] += 1
            client.send({"id": call_id, "error": str(e)})
        except Exception as e:  # from the engine: the call fails, the server serves on
            self.stats["errors"] += 1
            log.exception("%s failed", method)
            text = f"{method}: {e}" if isinstance(e, StageError) else (
                f"{method} failed in the engine: {_describe(e)} (traceback in the server log)")
            client.send({"id": call_id, "error": text})
        else:
            if reply is not None:
                client.send({"id": call_id, **reply})

    def _call_generate(self, client: ClientConnection, call_id: Any, params: dict) -> None:
        request, sampling = self._parse_generate(params, "generate")
        seq = self.llm.add_request(request, sampling)
        self.live[seq.seq_id] = (client, call_id, seq)
        self.stats["requests"] += 1

    def _call_tokenize(self, client: ClientConnection, call_id: Any, params: dict) -> dict:
        _check_params("tokenize", params, {"prompt", "images", "raw_prompt"})
        prompt, images = params.get("prompt"), params.get("images", 0)
        if not isinstance(prompt, str):
            raise RequestError("tokenize: params.prompt must be a string")
        if isinstance(images, list):
            images = len(images)
        if not isinstance(images, int) or isinstance(images, bool) or images < 0:
            raise RequestError("tokenize: params.images must be a count (int >= 0) or a list of images")
        text, ids = self.llm.tokenize(prompt, images, raw_prompt=bool(params.get("raw_prompt", False)))
        return {"event": "tokens", "token_ids": ids, "prompt": text}

    def _call_status(self, client: ClientConnection, call_id: Any, params: dict) -> dict:
        return {"event": "status", "status": self.status()}

    def _call_stop(self, client: ClientConnection, call_id: Any, params: dict) -> dict:
        self.stopping.set()  # first: a client that has read the reply sees the server stopping
        return {"event": "stopping"}

    def _call_capture_start(self, client: ClientConnection, call_id: Any, params: dict) -> dict:
        return {"event": "capture", **self.llm.capture_start()}

    def _call_capture_stop(self, client: ClientConnection, call_id: Any, params: dict) -> dict:
        return {"event": "capture", **self.llm.capture_stop()}

    def _call_capture_wait(self, client: ClientConnection, call_id: Any, params: dict) -> dict | None:
        _check_params("capture_wait", params, {"timeout_s"})
        timeout_s = params.get("timeout_s", 60.0)
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 <= timeout_s <= 86400:
            raise RequestError(f"capture_wait: params.timeout_s = {timeout_s!r}; must be a number in [0, 86400]")
        now = self.llm.capture_wait(0)  # raises here (engine thread) where capture is unavailable
        if now["state"] != "running" or timeout_s == 0:
            return {"event": "capture", **now}
        # the wait runs in its own thread: the engine loop and the other clients go on meanwhile
        threading.Thread(target=self._capture_waiter, args=(client, call_id, float(timeout_s)),
                         name="capture-wait", daemon=True).start()
        return None

    def _capture_waiter(self, client: ClientConnection, call_id: Any, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        try:
            state = self.llm.capture_wait(0)
            while state["state"] == "running" and not self.stopping.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                state = self.llm.capture_wait(min(left, 0.2))  # slices: a stop ends the wait too
            client.send({"id": call_id, "event": "capture", **state})
        except Exception as e:
            log.exception("capture_wait failed")
            client.send({"id": call_id, "error": f"capture_wait failed: {_describe(e)}"})

    def _call_kv_init(self, client: ClientConnection, call_id: Any, params: dict) -> dict:
        request, sampling = self._parse_generate(params, "kv_init")
        if self.sessions is None:
            raise RequestError("kv sessions need the in-process (aggregated) engine")
        session, seq = self.sessions.init(request, sampling)
        self.session_owner[session] = client
        return {"event": "session", "session": session, "token_id": seq.output_ids[-1],
                "prompt_tokens": len(seq.prompt_ids)}

    def _call_kv_step(self, client: ClientConnection, call_id: Any, params: dict) -> dict:
        token = self.sessions.step(self._owned_session(client, params), params.get("token_id"))
        return {"event": "tokens", "token_ids": [token]}

    def _call_kv_generate(self, client: ClientConnection, call_id: Any, params: dict) -> dict:
        tokens = self.sessions.generate(self._owned_session(client, params), params.get("num_steps"))
        return {"event": "tokens", "token_ids": tokens}

    def _call_kv_close(self, client: ClientConnection, call_id: Any, params: dict) -> dict:
        session = self._owned_session(client, params)
        del self.session_owner[session]
        return {"event": "closed", "num_tokens": self.sessions.close(session)}

    def _owned_session(self, client: ClientConnection, params: dict) -> Any:
        if self.sessions is None:
            raise RequestError("kv sessions need the in-process (aggregated) engine")
        session = params.get("session")
        if self.session_owner.get(session) is not client:
            raise RequestError(f"no kv session {session!r} on this connection")
        return session

    def _disconnect(self, client: ClientConnection) -> None:
        """A client went away: abort its requests and close its sessions (each on its own, so
        one that raises does not keep the others' blocks)."""
        for seq_id, (c, _, seq) in list(self.live.items()):
            if c is client:
                del self.live[seq_id]
                _quietly(self.llm.abort, seq)
        for session, owner in list(self.session_owner.items()):
            if owner is client:
                del self.session_owner[session]
                _quietly(self.sessions.close, session)

    def _fail_all(self, message: str) -> None:
        for seq_id, (client, call_id, seq) in list(self.live.items()):
            del self.live[seq_id]
            _quietly(self.llm.abort, seq)
            client.send({"id": call_id, "error": message})

    def status(self) -> dict:
        """Server counters and the engine's status; an engine whose status raises is reported,
        not fatal."""
        out = {**self.stats, **self.acceptor.stats()}
        try:
            out.update(self.llm.status())
            if isinstance(self.llm, LLM):
                capture = self.llm.capture_status()
                out.update(decode_graphs_captured=capture["captured"], decode_graphs_pending=capture["pending"],
                           decode_graphs_capture=capture["state"])
        except Exception as e:
            log.exception("engine status failed")
            out["engine_status_error"] = _describe(e)
        out["kv_sessions"] = len(self.sessions.sessions) if self.sessions else 0
        return out

    # ------------------------------------------------------------------ params

    def _parse_generate(self, params: dict, method: str) -> tuple[Request, SamplingParams]:
        _check_params(method, params, {"prompt", "images", "raw_prompt", "sampling"})
        prompt = params.get("prompt")
        if not isinstance(prompt, str):
            raise RequestError(f"{method}: params.prompt must be a string")
        images = params.get("images", [])
        if not isinstance(images, list):
            raise RequestError(f"{method}: params.images must be a list")
        sampling = params.get("sampling", {})
        if not isinstance(sampling, dict) or set(sampling) - _SAMPLING_FIELDS:
            raise RequestError(f"{method}: params.sampling must be a dict with keys from {sorted(_SAMPLING_FIELDS)}")
        images = [self._check_image(i, image) for i, image in enumerate(images)]
        return Request(prompt, images=images, raw_prompt=bool(params.get("raw_prompt", False))), \
            SamplingParams(**sampling)

    def _check_image(self, index: int, image: Any) -> Any:
        """Bytes and data: URLs pass; a path must resolve (symlinks followed) inside the allowed
        directory, relative paths from there. Returns the resolved path, so a symlink swapped
        after the check is not followed."""
        if not isinstance(image, (str, PurePath)) or (isinstance(image, str) and image.startswith("data:")):
            return image
        if self.media_dir is None:
            raise RequestError(f"images[{index}]: {_LOCAL_PATHS_OFF}")
        shown = str(image) if len(str(image)) <= 200 else str(image)[:200] + "..."
        try:
            resolved = (self.media_dir / image).resolve()
        except (OSError, RuntimeError, ValueError) as e:  # symlink loop, NUL byte
            raise RequestError(f"images[{index}]: cannot resolve the path {shown!r}: {e}") from e
        if not resolved.is_relative_to(self.media_dir):
            raise RequestError(f"images[{index}]: {shown!r} is outside the allowed media directory {self.media_dir}")
        return str(resolved)


def _check_params(method: str, params: dict, known: set[str]) -> None:
    unknown = set(params) - known
    if unknown:
        raise RequestError(f"{method}: unknown params {sorted(unknown)}; known: {sorted(known)}")


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _quietly(fn, *args) -> None:
    """Clean-up that must not stop the clean-up of the others: log what it raises."""
    try:
        fn(*args)
    except Exception:
        log.exception("%s%r failed", getattr(fn, "__name__", fn), args)
