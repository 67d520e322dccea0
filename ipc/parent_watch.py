"""A stage process's tie to its parent (the orchestrator): it never outlives it.

Three layers, so no stage is orphaned however the parent ends (even by SIGKILL):
- Linux: prctl(PR_SET_PDEATHSIG, SIGTERM): the kernel signals the stage when the parent dies,
  and our SIGTERM handler removes the stage's arena files and exits at once. The kernel's
  "parent" is the *thread* that started the process: build the EPDEngine in a thread that
  lives as long as it (the main thread, as every driver here does).
- Right after setting it, the parent pid is checked: a parent that died before (while the
  stage was still importing) is caught too.
- Everywhere: a watcher thread polls getppid() and exits the stage when it changes
  (re-parented to init or a subreaper), for systems without prctl and for a stage whose main
  thread is stuck in C code and cannot run the signal handler.
Stages also ignore SIGINT: Ctrl-C in a terminal reaches the whole process group, and the
parent, not the keyboard, decides when a stage stops.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

from ipc.arena import unlink_owned_files

PR_SET_PDEATHSIG = 1
WATCH_INTERVAL_S = 0.2


def _exit_now(code: int) -> None:
    """Leave nothing behind and end the process without running Python's exit machinery
    (which could wait on threads or on a parent that is gone)."""
    try:
        unlink_owned_files()
    finally:
        os._exit(code)


def _on_sigterm(signum: int, frame: object) -> None:
    _exit_now(128 + signum)


def set_parent_death_signal(signum: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send `signum` when the parent dies. False where prctl is missing."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            _exit_now(1)
        time.sleep(WATCH_INTERVAL_S)


def bind_to_parent(parent_pid: int) -> None:
    """Call first thing in a stage process (main thread): exit with the parent, ignore SIGINT."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        _exit_now(1)
    threading.Thread(target=_watch, args=(parent_pid,), name="parent-watch", daemon=True).start()
