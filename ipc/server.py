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
  kv_close(session) -> {"event": "closed", "num_tokens"}   (see engine/sessions.py)
  capture_start             -> {"event": "capture", "started", "captured", "pending", "state"}: capture
                               the decode buckets not captured yet in the background (serving goes on)
  capture_wait(timeout_s)   -> the same fields once every bucket is captured or timeout_s passed;
                               only this call waits (not the engine, not other clients)
  capture_stop              -> the same fields; the capture stops after the bucket in progress
              (aggregated engine on the cuda backend; elsewhere an error says why)
  switch_role(kind, index, new_kind, weights, timeout_s) -> {"event": "switched", "from", "to", "weights",
              "drain_s", "seconds"}
              once stage kind+index serves as new_kind (EPD; engine/switching.py); serving goes on
              meanwhile; a switch that cannot be done is an error saying why
  any bad call -> {"id", "error": "<message naming the field>"}; the server carries on.
Images in generate / kv_init are bytes, data: URLs, or local paths; paths only inside
allowed_local_media_path (off by default: the server's files are not the clients').
The server is an adapter over engine/serving.py's EngineLoop (the thread that owns the engine:
the in-process `LLM` or the `EPDEngine` orchestrator, both an `Engine`). Connection threads check
a call's shape and queue it on the loop; on the engine thread it is parsed, checked (the
media-path policy is this frontend's) and run, and the loop's request events become replies. An
exception from the engine fails the call (or, from step, the live requests) and the loop goes
on. kv sessions need the in-process engine (they drive its runner directly).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path, PurePath
from typing import Any

from engine.epd import StageError
from engine.images import ImageError
from engine.request import Request
from engine.sampling import RequestError, SamplingParams
from engine.serving import Engine, EngineLoop, Finished, LoopStopped, RequestEvent, TokenDelta, describe_error
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
from ipc.media import check_local_path, media_dir_of

__all__ = ["RPCServer", "claim_address", "AddressError", "AddressInUse", "METHODS"]
log = logging.getLogger(__name__)
METHODS = ("generate", "tokenize", "status", "stop", "kv_init", "kv_step", "kv_generate", "kv_close",
           "capture_start", "capture_wait", "capture_stop", "switch_role")
_SAMPLING_FIELDS = set(SamplingParams.__dataclass_fields__)


class RPCServer:
    """Serves `engine`, through an EngineLoop, on `address` (a unix socket path or (host, port)).
    The socket is bound here (a stale socket file is replaced, a live one raises AddressInUse)
    and removed on exit."""

    def __init__(self, engine: Engine, address: str | tuple[str, int], authkey: bytes,
                 handshake_timeout_s: float = 5.0, max_message_bytes: int = 256 * 2**20,
                 allowed_local_media_path: str | Path | None = None) -> None:
        if not authkey:
            raise ValueError("authkey must be non-empty")
        if not 0 < handshake_timeout_s <= 3600:
            raise ValueError(f"handshake_timeout_s = {handshake_timeout_s}; must be in (0, 3600]")
        if not 1024 <= max_message_bytes < 2**31:
            raise ValueError(f"max_message_bytes = {max_message_bytes}; must be in [1024, 2**31)")
        self.media_dir = media_dir_of(allowed_local_media_path)
        self.engine = engine
        self.max_message_bytes = max_message_bytes
        self.stopping = threading.Event()  # the loop's: set by a stop call before it is answered
        self.loop = EngineLoop(engine, self.stopping)
        self._shutdown_requested = False
        listener = SocketListener(address)  # last: nothing after the bind can fail
        self.address = listener.address
        self.acceptor = Acceptor(listener, authkey, self._read_loop, handshake_timeout_s)

    # ------------------------------------------------------------------ lifecycle

    def serve_forever(self) -> None:
        """Serve until a `stop` call or shutdown(); then fail live requests with "server
        stopped", hang up every client and remove the socket file (also when this raises)."""
        try:
            self.loop.start()
            self.acceptor.thread.start()
            while not self.stopping.wait(0.1):
                if self._shutdown_requested:
                    self.stopping.set()
        finally:
            self.stopping.set()
            if not self.loop.join(timeout_s=30):
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
        """One authenticated connection: check the call's shape, queue it for the engine thread."""
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
                self.loop.call(partial(self._run_call, client, call_id, method, params),
                               partial(self._reply, client, call_id, method))
        self.loop.abort_owner(client)  # the acceptor then flushes and hangs up

    # ------------------------------------------------------------------ calls (on the engine thread)

    def _run_call(self, client: ClientConnection, call_id: Any, method: str, params: dict) -> dict | None:
        return getattr(self, f"_call_{method}")(client, call_id, params)

    def _reply(self, client: ClientConnection, call_id: Any, method: str, reply: dict | None,
               error: BaseException | None) -> None:
        """Answer one call; what it raised fails only this call (the loop has counted it)."""
        if error is None:
            if reply is not None:
                client.send({"id": call_id, **reply})
        elif isinstance(error, (ValueError, ImageError, LoopStopped)):  # the caller's input, or a stop
            client.send({"id": call_id, "error": str(error)})
        else:  # from the engine: the call fails, the server serves on
            log.error("%s failed", method, exc_info=error)
            text = f"{method}: {error}" if isinstance(error, StageError) else (
                f"{method} failed in the engine: {describe_error(error)} (traceback in the server log)")
            client.send({"id": call_id, "error": text})

    def _send_event(self, client: ClientConnection, call_id: Any, event: RequestEvent) -> None:
        if isinstance(event, TokenDelta):
            client.send({"id": call_id, "event": "token", "token_id": event.token_id, "text": event.text,
                         "sample": event.sample})
        elif isinstance(event, Finished):
            client.send({"id": call_id, "event": "done", "output": asdict(event.output)})
        else:
            client.send({"id": call_id, "error": event.error})

    def _call_generate(self, client: ClientConnection, call_id: Any, params: dict) -> None:
        request, sampling = self._parse_generate(params, "generate")
        self.loop.add(request, sampling, owner=client, sink=partial(self._send_event, client, call_id))

    def _call_tokenize(self, client: ClientConnection, call_id: Any, params: dict) -> dict:
        _check_params("tokenize", params, {"prompt", "images", "raw_prompt"})
        prompt, images = params.get("prompt"), params.get("images", 0)
        if not isinstance(prompt, str):
            raise RequestError("tokenize: params.prompt must be a string")
        if isinstance(images, list):
            images = len(images)
        if not isinstance(images, int) or isinstance(images, bool) or images < 0:
            raise RequestError("tokenize: params.images must be a count (int >= 0) or a list of images")
        text, ids = self.engine.tokenize(prompt, images, raw_prompt=bool(params.get("raw_prompt", False)))
        return {"event": "tokens", "token_ids": ids, "prompt": text}

    def _call_status(self, client: ClientConnection, call_id: Any, params: dict) -> dict:
        return {"event": "status", "status": self.status()}

    def _call_stop(self, client: ClientConnection, call_id: Any, params: dict) -> dict:
        self.stopping.set()  # first: a client that has read the reply sees the server stopping
        return {"event": "stopping"}

    def _call_capture_start(self, client: ClientConnection, call_id: Any, params: dict) -> dict:
        return {"event": "capture", **self.engine.capture_start()}

    def _call_capture_stop(self, client: ClientConnection, call_id: Any, params: dict) -> dict:
        return {"event": "capture", **self.engine.capture_stop()}

    def _call_capture_wait(self, client: ClientConnection, call_id: Any, params: dict) -> dict | None:
        _check_params("capture_wait", params, {"timeout_s"})
        timeout_s = params.get("timeout_s", 60.0)
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 <= timeout_s <= 86400:
            raise RequestError(f"capture_wait: params.timeout_s = {timeout_s!r}; must be a number in [0, 86400]")
        now = self.engine.capture_wait(0)  # raises here (engine thread) where capture is unavailable
        if now["state"] != "running" or timeout_s == 0:
            return {"event": "capture", **now}
        # the wait runs in its own thread: the engine loop and the other clients go on meanwhile
        threading.Thread(target=self._capture_waiter, args=(client, call_id, float(timeout_s)),
                         name="capture-wait", daemon=True).start()
        return None

    def _capture_waiter(self, client: ClientConnection, call_id: Any, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        try:
            state = self.engine.capture_wait(0)
            while state["state"] == "running" and not self.stopping.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                state = self.engine.capture_wait(min(left, 0.2))  # slices: a stop ends the wait too
            client.send({"id": call_id, "event": "capture", **state})
        except Exception as e:
            log.exception("capture_wait failed")
            client.send({"id": call_id, "error": f"capture_wait failed: {describe_error(e)}"})

    def _call_switch_role(self, client: ClientConnection, call_id: Any, params: dict) -> None:
        _check_params("switch_role", params, {"kind", "index", "new_kind", "weights", "timeout_s"})
        kind, index, new_kind = params.get("kind"), params.get("index"), params.get("new_kind")
        timeout_s = params.get("timeout_s", 300.0)
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise RequestError(f"switch_role: params.index = {index!r}; must be an int >= 0")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s <= 86400:
            raise RequestError(f"switch_role: params.timeout_s = {timeout_s!r}; must be a number in (0, 86400]")
        if not hasattr(self.engine, "begin_switch"):
            raise RequestError("switch_role: the aggregated engine has no stages to switch (serve --mode epd or pd)")
        name = self.engine.begin_switch(kind, index, new_kind, params.get("weights", "auto"))
        # the engine loop advances the switch as it steps; this thread asks it when it is over
        threading.Thread(target=self._switch_waiter, args=(client, call_id, name, float(timeout_s)),
                         name="switch-wait", daemon=True).start()
        return None

    def _switch_waiter(self, client: ClientConnection, call_id: Any, name: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        def ask() -> dict:
            answer: dict = {}
            ready = threading.Event()
            self.loop.call(partial(self.engine.switch_done, name),
                           lambda result, error: (answer.update(result=result, error=error), ready.set()))
            ready.wait(30)
            return answer

        while not self.stopping.is_set():
            answer = ask()
            if answer.get("error") is not None:
                client.send({"id": call_id, "error": f"switch_role failed: {describe_error(answer['error'])}"})
                return
            if answer.get("result") is not None:
                client.send({"id": call_id, "event": "switched", **answer["result"]})
                return
            if time.monotonic() > deadline:
                client.send({"id": call_id, "error": f"switch_role: {name} not serving within {timeout_s:g} s"})
                return
            time.sleep(0.05)

    def _call_kv_init(self, client: ClientConnection, call_id: Any, params: dict) -> dict:
        request, sampling = self._parse_generate(params, "kv_init")
        session, seq = self.loop.open_session(client, request, sampling)
        return {"event": "session", "session": session, "token_id": seq.output_ids[-1],
                "prompt_tokens": len(seq.prompt_ids)}

    def _call_kv_step(self, client: ClientConnection, call_id: Any, params: dict) -> dict:
        session = params.get("session")
        token = self.loop.owned_sessions(client, session).step(session, params.get("token_id"))
        return {"event": "tokens", "token_ids": [token]}

    def _call_kv_generate(self, client: ClientConnection, call_id: Any, params: dict) -> dict:
        session = params.get("session")
        tokens = self.loop.owned_sessions(client, session).generate(session, params.get("num_steps"))
        return {"event": "tokens", "token_ids": tokens}

    def _call_kv_close(self, client: ClientConnection, call_id: Any, params: dict) -> dict:
        return {"event": "closed", "num_tokens": self.loop.close_session(client, params.get("session"))}

    def status(self) -> dict:
        """The loop's counters and engine status (an engine whose status raises is reported, not
        fatal) and the connections' counters. Engine thread only."""
        return {**self.loop.status_now(), **self.acceptor.stats()}

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
        """Bytes and data: URLs pass; a path goes through the media-path policy (ipc/media.py)."""
        if not isinstance(image, (str, PurePath)) or (isinstance(image, str) and image.startswith("data:")):
            return image
        return check_local_path(self.media_dir, image, f"images[{index}]")


def _check_params(method: str, params: dict, known: set[str]) -> None:
    unknown = set(params) - known
    if unknown:
        raise RequestError(f"{method}: unknown params {sorted(unknown)}; known: {sorted(known)}")

