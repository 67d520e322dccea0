"""The orchestrator's side of its stage processes: one StageHandle per stage (process,
channels, load, liveness, reports), spawning a worker with its role, reading the outboxes, and
the start-up protocol (engine/messages.py): once every stage on a device has loaded, its KV
owners size their arenas one at a time; with every arena made, each stage gets the handles it
maps; every stage reports Ready. CPU arena files stay until shutdown (a stage that switches role
maps its peers' arenas then; each stage removes the files it made or mapped if its parent dies)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from engine.messages import Exported, Loaded, Peers, Ready, ServeArena, Sized, SizeKV
from engine.roles import RoleSpec, build_role
from engine.roles.weights import covers
from engine.router import InstanceLoad
from ipc.channel import Inbox
from ipc.linked_arena import LinkedHandle, LinkSpec
from ipc.peer_link import free_port
from ipc.worker import Crashed, Shutdown, StageStatus, worker_main

log = logging.getLogger("engine.epd")
DRAIN_LIMIT = 512  # messages read from one stage per call: a busy stage cannot hold up step or status


def stage_summary(name: str, stats: dict) -> str:
    """One line for the start-up log, from a Ready message's stats."""
    threads = stats.get("torch_threads", 0)
    line = (f"stage {name}: pid {stats.get('pid')} on {stats.get('device')} ({stats.get('backend')}, "
            f"{threads} CPU thread{'s' if threads != 1 else ''})")
    if "kv_cache_blocks" in stats:
        line += (f"; KV {stats['kv_cache_blocks']} blocks = {stats['kv_cache_tokens']} tokens, "
                 f"{stats['kv_cache_gb']:g} GB")
        if stats.get("kv_arena_of"):
            line += f" (in {stats['kv_arena_of']}'s arena)"
        elif stats.get("kv_blocks_for_decode"):
            line += f" (+{stats['kv_blocks_for_decode']} blocks of decode's in the same arena)"
    if "mm_arena_blocks" in stats:
        line += f"; MM {stats['mm_arena_blocks']} blocks, {stats['mm_arena_gb']:g} GB"
    if stats.get("mm_in_place_from"):
        line += f" (reads encoder(s) {stats['mm_in_place_from']} in place)"
    if "graph_buckets" in stats:
        buckets = stats["graph_buckets"]
        line += f"; graphs {buckets} in {stats.get('graph_capture_s', 0):.1f} s" if buckets else "; no graphs (eager)"
    return line


class StageError(RuntimeError):
    """A request failed inside a stage, or a stage failed to start (the message names the stage)."""


def usable_cores() -> int:
    """The CPU cores this process may use (its affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def stage_threads(num_stages: int) -> int:
    """torch CPU threads per stage process: the cores this process may use, shared out."""
    return max(1, usable_cores() // num_stages)


@contextlib.contextmanager
def _sigint_ignored_by_children() -> Iterator[None]:
    """Processes started inside ignore SIGINT from their first instruction (an ignored signal
    stays ignored across exec, and Python keeps it so): a Ctrl-C while a stage is still
    importing cannot kill it with a traceback. Only the main thread may change handlers; a
    Ctrl-C to this process in these few milliseconds is lost."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclass(eq=False)
class StageHandle:
    """One stage process as the orchestrator sees it: identity, channels, load, liveness and
    what it last reported. Messages name their stage by `name` ("prefill0") or by index within
    a kind (`FreeKV.prefill`); both lead here, nothing parses the name back."""

    kind: str  # "encode", "prefill" or "decode"
    index: int  # among the instances of its kind
    device: str
    process: Any
    inbox: Inbox  # we write, the stage reads
    outbox: Any | None  # the read end of its outbox (it is the only writer); None once it is gone
    load: int = 0  # in flight on it: images for an encoder, requests for prefill and decode
    dead: bool = False  # its death has been noticed and handled (_check_stages)
    ready: dict | None = None  # what it holds, from its Ready message
    stats: dict = field(default_factory=dict)  # its latest StageStatus report
    crash: str | None = None  # the error it reported before exiting
    arena: Any | None = None  # the arena it exported (encoders: MM, prefill: KV), for cleanup
    loaded: bool = False  # its weights are in memory (Loaded)
    kv_owner: bool = False  # it sizes a KV arena of its own (SizeKV)
    kv_blocks: int | None = None  # the KV blocks it owns, once sized (Sized)
    weights: Any | None = None  # the manifest of its weights, packed for stages that map them (Loaded)
    # role switches (engine/switching.py): the new role's name while this one drains; the name it
    # became (this handle is then a hole in its kind's list); a new role not yet Ready
    switching: str | None = None
    moved_to: str | None = None
    starting: bool = False
    switch_started: float = 0.0
    handed_over: int = 0  # tasks a switching role gave up to another instance (decode: requests, encode: parts)
    weights_from: str = ""  # a new role's: "mapped from X", "copied from X over gloo", "read from disk"
    peer_send: tuple | None = None  # (source handle, SendWeights) for a copy, sent when the old role closed
    host: str = ""  # its host label in the placement ("": the orchestrator's)

    @property
    def name(self) -> str:
        return f"{self.kind}{self.index}"

    @property
    def placed(self) -> tuple[str, str]:
        """(host, device): stages that share this share memory (and a GPU's budget)."""
        return self.host, self.device

    def alive(self) -> bool:
        """Routable: not known dead, not switching role or starting one, and its process running."""
        return not (self.dead or self.switching or self.starting) and self.process.is_alive()

    def routing_load(self) -> InstanceLoad:
        return InstanceLoad(self.index, self.load, self.alive())

    def send(self, msg: object) -> None:
        """Nothing is written to a stage known to be dead (what it held died with it)."""
        if not self.dead:
            self.inbox.put(msg)


def spawn_stage(ctx, spec: RoleSpec, device: str) -> StageHandle:
    """Start a worker process hosting spec's role; the handle the orchestrator keeps for it."""
    name = spec.name
    inbox = Inbox(ctx, name)
    outbox, writer = ctx.Pipe(duplex=False)
    args = (partial(build_role, spec), name, os.getpid(), spec.config.torch_threads, inbox.reader, writer)
    proc = ctx.Process(target=worker_main, args=args, name=name, daemon=True)
    with _sigint_ignored_by_children():
        proc.start()
    # Only the stage writes its outbox and reads its inbox: with our copies of those ends
    # closed, its death is an EOF for our reader and an EPIPE for our writer, even mid-message.
    writer.close()
    inbox.started()
    return StageHandle(spec.kind, spec.index, device, proc, inbox, outbox, host=spec.host)


def read_stages(stages: Iterable[StageHandle], timeout_s: float) -> list[tuple[StageHandle, object]]:
    """(stage, message) for what the stages' outboxes hold, waiting up to timeout_s for the
    first; at most DRAIN_LIMIT per stage. An outbox whose stage is gone (EOF, or a message cut
    short by its death) is dropped."""
    from multiprocess.connection import wait

    readers = {h.outbox: h for h in stages if h.outbox is not None}
    if not readers:
        time.sleep(timeout_s)
        return []
    msgs = []
    for conn in wait(list(readers), timeout_s):
        handle = readers[conn]
        try:
            for _ in range(DRAIN_LIMIT):
                msgs.append((handle, conn.recv()))
                if not conn.poll():
                    break
        except (EOFError, OSError):
            conn.close()
            handle.outbox = None
    return msgs


def await_ready(stages: dict[str, StageHandle], deadline: float, room_for_switch: bool = False,
                addresses: dict[str, str] | None = None) -> int:
    """Run the start-up protocol until every stage is Ready (StageError: one failed, died or
    missed the deadline); log one line per stage. Returns the
    smallest KV pool of any stage: what one request may use. addresses: host label -> the
    address its stages serve arenas on (stages on different hosts read them over links)."""
    handles = list(stages.values())
    peers_sent = False
    sizing: dict[tuple, StageHandle] = {}  # (host, device) -> the KV owner sizing there now
    while any(h.ready is None for h in handles):
        size_next(handles, sizing, room_for_switch)
        if not peers_sent and all(h.arena is not None for h in handles if h.kind != "decode") \
                and all(h.kv_blocks is not None for h in handles if h.kv_owner):
            for handle in handles:
                if handle.kind in READS:
                    handle.inbox.put(peers_for(handle, handles, addresses or {}))
            peers_sent = True
        msgs = read_stages(handles, 1.0)
        if not msgs:
            msgs = read_stages(handles, 0.0)  # a stage that just died: what it sent first
            _raise_if_not_starting(handles, msgs, deadline)
        for _, msg in msgs:
            absorb(stages, msg)
            if isinstance(msg, Sized):
                sizing.pop(stages[msg.stage].placed, None)
    for handle in handles:
        log.info(stage_summary(handle.name, handle.ready))
    return smallest_kv_pool(handles)


def stop_stages(stages: list[StageHandle], read, timeout_s: float, readers_first: bool = False) -> None:
    """Shutdown to each live stage, reading on (read(timeout_s): the orchestrator's, its messages
    discarded) while they exit, within timeout_s; then terminate, kill, and close the channels.
    readers_first (stages on several hosts): decodes, then prefills, then encoders, so that a link
    closes from its reading end and each owner's server thread ends before its process."""
    deadline = time.monotonic() + timeout_s
    kinds = ("decode", "prefill", "encode")
    groups = [[h for h in stages if h.kind == k] for k in kinds] if readers_first else [stages]
    for group in groups:
        for stage in group:
            if stage.process.is_alive():
                stage.inbox.put(Shutdown())
        while any(h.process.is_alive() for h in group) and time.monotonic() < deadline:
            read(0.05)
    for stage in stages:
        proc = stage.process
        if proc.is_alive():
            proc.terminate()  # the stage's SIGTERM handler removes its files and exits
            proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
        proc.join(timeout=5)
    for stage in stages:
        stage.inbox.close()
        if stage.outbox is not None:
            stage.outbox.close()
            stage.outbox = None


def smallest_kv_pool(stages: Iterable[StageHandle]) -> int:
    """The KV blocks one request may use: the smallest pool of these ready stages."""
    return min(h.ready["kv_cache_blocks"] for h in stages if h.ready and "kv_cache_blocks" in h.ready)


def absorb(stages: dict[str, StageHandle], msg: object) -> None:
    """A start-up message into its stage's handle (Crashed: StageError)."""
    stage = stages.get(getattr(msg, "stage", ""))
    if isinstance(msg, Loaded):
        stage.loaded, stage.kv_owner, stage.weights = True, msg.kv_owner, msg.weights
    elif isinstance(msg, Sized):
        stage.kv_blocks = msg.blocks
    elif isinstance(msg, Exported):
        stage.arena = msg.handle
    elif isinstance(msg, Ready):
        stage.ready = msg.stats
    elif isinstance(msg, Crashed):
        log.debug("stage %s failed to start:\n%s", msg.stage, msg.traceback)
        raise StageError(f"stage {msg.stage} failed to start: {msg.error}")
    elif isinstance(msg, StageStatus):
        stage.stats = msg.stats


def await_loaded(stages: dict[str, StageHandle], names: list[str], deadline: float) -> None:
    """Wait until the named stages have loaded their weights (their Loaded message carries the
    manifest of weights packed for the stages started after them, which map them)."""
    handles = list(stages.values())
    while any(not stages[n].loaded for n in names):
        msgs = read_stages(handles, 1.0)
        if not msgs:
            msgs = read_stages(handles, 0.0)
            _raise_if_not_starting(handles, msgs, deadline)
        for _, msg in msgs:
            absorb(stages, msg)


def weight_plan(stages: list[tuple[str, object, str]]) -> dict[str, str | None]:
    """Which stage's weights each stage maps: stages are (name, device, parts) in start order,
    device any key of where the memory is (EPDEngine: (host, device), as StageHandle.placed);
    a stage maps those of the first one before it on its device whose parts cover its own ("all"
    covers "vision" and "lm"), or none (it reads the checkpoint, and packs it when others map it)."""
    plan: dict[str, str | None] = {}
    for name, device, parts in stages:
        plan[name] = next((other for other, d, p in stages[: len(plan)] if d == device and plan[other] is None
                           and covers(p, parts)), None)
    return plan


def role_spec(epd, kind: str, index: int, device: str, host: str, **fields) -> RoleSpec:
    """The RoleSpec of a stage of `kind` on (host, device), at engine start or after a role
    switch (engine/switching.py): the orchestrator's shared memory (the image byte arena, which
    exists only when no stage is on another host; the busy board) only for the stages of its host."""
    return RoleSpec(kind, index, replace(epd.config, device=device), encodes=epd.mode == "pd",
                    image_bytes=epd.image_bytes.handle if epd.image_bytes else None,
                    busy_board=epd.busy_board.handle if epd.busy_board and not host else None, host=host, **fields)


def link_address(host: str, addresses: dict[str, str]) -> tuple[str, int]:
    """Where a stage on `host` listens for a link (rank 0 of a PeerLink: an arena it serves,
    weights it sends): its node's address (addresses, from the cluster; loopback for host labels
    of this machine) and a port free there now (asked of the node itself on a cluster)."""
    if host and host in addresses:  # a node of a Ray cluster (engine/ray_stages.py)
        from engine.ray_stages import free_port_on

        return addresses[host], free_port_on(host, addresses[host])
    return addresses.get(host, "127.0.0.1"), free_port()  # this machine: the orchestrator's, or a label of it


def peer_view(owner: StageHandle, reader: StageHandle, addresses: dict[str, str]):
    """What `reader` is given for `owner`'s arena: its handle (mapped) when they share a host;
    else a LinkedHandle, and the owner is told to serve the arena on that link (ServeArena):
    NCCL between two GPUs, gloo otherwise (the stages' CPU memory over TCP). The owner listens
    on its host's address (link_address)."""
    if owner.host == reader.host:
        return owner.arena
    arena = owner.arena
    gpus = arena.device.startswith("cuda") and reader.device.startswith("cuda") and arena.device != reader.device
    link = LinkSpec(*link_address(owner.host, addresses), "nccl" if gpus else "gloo")
    owner.send(ServeArena(link, reader.name))
    return LinkedHandle(link, tuple(arena.shape), arena.dtype, arena.device)


READS = {"prefill": "encode", "decode": "prefill"}  # a reader's kind -> the kind whose arenas it reads


def peers_for(reader: StageHandle, stages: Iterable[StageHandle], addresses: dict[str, str]) -> Peers:
    """The Peers message of a prefill (the encoders' MM arenas) or a decode (the prefills' KV
    arenas, and the blocks each owns), at start-up or for a new role: each arena as peer_view
    gives it (mapped on the reader's host, else linked); None where a stage is gone (dead, or a
    hole left by a role switch) or is a new role not yet Ready (it tells its readers then)."""
    owners = [h for h in stages if h.kind == READS[reader.kind]]
    views = [None if h.dead or h.starting else peer_view(h, reader, addresses) for h in owners]
    return Peers(views, [h.kv_blocks or 0 for h in owners]) if reader.kind == "decode" else Peers(views)


def size_next(stages: list[StageHandle], sizing: dict[tuple, StageHandle], room_for_switch: bool = False) -> None:
    """On each device whose stages have all loaded, tell the next KV owner to size its arena
    (one at a time: each takes its share of what is left after the ones before it). sizing:
    (host, device) -> the owner sizing there now (its Sized message removes it). room_for_switch
    (--dynamic): on a device with an encoder, one owner's share is left free, for the arena
    of an encoder that switches to prefill or decode (else that switch finds no memory)."""
    for device in {h.placed for h in stages}:
        here = [h for h in stages if h.placed == device]
        if device in sizing or not all(h.loaded for h in here):
            continue
        waiting = [h for h in here if h.kv_owner and h.kv_blocks is None]
        if waiting:
            owner = waiting[0]
            for_decode = owner.kind == "prefill" and any(h.kind == "decode" and not h.kv_owner for h in here)
            spare = int(room_for_switch and any(h.kind == "encode" for h in here))
            owner.inbox.put(SizeKV(share=1.0 / (len(waiting) + spare), for_decode=for_decode))
            sizing[device] = owner


def _raise_if_not_starting(stages: list[StageHandle], msgs: list, deadline: float) -> None:
    if any(isinstance(m, Crashed) for _, m in msgs):
        return  # the caller raises with its message
    for handle in stages:
        if handle.ready is None and not handle.process.is_alive():
            code = handle.process.exitcode
            raise StageError(f"stage {handle.name} exited (exit code {code}) before it was ready")
    if time.monotonic() > deadline:
        waiting = [h.name for h in stages if h.ready is None]
        raise StageError(f"stage(s) {', '.join(waiting)} not ready within the start timeout")
