"""EPD orchestrator: encoders, prefill and decode as roles (engine/roles/) in worker processes
(ipc/worker.py).

Modes on the same code: "epd" (encoder processes, then prefill, then decode) and "pd" (prefill
encodes the images itself: the DistServe-style baseline). A placement such as
"E:0,1 P:2 D:3" (engine/placement.py) says how many instances of each stage run and on which GPU
("cpu" for the CPU); stages may share a device. Its GPUs are checked before anything starts.

Each stage is one StageHandle (engine/stage_handles.py: process, channels, load, liveness, reports,
arena; spawning and the start-up protocol live there too). The
orchestrator validates and tokenizes (engine/input_processor.py), splits each request's items (NeXT tiles) across
the least-loaded encoders (routing: engine/router.py; an item seen before goes to the encoder
that encoded it, whose cache answers at once: engine/mm_cache.py), reassembles the embeddings' block
references in prompt order for prefill, hands prefilled KV blocks to decode, and streams tokens
back with the per-request timestamps. A stage process that dies is detected: an encoder's work
moves to another encoder; if prefill or decode dies, the requests in flight fail with an error
and, once no instance of a kind is left, the engine refuses new work (status and shutdown still
answer at once).

Start-up: every stage process starts at once and loads its weights in parallel; once every
stage on a device has loaded, the KV owners there size their arenas one after another (each
sees what the others hold: EngineConfig.kv_cache_tokens, or its share of the GPU's memory); the
arenas' handles then go to the stages that map them. The CPU arena files stay while the engine
runs (a stage that changes role, engine/switching.py, maps its peers' arenas then); shutdown
removes them, and so does each stage for the files it made or mapped if this process dies.
Stages die with this process (ipc/parent_watch.py): build the engine in a thread that lives as
long as it, such as the main thread.

`status()` reads what the stages sent since the last step without waiting (reports, and the
frees it forwards between stages), so it is fresh whether or not requests are in flight;
`has_work()` is true while such messages wait, so a serving loop that steps only while there is
work forwards them too.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from engine import switching
from engine.allocator import AllocatorPolicy
from engine.config import EngineConfig, ModelConfig
from engine.dynamic import Dynamic
from engine.estimator import LoadEstimator
from engine.flight import Flight
from engine.input_processor import InputProcessor
from engine.messages import (
    Abort,
    DecodeTask,
    Encoded,
    Failed,
    FreeKV,
    FreeMM,
    HandedOver,
    Migrated,
    Prefilled,
    PrefillTask,
    Tokens,
    Unencoded,
)
from engine.mm_cache import EncoderHints, total_stats
from engine.output_processor import OutputProcessor
from engine.placement import Placement
from engine.request import Request, RequestOutput, Sequence, TokenEvent, append_step
from engine.roles import RoleSpec
from engine.router import Router
from engine.sampling import RequestError, SamplingParams
from engine.stage_handles import (
    StageError,
    StageHandle,
    await_loaded,
    await_ready,
    read_stages,
    role_spec,
    spawn_stage,
    stage_threads,
    stop_stages,
    weight_plan,
)
from ipc.arena import unlink
from ipc.busy_board import BusyBoard
from ipc.byte_arena import ByteArena, ByteRef
from ipc.worker import Crashed, StageStatus

log = logging.getLogger(__name__)
# the byte arena for image bytes on their way to the stages (full: sent pickled instead); small on
# a CPU-only host, whose /dev/shm may be small (64 MB in a default container)
IMAGE_BYTES = {"cuda": 256 << 20, "cpu": 16 << 20}


class EPDEngine:
    # An engine that was never started (tests build one with __new__) has no stages.
    stages: Mapping[str, StageHandle] = MappingProxyType({})
    mm_hints = EncoderHints(0)  # keeps nothing
    weight_sources: Mapping[str, str | None] = MappingProxyType({})  # stage -> the stage whose weights it maps
    switches: list[dict] = []  # noqa: RUF012 (read-only default for engines built with __new__)
    stage_group = None  # the Ray placement group of the stages on named hosts (engine/ray_stages.py)

    def __init__(self, model: str | Path | EngineConfig, placement: str | None = None, mode: str = "epd",
                 share_kv_arena: bool = True, start_timeout_s: float = 600.0,
                 dynamic: bool | AllocatorPolicy = False, cluster: str | None = None, **settings: Any) -> None:
        """settings: EngineConfig's fields (as for LLM), used by every stage; device is the
        default placement's home. share_kv_arena: one prefill and one decode on one device share
        one KV arena (decode reads the prompt's KV in place); otherwise decode pulls copies.
        dynamic: instances change role as the load shifts (engine/allocator.py's policy; True:
        the default policy with this config's max_num_seqs). cluster: a Ray address; stages
        whose placement names a host ("E:node0/0 P:node1/0 ...") run as actors on the node with
        that custom resource (engine/ray_stages.py); without it, host labels are hosts of this
        machine's processes (nothing mapped between them: the cross-host path, tested anywhere)."""
        import multiprocess as mp

        if mode not in ("epd", "pd"):
            raise ValueError(f"mode {mode!r}: use 'epd' or 'pd' (or the in-process LLM for 'aggregated')")
        config = EngineConfig.of(model, **settings)
        self.cfg = ModelConfig.from_dir(config.model)
        if not self.cfg.is_multimodal:
            raise ValueError(f"{self.cfg.architecture} has no vision tower: use the aggregated LLM")
        home = "cpu" if (config.device or "cpu") == "cpu" else str(torch.device(config.device).index or 0)
        where = Placement.parse(placement, mode) if placement else Placement.default(home, mode)
        where.check_devices(torch.cuda.device_count(), remote_hosts=bool(cluster))
        self.mode = mode
        threads = config.torch_threads or stage_threads(where.num_stages)
        config = replace(config.for_model(self.cfg), torch_threads=threads)
        self.config = config
        # what one request may use: set from the stages' KV pools once they are ready
        self.input_processor = InputProcessor(config, self.cfg, 0, config.num_mm_blocks(self.cfg))
        self.output_processor = OutputProcessor(self.input_processor.tokenizer)
        self.stages: dict[str, StageHandle] = {}  # by name, in start order
        self.router = Router()
        # where each image was encoded last (its embeddings likely cached there): 4x what the encoders hold
        self.mm_hints = EncoderHints(4 * len(where.of("encode")) * config.num_mm_blocks(self.cfg))
        self.broken: str | None = None
        self.flights: dict[int, Flight] = {}  # requests in the stages, by seq_id
        self.late_events: list[TokenEvent] = []  # events found outside step(), returned by the next
        self.switches: list[dict] = []  # role switches done (engine/switching.py)
        self.estimator = LoadEstimator()  # per stage: arrivals, queues, speed, predicted wait
        self.multi_host = where.multi_host
        # host label -> its node's address (a cluster): where stages listen for links (engine/switching.py too)
        self.cluster, self.addresses = cluster, {}
        if cluster:
            from engine import ray_stages

            self.addresses = ray_stages.connect(cluster, where)
            self.stage_group = ray_stages.StageGroup(where)  # reserved for the engine's life
        if dynamic is True:
            dynamic = AllocatorPolicy(max_num_seqs=config.max_num_seqs)
        self.dynamic = Dynamic(dynamic) if dynamic else None
        shared = share_kv_arena and where.shares_kv_device()
        # image bytes go to the stages that decode them through shared memory, not pickled (in the
        # tasks when some stage is on another host: no memory is shared with it)
        self.image_bytes = (ByteArena.create(IMAGE_BYTES["cuda" if torch.cuda.is_available() else "cpu"])
                            if self.cfg.is_multimodal and not where.multi_host else None)
        # which encoders have work in hand, read by the prefills on their device (encode_first);
        # shared memory of this host, so only its stages have it
        self.busy_board = BusyBoard.create() if mode == "epd" else None
        ctx = mp.get_context("spawn")
        specs = [role_spec(self, kind, i, device, host, shared=shared) for kind in ("encode", "prefill", "decode")
                 for i, (device, host) in enumerate(zip(where.of(kind), where.hosts_of(kind)))]
        # stages on one device share one copy of each weight half: the first to need it loads it
        # and packs it (engine/roles/weights.py), the others start once it has and map it
        maps = self.weight_sources = weight_plan([(s.name, (s.host, s.config.device),
                                                   switching.parts_of(s.kind, mode)) for s in specs])
        owners = {owner for owner in maps.values() if owner is not None}
        deadline = time.monotonic() + start_timeout_s
        try:
            for spec in specs:
                if maps[spec.name] is None:
                    self.stages[spec.name] = self._spawn(ctx, replace(spec, pack_weights=spec.name in owners))
            await_loaded(self.stages, sorted(owners), deadline)
            for spec in specs:
                if maps[spec.name] is not None:
                    manifest = self.stages[maps[spec.name]].weights  # None: it had no room to pack them
                    self.stages[spec.name] = self._spawn(ctx, replace(spec, weights=manifest))
            self.stages = {spec.name: self.stages[spec.name] for spec in specs}  # in index order
            self.input_processor.kv_blocks = await_ready(self.stages, deadline, room_for_switch=bool(dynamic),
                                                         addresses=self.addresses)
        except BaseException:
            self.shutdown()
            raise

    def _spawn(self, ctx, spec: RoleSpec) -> StageHandle:
        """A stage process here, or (a host label and a cluster) an actor on that node."""
        if spec.host and self.cluster:
            from engine import ray_stages

            return ray_stages.spawn_ray_stage(ctx, spec, spec.config.device, self.addresses[""], self.stage_group)
        return spawn_stage(ctx, spec, spec.config.device)

    @property
    def procs(self) -> Mapping[str, Any]:
        """Stage name -> its process, now, read-only (tests and the serve CLI read pids and kill stages)."""
        return MappingProxyType({name: h.process for name, h in self.stages.items()})

    def of_kind(self, kind: str) -> list[StageHandle]:
        """The instances of one kind, in index order."""
        return [h for h in self.stages.values() if h.kind == kind]

    @property
    def arenas(self) -> list:
        """Every arena the stages exported, weights included (shutdown unlinks them after killed stages)."""
        return [a for h in self.stages.values() for a in (h.arena, h.weights.handle if h.weights else None)
                if a is not None]

    # ------------------------------------------------------------------ engine loop (as LLM's)

    def add_request(self, request: Request | str, sampling: SamplingParams | None = None,
                    arrival: float | None = None) -> Sequence:
        """Validate and send one request into the stages; its events carry index = seq_id.
        arrival: when it arrived (perf_counter; default now): its TTFT counts from then."""
        arrival = time.perf_counter() if arrival is None else arrival  # its checks and hashing count
        self._check_stages(self.late_events)  # never route to a stage that died since the last step
        if self.broken:
            raise StageError(f"engine is broken: {self.broken}")
        seq, images = self.input_processor.make_sequence(request, sampling, preprocess=False)
        sp = seq.sampling
        unserved = [name for name, used in (("n", sp.n > 1), ("logprobs", sp.logprobs)) if used]
        if unserved:  # the stages run one sample per request and return no logprobs
            raise RequestError(f"sampling.{unserved[0]} = {getattr(sp, unserved[0])!r}: {self.mode} mode does not "
                               "serve it yet; the aggregated mode (LLM, serve.py --mode aggregated) does")
        state = self.output_processor.add(seq.seq_id, seq.prompt_ids, sp, arrival)
        layouts = [self.cfg.image_layout(h, w) for h, w in seq.image_sizes]
        flight = self.flights[seq.seq_id] = Flight(seq, state, [self._ship(x) for x in images],
                                                   [x.num_items for x in layouts])
        self._dispatch_encode(flight)
        return seq

    def _ship(self, src: object) -> object:
        """An image as the stages get it: encoded bytes (given as bytes, or a data URL, which
        make_sequence has decoded) copied into the byte arena once, as a ByteRef (freed by
        _free_bytes); a path (the stage reads the file) or a PIL image as given, and so is
        everything when the arena is full."""
        if self.image_bytes is None or not isinstance(src, (bytes, bytearray, memoryview)):
            return src
        ref = self.image_bytes.put(bytes(src))
        return ref if ref is not None else src

    def _free_bytes(self, flight: Flight, readers: Counter | None = None) -> None:
        """The request's image bytes are read (or it has ended): free their spans, once, after
        the stages in readers (names, tasks each) have answered for them."""
        refs = [src for src in flight.images if isinstance(src, ByteRef)]
        flight.images = [None if isinstance(src, ByteRef) else src for src in flight.images]
        if refs:
            self.image_bytes.hold(flight.seq.seq_id, refs, readers or Counter())

    def has_work(self) -> bool:
        """Requests in flight, events to return, or stage messages waiting (frees to forward,
        reports): step() has something to do."""
        if self.flights or self.late_events:
            return True
        from multiprocess.connection import wait

        outboxes = [h.outbox for h in self.stages.values() if h.outbox is not None]
        return bool(outboxes) and bool(wait(outboxes, 0))

    def abort(self, seq: Sequence) -> None:
        flight = self.flights.pop(seq.seq_id, None)
        if flight is not None:
            self.output_processor.remove(seq.seq_id)
            self._release(flight)

    def step(self, timeout_s: float = 0.05) -> list[TokenEvent]:
        """Handle the stage messages that arrive within timeout_s (at least one if any comes):
        a TokenEvent per token, with the output when a request ends, or with `error` when a
        stage failed it."""
        events, self.late_events = self.late_events, []
        msgs = self._read(0.0 if events else timeout_s)
        if not msgs:
            self._check_stages(events)
        for handle, msg in msgs:
            self._handle(handle, msg, events)
        if self.dynamic is not None:
            self.dynamic.tick(self)
        return events

    def _read(self, timeout_s: float) -> list[tuple[StageHandle, object]]:
        return read_stages(self.stages.values(), timeout_s)

    def _handle(self, stage: StageHandle, msg: object, events: list[TokenEvent]) -> None:
        """One message from `stage`: reports, frees to forward between stages, tokens, and the
        request's progress (encoded, prefilled, failed)."""
        stage = self.stages.get(getattr(msg, "stage", None)) or stage  # a role switch: the new role's messages
        if stage.starting:
            switching.advance(self, stage, msg)
            return
        encoders, prefills = self.of_kind("encode"), self.of_kind("prefill")
        if isinstance(msg, StageStatus):
            stage.stats = msg.stats
            return
        if isinstance(msg, Crashed):  # its death is handled when noticed (_check_stages)
            stage.crash = msg.error
            log.error("stage %s crashed: %s\n%s", msg.stage, msg.error, msg.traceback)
            return
        if isinstance(msg, FreeMM):  # prefill consumed embeddings: to the encoder that holds them
            encoders[msg.encoder].send(msg)
            return
        if isinstance(msg, FreeKV):  # decode pulled or finished reading KV: to its prefill (or decode)
            self._kv_owner(msg).send(msg)
            return
        if isinstance(msg, HandedOver):  # a decode changing role gave a request up: another continues it
            switching.hand_over(self, stage, msg.task, events)
            return
        if isinstance(msg, Unencoded):  # an encoder changing role gave a task back: another encodes it
            switching.re_encode(self, stage, msg, events)
            return
        if isinstance(msg, Tokens):  # those of requests no longer here (finished or aborted) are late
            self.estimator.steps(stage.name, len(msg.req_ids), time.perf_counter())
            self._tokens([(self.flights[r].seq, t) for r, t in zip(msg.req_ids, msg.token_ids) if r in self.flights],
                         time.perf_counter(), events)
            return
        if isinstance(msg, Encoded):
            self._done(encoders[msg.encoder], msg.req_id, len(msg.blocks))
        elif isinstance(msg, Failed) and stage.kind == "encode":
            self._done(stage, msg.req_id, msg.images)
        flight = self.flights.get(getattr(msg, "req_id", None))
        if flight is None:
            if self.image_bytes is not None and isinstance(msg, (Encoded, Failed, Prefilled)):
                self.image_bytes.answered(msg.req_id, stage.name)  # the spans it held are free once all have
            if isinstance(msg, Encoded):  # images of a request that ended: give the blocks back
                encoders[msg.encoder].send(FreeMM(msg.blocks, msg.encoder))
            elif isinstance(msg, Prefilled):  # KV of a request that ended meanwhile
                self._done(prefills[msg.prefill], msg.req_id)
                prefills[msg.prefill].send(FreeKV(msg.kv_blocks, msg.prefill))
            elif isinstance(msg, Failed) and stage.kind == "prefill":
                self._done(stage, msg.req_id)
            return  # a late message for a finished or failed request
        now = time.perf_counter()
        if isinstance(msg, Encoded):
            part = flight.parts.pop(msg.part, None)
            if part is None:  # a part already moved to another encoder (this one was thought dead)
                encoders[msg.encoder].send(FreeMM(msg.blocks, msg.encoder))
                return
            for item, block in zip(part[1], msg.blocks):
                flight.refs[item] = (msg.encoder, block)
            self.mm_hints.learn(flight.keys(part[1]), msg.encoder)
            if not flight.parts:  # the last part: the critical path's preprocess and tower times
                self._free_bytes(flight)
                metrics = flight.state.metrics
                metrics.encode_end, metrics.preprocess_s, metrics.tower_s = now, msg.preprocess_s, msg.tower_s
                metrics.encoder_times = msg.times
                try:
                    self._dispatch_prefill(flight, now)
                except StageError as e:  # no prefill instance left: this request fails, step goes on
                    self._fail(flight, str(e), events)
        elif isinstance(msg, Migrated):
            flight.state.metrics.kv_bytes, flight.state.metrics.kv_migrate_s = msg.kv_bytes, msg.seconds
        elif isinstance(msg, Prefilled):
            self._prefilled(flight, msg, now, events)
        elif isinstance(msg, Failed):
            if stage.kind == "prefill" and flight.prefill is not None:
                self._done(prefills[flight.prefill], msg.req_id, now=now)
                flight.prefill = None
            elif stage.kind == "encode":  # that task is answered (one part per encoder in flight)
                flight.parts.pop(next((p for p, (e, _) in flight.parts.items() if e == stage.index), None), None)
            self._fail(flight, f"{msg.stage}: {msg.error}", events)

    def _prefilled(self, flight: Flight, msg: Prefilled, now: float, events: list[TokenEvent]) -> None:
        """Prefill is done: its KV goes to the least-loaded live decode, its first token out."""
        seq, prefill = flight.seq, self.of_kind("prefill")[msg.prefill]
        self._free_bytes(flight)  # pd: the prefill read them
        flight.state.metrics.mm_bytes, flight.state.metrics.mm_copy_s = msg.mm_bytes, msg.mm_copy_s
        flight.state.metrics.prefill_times = msg.times
        self._done(prefill, seq.seq_id, now=now)
        flight.prefill = None  # its KV is decode's (or back with prefill) from here on
        decodes = self.of_kind("decode")
        flight.decode = self.router.decode_for([h.routing_load() for h in decodes])
        if flight.decode is None:  # no decode instance left: give the KV back, fail the request
            prefill.send(FreeKV(msg.kv_blocks, msg.prefill))
            self._fail(flight, "no decode process is alive", events)
            return
        decode = decodes[flight.decode]
        self._sent(decode, seq.seq_id, now=now)
        decode.send(DecodeTask(seq.seq_id, seq.prompt_ids, msg.first_token, msg.prefill, msg.kv_blocks, seq.sampling,
                               seq.seed, seq.stop_token_ids))
        self._tokens([(seq, msg.first_token)], now, events)

    def _sent(self, stage: StageHandle, req_id: int, units: int = 0, now: float | None = None) -> None:
        """A task to `stage`: its routing load (items for an encoder, requests for the others)
        and the estimator's record (units: items, prompt tokens, or 0 for a decode)."""
        stage.load += units if stage.kind == "encode" else 1
        self.estimator.sent(stage.name, req_id, units, time.perf_counter() if now is None else now)

    def _done(self, stage: StageHandle, req_id: int, units: int = 0, now: float | None = None) -> None:
        """`stage` answered (or gave up) one task of req_id: what _sent counted comes off."""
        stage.load -= units if stage.kind == "encode" else 1
        self.estimator.done(stage.name, req_id, time.perf_counter() if now is None else now)

    def _kv_owner(self, free: FreeKV) -> StageHandle:
        """The stage whose arena the freed KV blocks are in: a prefill, or a decode that handed
        its requests over."""
        return self.of_kind("decode")[free.decode] if free.decode is not None else self.of_kind("prefill")[free.prefill]

    def _fail(self, flight: Flight, error: str, events: list[TokenEvent]) -> None:
        del self.flights[flight.seq.seq_id]
        self.output_processor.remove(flight.seq.seq_id)
        self._release(flight)
        events.append(TokenEvent(flight.seq.seq_id, -1, "", error=error))

    def _release(self, flight: Flight) -> None:
        """Free what a request still holds in the stages: embeddings not yet handed to prefill,
        its decode slot (KV still in prefill is freed when its late Prefilled arrives; embeddings
        handed to prefill are freed by prefill)."""
        readers = Counter(self.of_kind("encode")[encoder].name for encoder, _ in flight.parts.values())
        if self.mode == "pd" and flight.prefill is not None:  # it reads the bytes of its task
            readers[self.of_kind("prefill")[flight.prefill].name] += 1
        self._free_bytes(flight, readers)  # no span is reused while a stage may still read it
        encoders = self.of_kind("encode")
        for encoder, block in flight.refs.values():
            encoders[encoder].send(FreeMM([block], encoder))
        flight.refs.clear()
        if flight.decode is not None:
            decode = self.of_kind("decode")[flight.decode]
            self._done(decode, flight.seq.seq_id)
            decode.send(Abort(flight.seq.seq_id))
            flight.decode = None

    def generate(self, requests: Iterable[Request | str], sampling: SamplingParams | None = None
                 ) -> list[RequestOutput]:
        """Run all requests through the stages; outputs in request order. A request that fails
        in a stage raises StageError after the others have finished."""
        seqs: list[Sequence] = []
        outputs: dict[int, RequestOutput] = {}
        errors: dict[int, str] = {}

        def take(events: list[TokenEvent]) -> None:
            for ev in events:
                if ev.error is not None:
                    errors[ev.index] = ev.error
                elif ev.output is not None:
                    outputs[ev.index] = ev.output

        try:
            for r in requests:
                seqs.append(self.add_request(r, sampling))
                take(self.step(0.0))  # the stages' answers are handled as they come, not after the last add
        except Exception:  # one bad request: none of the batch runs
            for seq in seqs:
                self.abort(seq)
            raise
        while any(s.seq_id in self.flights for s in seqs) or self.late_events:
            take(self.step())
        if errors:
            raise StageError("; ".join(f"request {i}: {e}" for i, e in sorted(errors.items())))
        return [outputs[s.seq_id] for s in seqs]

    def status(self) -> dict:
        """The engine and every stage now: reads (without waiting) what the stages sent since
        the last step and handles it; events found there are returned by the next step."""
        for handle, msg in self._read(0.0):
            self._handle(handle, msg, self.late_events)
        self._check_stages(self.late_events)
        return {
            "mode": self.mode,
            "stages_alive": {h.name: h.moved_to is None and h.process.is_alive() for h in self.stages.values()},
            "requests_in_flight": len(self.flights),
            "encoder_images_in_flight": [h.load for h in self.of_kind("encode")],  # items (NeXT: tiles)
            "mm_cache": {**total_stats({h.name: h.stats for h in self.stages.values()}), "hints": len(self.mm_hints)},
            "broken": self.broken,
            # per stage: pid, device and what it holds (from its start), then its latest report
            # (queues, blocks used, graphs)
            "stages": {h.name: {**(h.ready or {}), **h.stats, **({"moved_to": h.moved_to} if h.moved_to else {})}
                       for h in self.stages.values()},
            "switches": list(self.switches),  # role switches: from, to, weights, drain_s, handed_over, seconds
            "load": self.load(),  # the load estimator's figures (engine/estimator.py)
            **({"allocator": self.dynamic.status()} if self.dynamic is not None else {}),
        }

    def load(self) -> dict:
        """The load estimator's snapshot over the live, routed stages; a stage that cannot change
        role (switching.pinned) has "pinned": why."""
        live = {h.name: h.kind for h in self.stages.values() if h.moved_to is None and h.alive()}
        blocks = {name: {arena: self.stages[name].stats.get(arena) for arena in ("kv_blocks", "mm_blocks")}
                  for name in live}
        snapshot = self.estimator.snapshot(time.perf_counter(), live, blocks)
        for name, row in snapshot["stages"].items():  # a stage that cannot change role is not a donor
            why = switching.pinned(self, self.stages[name])
            if why:
                row["pinned"] = why
        return snapshot

    def switch_role(self, kind: str, index: int, new_kind: str, weights: str = "auto", timeout_s: float = 300.0
                    ) -> dict:
        """Make stage `kind index` serve as `new_kind` (engine/switching.py): it drains, its worker
        builds the new role, which starts up as at engine start; requests go on meanwhile (their
        events come from the next step). weights: "auto", "map", "peer" or "disk" (where the new
        role's come from: switching.start_switch). Returns once it serves: {from, to, weights,
        drain_s, handed_over, seconds}. RequestError: not possible (the message says why)."""
        return switching.wait_switch(self, self.stages[self.begin_switch(kind, index, new_kind, weights)], timeout_s)

    def begin_switch(self, kind: str, index: int, new_kind: str, weights: str = "auto") -> str:
        """switch_role without the wait: the name the stage will have; steps advance the switch
        and switch_done(name) tells when it is over (the serving loop's way)."""
        stage = switching.check_switch(self, kind, index, new_kind)
        return switching.start_switch(self, stage, new_kind, weights).name

    def switch_done(self, name: str) -> dict | None:
        """The record of the switch to `name` once it serves, else None; StageError if it died."""
        return switching.done(self, self.stages[name])

    def _dispatch_encode(self, flight: Flight) -> None:
        """Split the request's items (images, or LLaVA-NeXT bases and tiles) not yet encoded or
        being encoded over the least-loaded live encoders (one part each); in pd mode (or without
        images) go straight to prefill."""
        if not flight.images or self.mode == "pd":
            self._dispatch_prefill(flight, time.perf_counter())
            return
        in_flight = {i for _, items in flight.parts.values() for i in items}
        pending = [i for i in range(len(flight.items)) if i not in flight.refs and i not in in_flight]
        encoders = self.of_kind("encode")
        assignment = self.router.encoders_for(pending, [h.routing_load() for h in encoders], flight.seq.mm_keys,
                                              self.mm_hints.where)
        if assignment is None:
            raise StageError("no encoder process is alive")
        flight.state.metrics.encode_start = flight.state.metrics.encode_start or time.perf_counter()
        for encoder, items in assignment.items():
            self._sent(encoders[encoder], flight.seq.seq_id, len(items))
            part = flight.next_part
            flight.next_part += 1
            flight.parts[part] = (encoder, items)
            encoders[encoder].send(flight.encode_task(part, items))

    def _dispatch_prefill(self, flight: Flight, now: float) -> None:
        seq = flight.seq
        flight.state.metrics.prefill_start = now
        prefills = self.of_kind("prefill")
        flight.prefill = self.router.prefill_for([h.routing_load() for h in prefills])
        if flight.prefill is None:
            raise StageError("no prefill process is alive")
        prefill = prefills[flight.prefill]
        self._sent(prefill, seq.seq_id, len(seq.prompt_ids), now)
        if self.mode == "pd":
            task = PrefillTask(seq.seq_id, seq.prompt_ids, [], seq.sampling, seq.seed, images=flight.images,
                               image_sizes=seq.image_sizes, item_keys=seq.mm_keys)
        else:
            refs = [flight.refs[i] for i in range(len(flight.items))]  # the items in prompt order
            task = PrefillTask(seq.seq_id, seq.prompt_ids, refs, seq.sampling, seq.seed, image_sizes=seq.image_sizes)
            flight.refs.clear()  # the task owns the embeddings now: prefill frees them, even on failure
        prefill.send(task)

    def _tokens(self, produced: list[tuple[Sequence, int]], now: float, events: list[TokenEvent]) -> None:
        """Tokens from the stages through the one token path: the same append_step decode ran
        on its own sequences (so a stop token or max_tokens ends the request here on the token
        it ended there), then the output processor (text, stop strings, the output)."""
        for kept in append_step(produced):
            seq = kept.seq
            event, finished = self.output_processor.process(seq.seq_id, 0, kept.token, now, kept.finish_reason)
            if event is not None:
                events.append(event)
            if finished:  # one sample per request: it ends here
                self._release(self.flights.pop(seq.seq_id))  # a stop string ends it here, not in decode

    def _check_stages(self, events: list[TokenEvent]) -> None:
        """Find dead stages. An encoder's work moves to the other encoders; requests on a dead
        prefill or decode instance fail; the engine serves on while every kind of stage has a
        live instance."""
        for stage in self.stages.values():
            if stage.dead or stage.process.is_alive():
                continue
            stage.dead = True
            kind, index = stage.kind, stage.index
            self._stop_mappers_of(stage)
            died = f"stage {stage.name} died (exit code {stage.process.exitcode}" + (
                f": {stage.crash})" if stage.crash is not None else ")")
            if self.broken is None and not any(not h.dead and h.process.is_alive() for h in self.of_kind(kind)):
                self.broken = f"{died} and no {kind} process is left"
            if kind == "encode":
                stage.load = 0
                self.estimator.forget(stage.name)
                self.busy_board.set(index, stage.device, False)  # it published busy, perhaps
            for flight in list(self.flights.values()):
                if self.broken:
                    self._fail(flight, self.broken, events)
                elif kind == "encode":
                    lost = [p for p, (encoder, _) in flight.parts.items() if encoder == index]
                    for p in lost:
                        del flight.parts[p]
                    if lost:
                        self._dispatch_encode(flight)  # the lost images go to a live encoder
                elif (kind == "prefill" and flight.prefill == index) or (kind == "decode" and flight.decode == index):
                    if kind == "decode":
                        self._done(stage, flight.seq.seq_id)
                        flight.decode = None  # nothing to abort there
                    self._fail(flight, died, events)
            if self.image_bytes is not None:  # after the flights failed: it will answer for none of theirs
                self.image_bytes.reader_gone(stage.name)

    def _stop_mappers_of(self, owner: StageHandle) -> None:
        """On a GPU, stages that map a dead stage's weights lose them with it (CUDA IPC memory
        is its exporter's): they are stopped, and handled as dead by the same pass. On the CPU
        the shared file outlives its creator: they serve on."""
        if owner.device == "cpu":
            return
        for name, source in self.weight_sources.items():
            mapper = self.stages[name]
            if source == owner.name and mapper.process.is_alive():
                log.warning("stopping %s: it mapped the weights of %s, which died", name, owner.name)
                mapper.crash = f"it mapped the weights of {owner.name}, which died"
                mapper.process.kill()
                mapper.process.join(5.0)

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop every stage process and remove the arena files: none is left behind. Returns
        within about timeout_s + 10 s whatever state the stages are in (dead, stuck in a step, or
        blocked sending to us: we read on while they exit)."""
        stop_stages([h for h in self.stages.values() if h.moved_to is None],  # a process once, under its last role
                    self._read, timeout_s, readers_first=getattr(self, "multi_host", False))
        for arena in self.arenas:  # a killed stage could not remove its CPU arena file
            unlink(arena)
        if getattr(self, "image_bytes", None) is not None:
            self.image_bytes.close()
        if getattr(self, "busy_board", None) is not None:
            self.busy_board.close()
        if self.stage_group is not None:
            self.stage_group.close()

    def __enter__(self) -> EPDEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ tokenize, graph capture (RPC verbs)

    def tokenize(self, prompt: str, num_images: int = 0, raw_prompt: bool = False,
                 image_sizes: list[tuple[int, int]] | None = None) -> tuple[str, list[int]]:
        """(text after the chat template, token ids) as add_request builds them for this prompt."""
        return self.input_processor.tokenize(prompt, num_images, raw_prompt, image_sizes)

    def capture_start(self) -> dict:
        raise RequestError(self._capture_in_stages())

    def capture_stop(self) -> dict:
        raise RequestError(self._capture_in_stages())

    def capture_wait(self, timeout_s: float | None = None) -> dict:
        raise RequestError(self._capture_in_stages())

    def _capture_in_stages(self) -> str:
        return (f"in {self.mode} mode the decode stages capture their graphs at start (see status: "
                "stages.decodeN); capture control is for the aggregated engine")
