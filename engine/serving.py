"""Serving an engine to frontends: the `Engine` protocol and the `EngineLoop` that owns one.

A frontend (the RPC server, the coming HTTP server) never touches the engine itself. It hands the
loop commands from its own threads, and the loop's thread runs them between engine steps:
  - `submit(request, sampling, owner, sink)` adds a request; its events (`TokenDelta` ...,
    then `Finished`, or `Failed`) go to `sink` in order, or to the handle's own queue;
  - `call(fn, done)` runs any other work (tokenize, status, kv sessions, the frontend's own
    parsing) on the engine thread and gives `done` the result or the exception;
  - `abort_owner(owner)`: a client went away; its requests are aborted, its kv sessions closed.
A step that raises fails only the live requests; `stop()` fails the rest with "server stopped".
Sinks and `done` run on the engine thread, so they must not block (hand off to a queue or a
non-blocking send). Nothing here knows a wire format.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

from engine.request import Request, RequestOutput, Sequence, TokenEvent
from engine.sampling import RequestError, SamplingParams
from engine.sessions import KVSessions, sessions_for

__all__ = ["Engine", "EngineLoop", "Failed", "Finished", "LoopStopped", "RequestEvent", "RequestHandle",
           "TokenDelta", "describe_error"]
log = logging.getLogger(__name__)
T = TypeVar("T")
STOPPED = "server stopped"
STEP_WAIT_S = 0.005  # a step waits this long at most for the stages: then new requests are taken
INTAKE_S = 0.005  # requests taken in one go for at most this long: then the stages' messages are read


@runtime_checkable
class Engine(Protocol):
    """What a frontend needs of an engine: `engine.LLM` (aggregated) and `engine.epd.EPDEngine`
    (the EPD orchestrator) both are one. Called from one thread only (the loop's)."""

    def add_request(self, request: Request | str, sampling: SamplingParams | None = None,
                    arrival: float | None = None) -> Sequence: ...

    def step(self, timeout_s: float = 0.05) -> list[TokenEvent]: ...  # waits up to timeout_s for work in flight

    def abort(self, seq: Sequence) -> object: ...

    def has_work(self) -> bool: ...

    def status(self) -> dict: ...

    def tokenize(self, prompt: str, num_images: int = 0, raw_prompt: bool = False) -> tuple[str, list[int]]: ...


@dataclass(frozen=True)
class TokenDelta:
    """One new token of one of the request's samples, and the text it added."""

    token_id: int
    text: str
    sample: int = 0


@dataclass(frozen=True)
class Finished:
    """The request is done (the last event of a request that did not fail)."""

    output: RequestOutput


@dataclass(frozen=True)
class Failed:
    """The request failed or the loop stopped (the last event); `error` is for the client."""

    error: str
    exception: BaseException | None = None  # set when adding the request raised


RequestEvent = TokenDelta | Finished | Failed


class LoopStopped(RuntimeError):
    """Given to `call`'s `done` for a call the loop never ran because it stopped."""


class RequestHandle:
    """One submitted request: `seq` once the engine took it; its events go to `sink` or, without
    one, to a queue read by `events()` (a blocking iterator that ends after the last event)."""

    def __init__(self, owner: Hashable, sink: Callable[[RequestEvent], None] | None = None) -> None:
        self.owner = owner
        self.seq: Sequence | None = None
        self._queue: queue.Queue[RequestEvent] | None = None if sink else queue.Queue()
        self._sink = sink or self._queue.put

    def deliver(self, event: RequestEvent) -> None:
        self._sink(event)

    def events(self, timeout_s: float | None = None) -> Iterator[RequestEvent]:
        """Events until Finished or Failed; queue.Empty if none comes within timeout_s."""
        if self._queue is None:
            raise RuntimeError("this request's events go to its sink")
        while True:
            event = self._queue.get(timeout=timeout_s)
            yield event
            if not isinstance(event, TokenDelta):
                return


class EngineLoop:
    """The thread that owns `engine`. Thread-safe: `submit`, `call`, `abort_owner`, `start`,
    `stop`, `join`. Engine thread only (inside `call`): `add`, `status_now` and the kv session
    methods. `stopping` may be shared with the frontend (it is set before a stop is answered).
    A loop runs once: after stop, commands are cancelled ("server stopped") instead of queued."""

    def __init__(self, engine: Engine, stopping: threading.Event | None = None) -> None:
        self.engine = engine
        self.stopping = stopping or threading.Event()
        self.stats = {"requests": 0, "finished": 0, "errors": 0}
        self.live: dict[int, RequestHandle] = {}  # seq_id -> handle
        self.sessions: KVSessions | None = sessions_for(engine)  # aggregated engine only
        self.session_owner: dict[Any, Hashable] = {}
        self._inbox: queue.Queue[tuple[Callable[[], None], Callable[[], None]]] = queue.Queue()  # (run, cancel)
        self._closed = False  # the thread has ended: commands are refused at once
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.stopping.set()

    def join(self, timeout_s: float | None = None) -> bool:
        """Wait for the thread to end; True if it has (or never started)."""
        if self._thread.ident is not None:
            self._thread.join(timeout_s)
        return not self._thread.is_alive()

    # ------------------------------------------------------------------ commands (any thread)

    def submit(self, request: Request | str, sampling: SamplingParams | None, owner: Hashable,
               sink: Callable[[RequestEvent], None] | None = None) -> RequestHandle:
        """Queue a request; if the engine refuses it, the handle gets Failed (with the exception)."""
        handle = RequestHandle(owner, sink)
        arrival = time.perf_counter()  # the request's clock starts here, not when the engine thread takes it

        def add() -> None:
            try:
                self._add(handle, request, sampling, arrival)
            except Exception as e:
                self.stats["errors"] += 1
                handle.deliver(Failed(describe_error(e) if not isinstance(e, ValueError) else str(e), e))

        self._put(add, lambda: handle.deliver(Failed(STOPPED)))
        return handle

    def call(self, fn: Callable[[], T], done: Callable[[T | None, BaseException | None], None]) -> None:
        """Run fn on the engine thread, then done(result, None) or done(None, exception); an
        exception counts as an error. A call the loop never runs gets LoopStopped."""

        def run() -> None:
            try:
                result = fn()
            except Exception as e:
                self.stats["errors"] += 1
                done(None, e)
            else:
                done(result, None)

        self._put(run, lambda: done(None, LoopStopped(STOPPED)))

    def abort_owner(self, owner: Hashable) -> None:
        """The owner went away: abort its requests and close its sessions (no events sent)."""
        self._put(lambda: self._abort_owner(owner), lambda: None)  # stopped: the engine is no one's now

    # ------------------------------------------------------------------ engine thread only

    def add(self, request: Request | str, sampling: SamplingParams | None, owner: Hashable,
            sink: Callable[[RequestEvent], None] | None = None) -> RequestHandle:
        """`submit` for code already on the engine thread: what the engine raises, raises here."""
        handle = RequestHandle(owner, sink)
        self._add(handle, request, sampling)
        return handle

    def status_now(self) -> dict:
        """Loop counters and the engine's status; an engine whose status raises is reported
        (engine_status_error), not fatal."""
        out: dict[str, Any] = dict(self.stats)
        try:
            out.update(self.engine.status())
            capture_status = getattr(self.engine, "capture_status", None)  # engines with decode graphs
            if capture_status is not None:
                capture = capture_status()
                out.update(decode_graphs_captured=capture["captured"], decode_graphs_pending=capture["pending"],
                           decode_graphs_capture=capture["state"])
        except Exception as e:
            log.exception("engine status failed")
            out["engine_status_error"] = describe_error(e)
        out["kv_sessions"] = len(self.sessions.sessions) if self.sessions else 0
        return out

    def open_session(self, owner: Hashable, request: Request, sampling: SamplingParams) -> tuple[int, Sequence]:
        session, seq = self._kv_sessions().init(request, sampling)
        self.session_owner[session] = owner
        return session, seq

    def owned_sessions(self, owner: Hashable, session: Any) -> KVSessions:
        """The sessions, once `session` is checked to be owner's (RequestError otherwise)."""
        sessions = self._kv_sessions()
        if self.session_owner.get(session) is not owner:
            raise RequestError(f"no kv session {session!r} on this connection")
        return sessions

    def close_session(self, owner: Hashable, session: Any) -> int:
        sessions = self.owned_sessions(owner, session)
        del self.session_owner[session]
        return sessions.close(session)

    # ------------------------------------------------------------------ the loop

    def _put(self, run: Callable[[], None], cancel: Callable[[], None]) -> None:
        """Queue run for the engine thread; once the loop has ended, cancel runs here instead."""
        with self._lock:
            if not self._closed:
                self._inbox.put((run, cancel))
                return
        cancel()

    def _add(self, handle: RequestHandle, request: Request | str, sampling: SamplingParams | None,
             arrival: float | None = None) -> None:
        handle.seq = self.engine.add_request(request, sampling, arrival=arrival)
        self.live[handle.seq.seq_id] = handle
        self.stats["requests"] += 1

    def _kv_sessions(self) -> KVSessions:
        if self.sessions is None:
            raise RequestError("kv sessions need the in-process (aggregated) engine")
        return self.sessions

    def _run(self) -> None:
        """Take queued requests (INTAKE_S at most in one go, so stage answers are not held back by
        a burst), then step (waiting STEP_WAIT_S at most, so a new request is not held back)."""
        while not self.stopping.is_set():
            try:
                block = not self.engine.has_work()
                deadline = None
                try:
                    while deadline is None or time.perf_counter() < deadline:
                        self._inbox.get(block=block, timeout=0.1 if block else None)[0]()
                        block, deadline = False, deadline or time.perf_counter() + INTAKE_S
                except queue.Empty:
                    pass
                if self.engine.has_work() and not self.stopping.is_set():
                    self._step(0.0 if not self._inbox.empty() else STEP_WAIT_S)
            except Exception:  # never end the loop: stop and status must keep answering
                log.exception("engine loop error")
                self.stopping.wait(0.1)
        self._fail_live(STOPPED)
        self._drain()

    def _drain(self) -> None:
        """Commands queued when the loop stopped are cancelled, not run: requests fail with
        "server stopped", calls get LoopStopped (so nothing waits on a loop that is gone)."""
        with self._lock:
            self._closed = True
        while True:
            try:
                _, cancel = self._inbox.get_nowait()
            except queue.Empty:
                return
            try:
                cancel()
            except Exception:
                log.exception("cancelling a command queued at stop failed")

    def _step(self, timeout_s: float) -> None:
        try:
            events = self.engine.step(timeout_s)
        except Exception as e:  # a failed step must not leave requests hanging
            log.exception("engine step failed")
            self.stats["errors"] += len(self.live)
            self._fail_live(f"engine step failed: {describe_error(e)} (traceback in the server log)")
            return
        for ev in events:
            handle = self.live.get(ev.index)
            if handle is None:  # a late event for a request already failed or aborted
                continue
            if ev.error is not None:
                del self.live[ev.index]
                self.stats["errors"] += 1
                _deliver(handle, Failed(ev.error))
                continue
            _deliver(handle, TokenDelta(ev.token_id, ev.text_delta, ev.sample))
            if ev.output is not None:
                del self.live[ev.index]
                self.stats["finished"] += 1
                _deliver(handle, Finished(ev.output))

    def _fail_live(self, message: str) -> None:
        for seq_id, handle in list(self.live.items()):
            del self.live[seq_id]
            _quietly(self.engine.abort, handle.seq)
            _deliver(handle, Failed(message))

    def _abort_owner(self, owner: Hashable) -> None:
        """Each abort and close on its own, so one that raises does not keep the others' blocks."""
        for seq_id, handle in list(self.live.items()):
            if handle.owner is owner:
                del self.live[seq_id]
                _quietly(self.engine.abort, handle.seq)
        for session, session_owner in list(self.session_owner.items()):
            if session_owner is owner:
                del self.session_owner[session]
                _quietly(self.sessions.close, session)


def describe_error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _deliver(handle: RequestHandle, event: RequestEvent) -> None:
    """A sink that raises loses its own request's events, never the loop or the other requests."""
    try:
        handle.deliver(event)
    except Exception:
        log.exception("delivering %s to %r failed", type(event).__name__, handle.owner)


def _quietly(fn: Callable[..., object], *args: object) -> None:
    """Clean-up that must not stop the clean-up of the others: log what it raises."""
    try:
        fn(*args)
    except Exception:
        log.exception("%s%r failed", getattr(fn, "__name__", fn), args)
