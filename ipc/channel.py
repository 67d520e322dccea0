"""Pipes between the orchestrator and one stage process; each has one writer and one reader.

    outbox (stage -> orchestrator): a plain one-way pipe. The stage sends synchronously (no
        feeder thread: a token reaches the orchestrator without waiting for a thread switch);
        the orchestrator reads with `wait` across all stages. A stage that dies, even in the
        middle of a message, is an EOF for the reader once the orchestrator has closed its copy
        of the write end.
    inbox (orchestrator -> stage): an `Inbox`. put() never blocks the orchestrator: messages
        are pickled at once (a later change to a list in one cannot alter what was sent) and a
        daemon thread writes them. Once the stage is gone (EPIPE, after the orchestrator closed
        its copy of the read end) or the inbox is closed, messages are dropped. Unlike
        multiprocessing.Queue, nothing joins that thread at exit, so a dead stage's full pipe
        can never hold up the orchestrator's exit.

Both directions write `dumps(msg)`: the C pickler, which is ~90x faster than multiprocess's dill
on a prompt's token list (3.2 ms vs 36 us for a 1200-token PrefillTask on the CI machine) - that
was orchestrator time per request, and a decode's per-step time for its Tokens. What the C
pickler cannot carry (a role switch's build closure) goes through dill; readers' `recv` (dill's
loads, the C unpickler underneath) reads both.
"""

from __future__ import annotations

import logging
import pickle
import threading
from collections import deque
from collections.abc import Callable

from multiprocess.reduction import ForkingPickler

log = logging.getLogger(__name__)


def dumps(msg: object) -> bytes:
    """A message as bytes: pickle's C pickler, or dill for what it cannot carry (closures)."""
    try:
        return pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # PicklingError, or AttributeError / TypeError for local objects
        return bytes(ForkingPickler.dumps(msg))


def sender(conn) -> Callable[[object], None]:
    """send(msg) for a plain pipe's write end (a stage's outbox), through dumps."""
    return lambda msg: conn.send_bytes(dumps(msg))


class Inbox:
    """The orchestrator's end of a stage's inbox. `reader` goes to the stage at spawn; call
    `started()` once the stage has it."""

    def __init__(self, ctx, name: str, writer=None) -> None:
        """A new pipe from `ctx`; or, with `writer`, that connection's write side (a socket to a
        stage on another host: reader is then None)."""
        self.name = name
        self.reader, self._writer = (None, writer) if writer is not None else ctx.Pipe(duplex=False)
        self._pending: deque[bytes] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.broken = False  # the stage's end is gone: nothing more reaches it
        self._thread = threading.Thread(target=self._feed, name=f"inbox-{name}", daemon=True)

    def started(self) -> None:
        """The stage holds the read end now: drop ours (so its death is EPIPE, not a full pipe)
        and start writing."""
        if self.reader is not None:
            self.reader.close()
        self._thread.start()

    def put(self, msg: object) -> None:
        data = dumps(msg)
        with self._cond:
            if self._closed or self.broken:
                return
            self._pending.append(data)
            self._cond.notify()

    def close(self) -> None:
        """Stop writing (what is still queued is dropped) and close the pipe."""
        with self._cond:
            self._closed = True
            self._pending.clear()
            self._cond.notify()
        if not self._thread.is_alive():
            self._writer.close()

    def _feed(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    break
                data = self._pending.popleft()
            try:
                self._writer.send_bytes(data)
            except OSError as e:  # EPIPE: the stage is gone
                log.debug("inbox of %s: %s; dropping its messages", self.name, e)
                with self._cond:
                    self.broken = True
                    self._pending.clear()
                break
        self._writer.close()
