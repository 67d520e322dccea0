"""Role switches: a stage process stops serving as one kind and serves as another, while the
engine goes on serving (issue 14). `EPDEngine.switch_role(kind, index, new_kind)` runs it:

1. checks: the stage is alive and not switching; its kind keeps a live instance; a prefill
   whose KV arena a decode shares, or a stage whose weights others map, cannot go (say which);
2. the old handle stops being routed to; the worker gets SwitchRole and lets the role finish
   what it holds, or hand it over: an encoder finishes its batches in flight, gives back the
   tasks it has not started (Unencoded: the other encoders take them), and the prefills copy
   the embeddings their queued prompts hold in its arena into MM blocks of their own
   (EncoderDraining; a prefill role that starts meanwhile is told right after its Peers), so a
   blocked prefill does not hold the switch up; a prefill finishes its prompts and waits for
   decode to pull their KV blocks; a decode gives its requests, with their KV, to the other
   decodes (HandedOver). Then it closes the role and builds the new one in the same process
   (ipc/worker.py);
3. the new role goes through start-up as at engine start (Loaded, SizeKV for a KV owner,
   Exported, Peers, Ready) under a new handle: `<new_kind><next index>`, on the stage's host and
   device, built as a stage of that host is at start-up (stage_handles.role_spec: no memory of
   the orchestrator's on another host); its weights are mapped from a stage on its host and
   device that holds them (engine/roles/weights.py), else copied from a live stage that holds
   them over a PeerLink (ipc/peer_link.py: gloo on the CPU, NCCL between GPUs, across hosts too;
   the source listens on its host's address), else read from disk (`weights=` chooses);
4. the stages that read the old role's arenas drop them once it has closed (a link closes from
   its reading end), and those that read the new role's learn of them (PeerArena: the prefills
   an encoder's, the decodes a prefill's), per pair as at start-up (stage_handles.peer_view:
   mapped on one host, linked across hosts); the old handle stays in its kind's list as a hole
   (indices never move), marked `moved_to`.

Each switch is recorded (durations of the drain and of the build, tasks handed over) in
`status()["switches"]`. The orchestrator's step (engine/epd.py) passes what a draining role gives
up to `re_encode` (an encoder's unstarted part) and `hand_over` (a decode's request).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from functools import partial

from engine.messages import (
    DecodeTask,
    EncoderDraining,
    Exported,
    FreeKV,
    Loaded,
    PeerArena,
    Ready,
    SendWeights,
    Sized,
    SizeKV,
    Unencoded,
)
from engine.request import TokenEvent
from engine.roles import build_role
from engine.roles.weights import covers
from engine.sampling import RequestError
from engine.stage_handles import (
    READS,
    StageError,
    StageHandle,
    absorb,
    link_address,
    peer_view,
    peers_for,
    role_spec,
    smallest_kv_pool,
)
from ipc.worker import Crashed, Switched, SwitchRole

KINDS = ("encode", "prefill", "decode")
log = logging.getLogger("engine.epd")


def parts_of(kind: str, mode: str) -> str:
    """The weights a stage of `kind` holds: the tower (an encoder), the LM, or both (a pd prefill)."""
    return "vision" if kind == "encode" else "all" if kind == "prefill" and mode == "pd" else "lm"


def check_switch(epd, kind: str, index: int, new_kind: str) -> StageHandle:
    """The stage to switch, or RequestError saying why it cannot."""
    if kind not in KINDS or new_kind not in KINDS:
        raise RequestError(f"switch_role: kinds are {', '.join(KINDS)}; got {kind!r} -> {new_kind!r}")
    if kind == new_kind:
        raise RequestError(f"switch_role: {kind}{index} already serves as {kind}")
    if epd.mode == "pd" and "encode" in (kind, new_kind):
        raise RequestError("switch_role: pd mode has no encoders (prefill encodes the images)")
    stage = epd.stages.get(f"{kind}{index}")
    if stage is None or stage.moved_to is not None:
        have = [h.name for h in epd.of_kind(kind) if h.moved_to is None]
        raise RequestError(f"switch_role: there is no stage {kind}{index} (the {kind} stages: {have})")
    if not stage.alive() or stage.switching:
        raise RequestError(f"switch_role: {stage.name} is {'switching' if stage.switching else 'not alive'}")
    if not any(h.alive() and h is not stage for h in epd.of_kind(kind)):
        raise RequestError(f"switch_role: {stage.name} is the last live {kind} stage; the engine needs one")
    why = pinned(epd, stage)
    if why:
        raise RequestError(f"switch_role: {why}")
    return stage


def pinned(epd, stage: StageHandle) -> str | None:
    """Why this live stage cannot change role whatever the new kind, or None: its KV arena is
    shared with a decode, its requests would go to a decode on another host, or others map its
    weights. The allocator does not pick such a stage (EPDEngine.load marks it)."""
    if stage.kind == "prefill" and any(h.alive() and h.ready and h.ready.get("kv_arena_of") == stage.name
                                       for h in epd.of_kind("decode")):
        return (f"{stage.name}'s KV arena is shared with a decode stage (start the engine with "
                "share_kv_arena=False to switch it)")
    # the decode that continues a handed-over request maps the old one's KV arena (DecodeTask.src_arena)
    away = ([h.name for h in epd.of_kind("decode") if h.alive() and h.host != stage.host]
            if stage.kind == "decode" else [])
    if away:
        return (f"{stage.name} would hand its running requests over to {', '.join(away)} on another host, which "
                "cannot map its KV arena (not supported yet across hosts)")
    mappers = [name for name, source in epd.weight_sources.items() if source == stage.name and epd.stages[name].alive()]
    if mappers:
        return f"{stage.name}'s weights are mapped by {', '.join(mappers)}; switch those first"
    return None


WEIGHT_SOURCES = ("auto", "map", "peer", "disk")


def start_switch(epd, stage: StageHandle, new_kind: str, weights: str = "auto") -> StageHandle:
    """Stop routing to `stage`, tell its worker to switch once drained; the new role's handle
    (starting: not routed to until it is Ready). weights: where the new role's come from —
    "map" (a stage on its host and device that holds them: zero copy), "peer" (a copy from a live
    stage that holds them, on any host, over a PeerLink the source serves on its host's address:
    NCCL between GPUs, gloo on the CPU), "disk", or "auto" (map, else peer, else disk). The new
    role keeps the stage's host and device."""
    if weights not in WEIGHT_SOURCES:
        raise RequestError(f"switch_role: weights = {weights!r}; use one of {', '.join(WEIGHT_SOURCES)}")
    parts = parts_of(new_kind, epd.mode)
    index = len(epd.of_kind(new_kind))
    # mapped: only from its host and device; copied: from any other (host, device), or the CPU's
    here = _weight_source(epd, parts, lambda h: h.placed == stage.placed) if weights in ("auto", "map") else None
    peer = (_weight_source(epd, parts, lambda h: h.placed != stage.placed or h.device == "cpu")
            if weights == "peer" or (weights == "auto" and here is None) else None)
    if weights in ("map", "peer") and (here or peer) is None:
        where = f"on {'/'.join(filter(None, stage.placed))}" if weights == "map" else "on a device it can copy from"
        raise RequestError(f"switch_role: weights={weights!r}, but no live stage {where} holds packed {parts} weights")
    spec = role_spec(epd, new_kind, index, stage.device, stage.host, weights=epd.stages[here].weights if here else None)
    new = StageHandle(new_kind, index, stage.device, stage.process, stage.inbox, None, starting=True,
                      switch_started=time.perf_counter(), host=stage.host)
    new.weights_from = f"mapped from {here}" if here else "read from disk"
    if peer is not None:
        source = epd.stages[peer]
        backend = "gloo" if stage.device == "cpu" else "nccl"
        address, port = link_address(source.host, epd.addresses)  # the source listens (rank 0), the new role connects
        spec = replace(spec, weights_peer=(address, port, backend, source.weights))
        new.peer_send = (source, SendWeights(address, port, backend))  # sent once the old role has closed
        new.weights_from = f"copied from {peer}" + (f" on host {source.host or '(the orchestrator)'}"
                                                    if source.host != stage.host else "") + f" over {backend}"
    epd.stages[new.name] = new
    epd.weight_sources = {**epd.weight_sources, new.name: here}
    stage.switching = new.name
    stage.send(SwitchRole(new.name, partial(build_role, spec)))
    if stage.kind == "encode":  # the prefills take the embeddings their queued prompts hold there
        for h in _readers_of(epd, "encode"):
            h.send(EncoderDraining(stage.index))
    return new


def _weight_source(epd, parts: str, where) -> str | None:
    """A live stage that where(handle) accepts whose packed weights cover `parts`."""
    for h in epd.stages.values():
        if where(h) and h.alive() and h.weights is not None and covers(h.weights.parts, parts):
            return h.name
    return None


def advance(epd, new: StageHandle, msg: object) -> None:
    """A start-up message from a switched stage's new role: the protocol's next step."""
    if isinstance(msg, Crashed):  # its death is noticed by _check_stages; wait_switch raises
        new.crash = msg.error
        log.error("stage %s crashed while switching role: %s\n%s", msg.stage, msg.error, msg.traceback)
        return
    absorb(epd.stages, msg)
    if isinstance(msg, Switched):  # the old role is closed: its handle becomes a hole
        old = next(h for h in epd.stages.values() if h.switching == new.name)
        old.dead, old.moved_to, old.switching = True, new.name, None
        new.outbox, old.outbox = old.outbox, None
        epd.switches.append({"from": old.name, "to": new.name, "weights": new.weights_from,
                             "drain_s": round(msg.drain_s, 3), "handed_over": old.handed_over})
        for h in _readers_of(epd, old.kind):  # drained: nothing reads its arena; a link closes from the reader
            h.send(PeerArena(old.kind, old.index, None))
        if new.peer_send is not None:  # the new role is about to wait for its weights: the source sends
            source, send = new.peer_send
            source.send(send)
    elif isinstance(msg, Loaded) and new.kv_owner:
        new.send(SizeKV(share=1.0, for_decode=False))
    elif (isinstance(msg, Exported) and new.kind == "prefill") or (isinstance(msg, Sized) and new.kind == "decode"):
        new.send(peers_for(new, epd.stages.values(), epd.addresses))  # the arenas it reads, as at start-up
        if new.kind == "prefill":  # an encoder that began to drain before this role read arenas: as start_switch
            for h in epd.of_kind("encode"):
                if h.switching and not h.dead:
                    new.send(EncoderDraining(h.index))
    elif isinstance(msg, Ready):
        _finish(epd, new)


def _readers_of(epd, kind: str) -> list[StageHandle]:
    """The stages that read arenas of `kind` (prefills an encoder's, decodes a prefill's) and
    are told of a change: not dead, not switching (its role reads nothing new and closes what it
    reads), not a new role before its Peers (which has the arenas as they are then)."""
    return [h for h in epd.stages.values() if READS.get(h.kind) == kind and not h.dead and not h.switching
            and (not h.starting or (h.arena if h.kind == "prefill" else h.kv_blocks) is not None)]


def _finish(epd, new: StageHandle) -> None:
    """The new role is Ready: the stages that read arenas of its kind learn of its arena, each
    as at start-up (mapped on its host, else linked: the new role serves it); then it is routed
    to."""
    record = next(r for r in epd.switches if r["to"] == new.name)
    for h in _readers_of(epd, new.kind):
        h.send(PeerArena(new.kind, new.index, peer_view(new, h, epd.addresses)))
    new.starting = False
    epd.input_processor.kv_blocks = smallest_kv_pool(h for h in epd.stages.values() if h.alive())
    record["seconds"] = round(time.perf_counter() - new.switch_started, 3)


def done(epd, new: StageHandle) -> dict | None:
    """The switch's record once the new role serves; None while it drains or starts; StageError
    if its process died on the way (its requests, if any, fail as a dead stage's)."""
    if new.dead or not new.process.is_alive():
        raise StageError(f"switch to {new.name} failed: the stage died ({new.crash or 'no message'})")
    if new.starting:
        return None
    return dict(next(r for r in epd.switches if r["to"] == new.name))


def wait_switch(epd, new: StageHandle, timeout_s: float) -> dict:
    """Step the engine (its events kept for the next step) until the new role serves."""
    deadline = time.monotonic() + timeout_s
    while (record := done(epd, new)) is None:
        if time.monotonic() > deadline:
            raise StageError(f"switch to {new.name} not done within {timeout_s:g} s")
        events = epd.step(timeout_s=0.02)  # two statements: step replaces epd.late_events
        epd.late_events.extend(events)
    return record


def re_encode(epd, src: StageHandle, msg: Unencoded, events: list[TokenEvent]) -> None:
    """A part a switching encoder had not started: its items to the least-loaded live encoders."""
    epd._done(src, msg.req_id, msg.items)
    src.handed_over += 1
    flight = epd.flights.get(msg.req_id)
    if flight is None:  # ended meanwhile: that stage has answered for its bytes
        if epd.image_bytes is not None:
            epd.image_bytes.answered(msg.req_id, src.name)
        return
    flight.parts.pop(msg.part, None)
    try:
        epd._dispatch_encode(flight)
    except StageError as e:
        epd._fail(flight, str(e), events)


def hand_over(epd, src: StageHandle, task: DecodeTask, events: list[TokenEvent]) -> None:
    """A request a switching decode gave up: to the least-loaded live decode, which pulls its
    KV from where it is (the old decode's arena, or prefill's if it had not started)."""
    now = time.perf_counter()
    epd._done(src, task.req_id, now=now)
    src.handed_over += 1
    flight = epd.flights.get(task.req_id)
    decodes = epd.of_kind("decode")
    dst = epd.router.decode_for([h.routing_load() for h in decodes]) if flight is not None else None
    if dst is None:  # ended meanwhile, or no decode left: the KV goes back where it is
        back = FreeKV(task.kv_blocks, task.prefill, decode=task.src_decode)
        epd._kv_owner(back).send(back)
        if flight is not None:
            flight.decode = None
            epd._fail(flight, "no decode process is alive", events)
        return
    flight.decode = dst
    epd._sent(decodes[dst], task.req_id, now=now)
    decodes[dst].send(task)
