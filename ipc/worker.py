"""The worker process shell: one process per stage instance, hosting whatever role it is
handed. The shell moves messages and nothing else: it knows no models, requests or arenas.

    worker_main(build, name, ...)   process entry (started with multiprocess, spawn)
      role = build(send)            the role builds itself from its config (weights, arenas);
                                    send(msg) writes the worker's outbox
      loop: report role.stats()     (StageStatus, throttled; always before blocking)
            messages from the inbox (block only while the role is idle) -> role.handle(msg)
            role.step()             one unit of work, while role.busy (else wait for a message)
      Shutdown                      role.close() and exit; Shutdown(drain=True) first calls
                                    role.drain() and steps until role.busy is False
      SwitchRole(name, build)       role.drain(); once role.drained (what it holds is done and
                                    given back): role.close(), Switched, role = build(send): the
                                    same process serves another role

A role is any object with handle / step / drain / stats / busy / close (the Role protocol).
The worker dies with its parent (ipc/parent_watch.py), ignores SIGINT (the parent spawns it so),
and treats the end of its inbox (the parent gone) as Shutdown. An exception in build or in the
loop is sent as Crashed (its first line and the traceback) and the process exits with status 1.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ipc.channel import sender
from ipc.parent_watch import bind_to_parent

REPORT_INTERVAL_S = 0.2  # at most this often while busy; always before the worker blocks
# an idle worker wakes this often to report figures that change on other threads (an arena served
# over a link counts its blocks on the link's thread): the longest a report is stale
IDLE_WAKE_S = 0.5


@dataclass
class Shutdown:
    """Stop the worker. drain: let the role finish what it holds first (it takes no new work)."""

    drain: bool = False


@dataclass
class SwitchRole:
    """Drain the role, close it and build another in its place (its reports then carry `name`).
    The sender routes no new work to the old role."""

    name: str
    build: Callable[[Callable[[object], None]], object]


@dataclass
class Switched:
    """The worker closed its old role (drained) and now builds the one named `stage`."""

    stage: str
    drain_s: float  # from SwitchRole to the old role's close


@dataclass
class Crashed:
    stage: str
    error: str  # "ExceptionType: first line of its message"
    traceback: str


@dataclass
class StageStatus:
    """A role's counters, sent after its work changes them (at most every 0.2 s while busy, and
    always before the worker waits idle): the orchestrator's `status` shows the latest of each."""

    stage: str  # "encode0", "prefill0", "decode0", ...
    stats: dict


class Role(Protocol):
    busy: bool  # work in hand: the worker steps without waiting for a message

    def handle(self, msg: object) -> None: ...

    def step(self) -> None: ...

    def drain(self) -> None: ...

    def stats(self) -> dict: ...

    def close(self) -> None: ...


def receive(inbox, block: bool) -> list:
    """The messages waiting in the inbox (block: wait up to IDLE_WAKE_S for the first). The
    parent gone (end of the pipe) reads as Shutdown."""
    msgs: list = []
    try:
        if block and inbox.poll(IDLE_WAKE_S):
            msgs.append(inbox.recv())
        while inbox.poll():
            msgs.append(inbox.recv())
    except (EOFError, OSError):
        msgs.append(Shutdown())
    return msgs


class _Reporter:
    def __init__(self, send: Callable[[object], None], stage: str) -> None:
        self.send, self.stage, self.last, self.sent = send, stage, 0.0, None

    def __call__(self, stats: dict, idle: bool) -> None:
        now = time.monotonic()
        if stats != self.sent and (idle or now - self.last >= REPORT_INTERVAL_S):
            self.send(StageStatus(self.stage, stats))
            self.last, self.sent = now, stats


class _Shell:
    """What the worker runs now: its role and the name it reports under (a switch changes both)."""

    def __init__(self, role: Role, name: str) -> None:
        self.role, self.name = role, name
        self.switch: SwitchRole | None = None  # asked for: done once the role is drained
        self.switch_at = 0.0


def serve(shell: _Shell, inbox, send: Callable[[object], None]) -> None:
    """The message loop around the shell's role, until Shutdown (or the inbox's end)."""
    report = _Reporter(send, shell.name)
    draining = False
    while True:
        if shell.switch is not None and getattr(shell.role, "drained", not shell.role.busy):
            switch, shell.switch = shell.switch, None  # before any wait: the drain may end in a step
            shell.role.close()
            shell.role, shell.name = None, switch.name
            send(Switched(switch.name, time.monotonic() - shell.switch_at))
            shell.role = switch.build(send)
            report = _Reporter(send, shell.name)
        role = shell.role
        idle = not role.busy
        report(role.stats(), idle)
        if draining and idle:
            return
        for msg in receive(inbox, block=idle):
            if isinstance(msg, Shutdown):
                if not msg.drain:
                    return
                draining = True
                role.drain()
            elif isinstance(msg, SwitchRole):  # a role that can hand its work over does (decode's requests)
                shell.switch, shell.switch_at = msg, time.monotonic()
                getattr(role, "hand_over", role.drain)()
            else:
                role.handle(msg)
        if role.busy:
            role.step()


def worker_main(build: Callable[[Callable[[object], None]], Role], name: str, parent_pid: int, torch_threads: int,
                inbox, outbox) -> None:
    """Process entry: tie the worker to its parent, build the role, serve it."""
    bind_to_parent(parent_pid)
    run_worker(build, name, torch_threads, inbox, outbox)


CUDA_QUEUES = "32"  # CUDA_DEVICE_MAX_CONNECTIONS in every worker (run_worker)


def run_worker(build: Callable[[Callable[[object], None]], Role], name: str, torch_threads: int, inbox,
               outbox) -> None:
    """Build the role and serve it over (inbox, outbox) until Shutdown or the inbox's end: a
    spawned process's body, or a Ray actor's on another host (its connections are sockets, and
    the orchestrator's end closing is its end)."""
    # CUDA's hardware work queues per context (default 8, read when the context is made): streams
    # past that share queues, and a kernel waits for all that is queued ahead of it in its queue,
    # whatever its stream. An encoder runs the tower, the preprocessing and nvjpeg's eight internal
    # streams; at 8, a decode waited for the tower, at 32 it does not (docs/benchmarks.md, session 11).
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", CUDA_QUEUES)
    if torch_threads > 0:
        import torch

        torch.set_num_threads(torch_threads)
    shell = _Shell(None, name)
    send = sender(outbox)
    try:
        shell.role = build(send)
        serve(shell, inbox, send)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        try:
            send(Crashed(shell.name, f"{type(e).__name__}: {first}" if first else type(e).__name__,
                         traceback.format_exc()))
        except OSError:  # the parent is gone too
            pass
        sys.exit(1)
    finally:
        if shell.role is not None:
            shell.role.close()
