"""EPD orchestrator: encoders, prefill and decode in separate processes (ipc/stages.py).

Modes on the same code: "epd" (encoder processes, then prefill, then decode) and "pd" (prefill
encodes the images itself: the DistServe-style baseline). A placement such as
"E:0,1 P:2 D:3" says how many instances of each stage run and on which GPU ("cpu" for the CPU);
stages may share a device. Its GPUs are checked before anything starts.

The orchestrator validates and tokenizes (engine/frontend.py), splits each request's images
across the least-loaded encoders, reassembles the embeddings' block references in prompt
order for prefill, hands prefilled KV blocks to decode, and streams tokens back with the
per-request timestamps. A stage process that dies is detected: an encoder's work moves to
another encoder; if prefill or decode dies, the requests in flight fail with an error and,
once no instance of a kind is left, the engine refuses new work (status and shutdown still
answer at once).

Start-up: every stage process starts at once and loads its weights in parallel; the arenas'
handles then go to the stages that map them, and once every stage is ready the CPU arena files
are unlinked (the mappings stay valid), so none is left in /dev/shm however the processes end.
Stages die with this process (ipc/parent_watch.py): build the engine in a thread that lives as
long as it, such as the main thread.

`status()` reads what the stages sent since the last step without waiting (reports, and the
frees it forwards between stages), so it is fresh whether or not requests are in flight;
`has_work()` is true while such messages wait, so a serving loop that steps only while there is
work forwards them too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import torch

from engine.config import ModelConfig
from engine.frontend import Capacity, Frontend
from engine.request import Request, RequestOutput, Sequence, TokenEvent
from engine.sampling import RequestError, SamplingParams
from ipc.arena import unlink
from ipc.channel import Inbox
from ipc.messages import (
    Abort,
    Crashed,
    DecodeTask,
    Encoded,
    EncodeTask,
    Exported,
    Failed,
    FreeKV,
    FreeMM,
    Migrated,
    Peers,
    Prefilled,
    PrefillTask,
    Ready,
    Shutdown,
    StageStatus,
    Tokens,
)
from ipc.stages import StageConfig, decode_main, encoder_main, prefill_main, run_stage, stage_summary

log = logging.getLogger(__name__)
DRAIN_LIMIT = 512  # messages read from one stage per call: a busy stage cannot hold up step or status


class StageError(RuntimeError):
    """A request failed inside a stage, or a stage failed to start (the message names the stage)."""


def parse_placement(text: str, mode: str) -> dict[str, list[str]]:
    """ "E:0,1 P:2 D:3" -> {"E": ["cuda:0", "cuda:1"], "P": ["cuda:2"], "D": ["cuda:3"]}."""
    out: dict[str, list[str]] = {}
    for item in text.split():
        stage, _, devices = item.partition(":")
        if stage not in ("E", "P", "D") or not devices or stage in out:
            raise ValueError(f"placement {text!r}: expected items like E:0,1 P:2 D:3 (each stage once)")
        out[stage] = [d if d == "cpu" else f"cuda:{int(d)}" if d.isdigit() else _bad(text, d)
                      for d in devices.split(",")]
    need = ("E", "P", "D") if mode == "epd" else ("P", "D")
    if sorted(out) != sorted(need):
        raise ValueError(f"placement {text!r}: mode {mode!r} needs exactly the stages {'/'.join(need)}")
    return out


def _bad(text: str, device: str) -> str:
    raise ValueError(f"placement {text!r}: device {device!r} is neither a GPU index nor 'cpu'")


def check_placement_devices(text: str, devices: dict[str, list[str]], gpu_count: int) -> None:
    """Every GPU the placement names must exist here (checked before any stage is spawned)."""
    for device in (d for stage in devices.values() for d in stage if d.startswith("cuda:")):
        index = int(device.split(":")[1])
        if gpu_count == 0:
            raise ValueError(f"placement {text!r} names GPU {index}, but this machine has no CUDA device; "
                             "use 'cpu' (e.g. \"E:cpu,cpu P:cpu D:cpu\")")
        if index >= gpu_count:
            raise ValueError(f"placement {text!r} names GPU {index}, but this machine has {gpu_count} CUDA "
                             f"device{'s' if gpu_count > 1 else ''} (0-{gpu_count - 1})")


def stage_threads(num_stages: int) -> int:
    """torch CPU threads per stage process: the cores this process may use, shared out."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // num_stages)


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


class EPDEngine:
    def __init__(self, model: str | Path, placement: str | None = None, mode: str = "epd",
                 stage: StageConfig | None = None, seed: int = 0, start_timeout_s: float = 600.0) -> None:
        import multiprocess as mp

        if mode not in ("epd", "pd"):
            raise ValueError(f"mode {mode!r}: use 'epd' or 'pd' (or the in-process LLM for 'aggregated')")
        self.cfg = ModelConfig.from_dir(model)
        if not self.cfg.is_multimodal:
            raise ValueError(f"{self.cfg.architecture} has no vision tower: use the aggregated LLM")
        cfg = stage or StageConfig(model=str(model))
        home = "cpu" if cfg.device == "cpu" else str(torch.device(cfg.device).index or 0)
        text = placement or (f"E:{home},{home} P:{home} D:{home}" if mode == "epd" else f"P:{home} D:{home}")
        devices = parse_placement(text, mode)
        check_placement_devices(text, devices, torch.cuda.device_count())
        self.mode = mode
        num_stages = sum(len(d) for d in devices.values())
        cfg = replace(cfg, kv_cache_tokens=cfg.kv_cache_tokens or 4 * self.cfg.text.max_position_embeddings,
                      torch_threads=cfg.torch_threads or stage_threads(num_stages))
        block_size = 16  # the stages' LLM default
        self.frontend = Frontend(model, self.cfg, Capacity(self.cfg.text.max_position_embeddings,
                                                           -(-cfg.kv_cache_tokens // block_size), block_size,
                                                           2 * cfg.max_images_per_batch), seed)
        self.procs: dict[str, object] = {}  # stage name -> its process
        self.inboxes: dict[str, Inbox] = {}  # stage name -> its inbox (we write)
        self.outboxes: dict[str, object] = {}  # stage name -> its outbox's read end (one writer each)
        self.handles: list = []  # every arena, so shutdown can clean up after killed stages
        self.ready_stats: dict[str, dict] = {}  # what each stage holds, from its Ready message
        self.stage_stats: dict[str, dict] = {}  # each stage's latest StageStatus report
        self.crashes: dict[str, str] = {}  # stage -> the error it reported before exiting
        self.encoder_load = [0] * len(devices.get("E", []))  # images in flight per encoder
        self.prefill_load = [0] * len(devices["P"])  # requests in flight per instance
        self.decode_load = [0] * len(devices["D"])
        self.broken: str | None = None
        self.dead: set[str] = set()
        self.flights: dict[int, _Flight] = {}  # requests in the stages, by seq_id
        self.late_events: list[TokenEvent] = []  # events found outside step(), returned by the next
        # One prefill and one decode on one device share prefill's arena, extended by decode's
        # blocks (decode reads the prompt's KV in place); otherwise decode pulls copies.
        shared = cfg.share_kv_arena and len(devices["P"]) == len(devices["D"]) == 1 and devices["P"] == devices["D"]
        decode_blocks = -(-cfg.kv_cache_tokens // block_size) if shared else 0
        ctx = mp.get_context("spawn")
        on = lambda device: replace(cfg, device=device)  # noqa: E731
        try:
            for i, device in enumerate(devices.get("E", [])):
                self._start(ctx, f"encode{i}", encoder_main, on(device), i)
            for i, device in enumerate(devices["P"]):
                self._start(ctx, f"prefill{i}", prefill_main, on(device), i, mode == "pd", decode_blocks)
            for j, device in enumerate(devices["D"]):
                self._start(ctx, f"decode{j}", decode_main, on(device), j, shared)
            self._await_ready(time.monotonic() + start_timeout_s)
        except BaseException:
            self.shutdown()
            raise

    def _start(self, ctx, name: str, target, cfg: StageConfig, index: int, *extra) -> None:
        inbox = Inbox(ctx, name)
        outbox, writer = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=run_stage, args=(target, name, os.getpid(), cfg, index, inbox.reader, writer, *extra),
                           name=name, daemon=True)
        with _sigint_ignored_by_children():
            proc.start()
        # Only the stage writes its outbox and reads its inbox: with our copies of those ends
        # closed, its death is an EOF for our reader and an EPIPE for our writer, even mid-message.
        writer.close()
        inbox.started()
        self.procs[name], self.inboxes[name], self.outboxes[name] = proc, inbox, outbox

    def _await_ready(self, deadline: float) -> None:
        """Collect the arenas' handles, send each stage the ones it maps, wait for every Ready;
        then unlink the CPU arena files (all mapped) and log one line per stage."""
        exporters = [n for n in self.procs if not n.startswith("decode")]
        exported: dict[str, object] = {}
        peers_sent = False
        while len(self.ready_stats) < len(self.procs):
            if not peers_sent and len(exported) == len(exporters):
                mm = [exported[f"encode{i}"] for i in range(len(self.encoder_load))]
                kv = [exported[f"prefill{i}"] for i in range(len(self.prefill_load))]
                for name, inbox in self.inboxes.items():
                    if not name.startswith("encode"):
                        inbox.put(Peers(kv if name.startswith("decode") else mm))
                peers_sent = True
            msgs = self._read(1.0)
            if not msgs:
                msgs = self._read(0.0)  # a stage that just died: what it sent first
                self._raise_if_not_starting(msgs, deadline)
            for _, msg in msgs:
                if isinstance(msg, Exported):
                    exported[msg.stage] = msg.handle
                    self.handles.append(msg.handle)
                elif isinstance(msg, Ready):
                    self.ready_stats[msg.stage] = msg.stats
                elif isinstance(msg, Crashed):
                    log.debug("stage %s failed to start:\n%s", msg.stage, msg.traceback)
                    raise StageError(f"stage {msg.stage} failed to start: {msg.error}")
                elif isinstance(msg, StageStatus):
                    self.stage_stats[msg.stage] = msg.stats
        for handle in self.handles:
            unlink(handle)
        for name in self.procs:
            log.info(stage_summary(name, self.ready_stats[name]))

    def _raise_if_not_starting(self, msgs: list, deadline: float) -> None:
        if any(isinstance(m, Crashed) for _, m in msgs):
            return  # the caller raises with its message
        for name, proc in self.procs.items():
            if name not in self.ready_stats and not proc.is_alive():
                raise StageError(f"stage {name} exited (exit code {proc.exitcode}) before it was ready")
        if time.monotonic() > deadline:
            waiting = [n for n in self.procs if n not in self.ready_stats]
            raise StageError(f"stage(s) {', '.join(waiting)} not ready within the start timeout")

    # ------------------------------------------------------------------ engine loop (as LLM's)

    def add_request(self, request: Request | str, sampling: SamplingParams | None = None) -> Sequence:
        """Validate and send one request into the stages; its events carry index = seq_id."""
        self._check_stages(self.late_events)  # never route to a stage that died since the last step
        if self.broken:
            raise StageError(f"engine is broken: {self.broken}")
        seq, images = self.frontend.make_sequence(request, sampling, preprocess=False)
        sp = seq.sampling
        unserved = [name for name, used in (("n", sp.n > 1), ("logprobs", sp.logprobs)) if used]
        if unserved:  # the stages run one sample per request and return no logprobs
            raise RequestError(f"sampling.{unserved[0]} = {getattr(sp, unserved[0])!r}: {self.mode} mode does not "
                               "serve it yet; the aggregated mode (LLM, serve.py --mode aggregated) does")
        flight = self.flights[seq.seq_id] = _Flight(seq, images)
        self._dispatch_encode(flight)
        return seq

    def has_work(self) -> bool:
        """Requests in flight, events to return, or stage messages waiting (frees to forward,
        reports): step() has something to do."""
        if self.flights or self.late_events:
            return True
        from multiprocess.connection import wait

        return bool(self.outboxes) and bool(wait(list(self.outboxes.values()), 0))

    def abort(self, seq: Sequence) -> None:
        flight = self.flights.pop(seq.seq_id, None)
        if flight is not None:
            self._release(flight)

    def step(self, timeout_s: float = 0.05) -> list[TokenEvent]:
        """Handle the stage messages that arrive within timeout_s (at least one if any comes):
        a TokenEvent per token, with the output when a request ends, or with `error` when a
        stage failed it."""
        events, self.late_events = self.late_events, []
        msgs = self._read(0.0 if events else timeout_s)
        if not msgs:
            self._check_stages(events)
        for name, msg in msgs:
            self._handle(name, msg, events)
        return events

    def _read(self, timeout_s: float) -> list[tuple[str, object]]:
        """(stage, message) for what the stages' outboxes hold, waiting up to timeout_s for the
        first; at most DRAIN_LIMIT per stage. An outbox whose stage is gone (EOF, or a message
        cut short by its death) is dropped."""
        from multiprocess.connection import wait

        readers = {conn: name for name, conn in self.outboxes.items()}
        if not readers:
            time.sleep(timeout_s)
            return []
        msgs = []
        for conn in wait(list(readers), timeout_s):
            name = readers[conn]
            try:
                for _ in range(DRAIN_LIMIT):
                    msgs.append((name, conn.recv()))
                    if not conn.poll():
                        break
            except (EOFError, OSError):
                conn.close()
                del self.outboxes[name]
        return msgs

    def _send(self, name: str, msg: object) -> None:
        """To a stage's inbox; nothing is written to a stage known to be dead (what it held
        died with it)."""
        if name not in self.dead:
            self.inboxes[name].put(msg)

    def _handle(self, name: str, msg: object, events: list[TokenEvent]) -> None:
        if isinstance(msg, StageStatus):
            self.stage_stats[msg.stage] = msg.stats
            return
        if isinstance(msg, Crashed):  # its death is handled when noticed (_check_stages)
            self.crashes[msg.stage] = msg.error
            log.error("stage %s crashed: %s\n%s", msg.stage, msg.error, msg.traceback)
            return
        if isinstance(msg, FreeMM):  # prefill consumed embeddings: to the encoder that holds them
            self._send(f"encode{msg.encoder}", msg)
            return
        if isinstance(msg, FreeKV):  # decode pulled or finished reading KV: to its prefill
            self._send(f"prefill{msg.prefill}", msg)
            return
        if isinstance(msg, Tokens):
            now = time.perf_counter()
            for req_id, token in zip(msg.req_ids, msg.token_ids):
                flight = self.flights.get(req_id)
                if flight is not None:  # else a late token of a finished or aborted request
                    self._token(flight, token, now, events)
            return
        if isinstance(msg, Encoded):
            self.encoder_load[msg.encoder] -= len(msg.blocks)
        elif isinstance(msg, Failed) and msg.stage.startswith("encode"):
            self.encoder_load[int(msg.stage[len("encode"):])] -= msg.images
        flight = self.flights.get(getattr(msg, "req_id", None))
        if flight is None:
            if isinstance(msg, Encoded):  # images of a request that ended: give the blocks back
                self._send(f"encode{msg.encoder}", FreeMM(msg.blocks, msg.encoder))
            elif isinstance(msg, Prefilled):  # KV of a request that ended meanwhile
                self.prefill_load[msg.prefill] -= 1
                self._send(f"prefill{msg.prefill}", FreeKV(msg.kv_blocks, msg.prefill))
            elif isinstance(msg, Failed) and msg.stage.startswith("prefill"):
                self.prefill_load[int(msg.stage[len("prefill"):])] -= 1
            return  # a late message for a finished or failed request
        now = time.perf_counter()
        if isinstance(msg, Encoded):
            part = flight.parts.pop(msg.part, None)
            if part is None:  # a part already moved to another encoder (this one was thought dead)
                self._send(f"encode{msg.encoder}", FreeMM(msg.blocks, msg.encoder))
                return
            for image, block in zip(part[1], msg.blocks):
                flight.refs[image] = (msg.encoder, block)
            if not flight.parts:
                flight.seq.metrics.encode_end = now
                try:
                    self._dispatch_prefill(flight, now)
                except StageError as e:  # no prefill instance left: this request fails, step goes on
                    self._fail(flight, str(e), events)
        elif isinstance(msg, Migrated):
            flight.seq.metrics.kv_bytes, flight.seq.metrics.kv_migrate_s = msg.kv_bytes, msg.seconds
        elif isinstance(msg, Prefilled):
            seq = flight.seq
            seq.metrics.mm_bytes, seq.metrics.mm_copy_s = msg.mm_bytes, msg.mm_copy_s
            self.prefill_load[msg.prefill] -= 1
            flight.prefill = None  # its KV is decode's (or back with prefill) from here on
            try:
                flight.decode = self._least_loaded("decode", self.decode_load)
            except StageError as e:  # no decode instance left: give the KV back, fail the request
                self._send(f"prefill{msg.prefill}", FreeKV(msg.kv_blocks, msg.prefill))
                self._fail(flight, str(e), events)
                return
            self.decode_load[flight.decode] += 1
            self._send(f"decode{flight.decode}", DecodeTask(
                seq.seq_id, seq.prompt_ids, msg.first_token, msg.prefill, msg.kv_blocks, seq.sampling, seq.seed,
                seq.stop_token_ids))
            self._token(flight, msg.first_token, now, events)
        elif isinstance(msg, Failed):
            if msg.stage.startswith("prefill") and flight.prefill is not None:
                self.prefill_load[flight.prefill] -= 1
                flight.prefill = None
            self._fail(flight, f"{msg.stage}: {msg.error}", events)

    def _fail(self, flight: _Flight, error: str, events: list[TokenEvent]) -> None:
        del self.flights[flight.seq.seq_id]
        self._release(flight)
        events.append(TokenEvent(flight.seq.seq_id, -1, "", error=error))

    def _release(self, flight: _Flight) -> None:
        """Free what a request still holds in the stages: embeddings not yet handed to prefill,
        its decode slot (KV still in prefill is freed when its late Prefilled arrives; embeddings
        handed to prefill are freed by prefill)."""
        for encoder, block in flight.refs.values():
            self._send(f"encode{encoder}", FreeMM([block], encoder))
        flight.refs.clear()
        if flight.decode is not None:
            self.decode_load[flight.decode] -= 1
            self._send(f"decode{flight.decode}", Abort(flight.seq.seq_id))
            flight.decode = None

    def _least_loaded(self, kind: str, load: list[int]) -> int:
        live = [i for i in range(len(load)) if f"{kind}{i}" not in self.dead and self.procs[f"{kind}{i}"].is_alive()]
        if not live:
            raise StageError(f"no {kind} process is alive")
        return min(live, key=lambda i: load[i])

    def generate(self, requests: Iterable[Request | str], sampling: SamplingParams | None = None
                 ) -> list[RequestOutput]:
        """Run all requests through the stages; outputs in request order. A request that fails
        in a stage raises StageError after the others have finished."""
        seqs: list[Sequence] = []
        try:
            for r in requests:
                seqs.append(self.add_request(r, sampling))
        except Exception:  # one bad request: none of the batch runs
            for seq in seqs:
                self.abort(seq)
            raise
        outputs: dict[int, RequestOutput] = {}
        errors: dict[int, str] = {}
        while any(s.seq_id in self.flights for s in seqs) or self.late_events:
            for ev in self.step():
                if ev.error is not None:
                    errors[ev.index] = ev.error
                elif ev.output is not None:
                    outputs[ev.index] = ev.output
        if errors:
            raise StageError("; ".join(f"request {i}: {e}" for i, e in sorted(errors.items())))
        return [outputs[s.seq_id] for s in seqs]

    def status(self) -> dict:
        """The engine and every stage now: reads (without waiting) what the stages sent since
        the last step and handles it; events found there are returned by the next step."""
        for name, msg in self._read(0.0):
            self._handle(name, msg, self.late_events)
        self._check_stages(self.late_events)
        return {
            "mode": self.mode,
            "stages_alive": {name: p.is_alive() for name, p in self.procs.items()},
            "requests_in_flight": len(self.flights),
            "encoder_images_in_flight": list(self.encoder_load),
            "broken": self.broken,
            # per stage: pid, device and what it holds (from its start), then its latest report
            # (queues, blocks used, graphs)
            "stages": {name: {**self.ready_stats.get(name, {}), **self.stage_stats.get(name, {})}
                       for name in self.procs},
        }

    def _dispatch_encode(self, flight: _Flight) -> None:
        """Split the request's images not yet encoded or being encoded over the least-loaded live
        encoders (one part each); in pd mode (or without images) go straight to prefill."""
        if not flight.images or self.mode == "pd":
            self._dispatch_prefill(flight, time.perf_counter())
            return
        live = [i for i in range(len(self.encoder_load)) if f"encode{i}" not in self.dead
                and self.procs[f"encode{i}"].is_alive()]
        if not live:
            raise StageError("no encoder process is alive")
        flight.seq.metrics.encode_start = flight.seq.metrics.encode_start or time.perf_counter()
        assignment: dict[int, list[int]] = {}
        in_flight = {i for _, images in flight.parts.values() for i in images}
        for image in range(len(flight.images)):
            if image in flight.refs or image in in_flight:
                continue
            encoder = min(live, key=lambda e: self.encoder_load[e])
            self.encoder_load[encoder] += 1
            assignment.setdefault(encoder, []).append(image)
        for encoder, images in assignment.items():
            part = flight.next_part
            flight.next_part += 1
            flight.parts[part] = (encoder, images)
            self._send(f"encode{encoder}", EncodeTask(flight.seq.seq_id, part, [flight.images[i] for i in images]))

    def _dispatch_prefill(self, flight: _Flight, now: float) -> None:
        seq = flight.seq
        seq.metrics.prefill_start = now
        flight.prefill = self._least_loaded("prefill", self.prefill_load)
        self.prefill_load[flight.prefill] += 1
        if self.mode == "pd":
            task = PrefillTask(seq.seq_id, seq.prompt_ids, [], seq.sampling, seq.seed, images=flight.images)
        else:
            refs = [flight.refs[i] for i in range(len(flight.images))]
            task = PrefillTask(seq.seq_id, seq.prompt_ids, refs, seq.sampling, seq.seed)
            flight.refs.clear()  # the task owns the embeddings now: prefill frees them, even on failure
        self._send(f"prefill{flight.prefill}", task)

    def _token(self, flight: _Flight, token: int, now: float, events: list[TokenEvent]) -> None:
        seq = flight.seq
        delta, output = seq.append_token(token, now)
        events.append(TokenEvent(seq.seq_id, token, delta, output))
        if output is not None:
            del self.flights[seq.seq_id]
            self._release(flight)  # a stop string ends it here, not in decode

    def _check_stages(self, events: list[TokenEvent]) -> None:
        """Find dead stages. An encoder's work moves to the other encoders; requests on a dead
        prefill or decode instance fail; the engine serves on while every kind of stage has a
        live instance."""
        for name, proc in self.procs.items():
            if proc.is_alive() or name in self.dead:
                continue
            self.dead.add(name)
            kind = name.rstrip("0123456789")
            index = int(name[len(kind):])
            died = f"stage {name} died (exit code {proc.exitcode}" + (
                f": {self.crashes[name]})" if name in self.crashes else ")")
            if self.broken is None and not any(p.is_alive() for n, p in self.procs.items()
                                               if n.rstrip("0123456789") == kind):
                self.broken = f"{died} and no {kind} process is left"
            if kind == "encode":
                self.encoder_load[index] = 0
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
                        self.decode_load[index] -= 1
                        flight.decode = None  # nothing to abort there
                    self._fail(flight, died, events)

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop every stage process and remove the arena files: none is left behind. Returns
        within about timeout_s + 10 s whatever state the stages are in (dead, stuck in a step, or
        blocked sending to us: we read on while they exit)."""
        procs = getattr(self, "procs", {})
        for name, proc in procs.items():
            if proc.is_alive():
                self.inboxes[name].put(Shutdown())
        deadline = time.monotonic() + timeout_s
        while any(p.is_alive() for p in procs.values()) and time.monotonic() < deadline:
            self._read(0.05)  # discarded: we are stopping
        for proc in procs.values():
            if proc.is_alive():
                proc.terminate()  # the stage's SIGTERM handler removes its files and exits
                proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=5)
        for inbox in getattr(self, "inboxes", {}).values():
            inbox.close()
        for conn in getattr(self, "outboxes", {}).values():
            conn.close()
        self.outboxes = {}
        for handle in getattr(self, "handles", []):  # a killed stage could not remove its CPU arena file
            unlink(handle)

    def __enter__(self) -> EPDEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ tokenize, graph capture (RPC verbs)

    def tokenize(self, prompt: str, num_images: int = 0, raw_prompt: bool = False) -> tuple[str, list[int]]:
        """(text after the chat template, token ids) as add_request builds them for this prompt."""
        return self.frontend.tokenize(prompt, num_images, raw_prompt)

    def capture_start(self) -> dict:
        raise RequestError(self._capture_in_stages())

    def capture_stop(self) -> dict:
        raise RequestError(self._capture_in_stages())

    def capture_wait(self, timeout_s: float | None = None) -> dict:
        raise RequestError(self._capture_in_stages())

    def _capture_in_stages(self) -> str:
        return (f"in {self.mode} mode the decode stages capture their graphs at start (see status: "
                "stages.decodeN); capture control is for the aggregated engine")


class _Flight:
    """A request in flight: its sequence, image sources, encoder parts and MM references."""

    def __init__(self, seq: Sequence, images: list) -> None:
        self.seq, self.images = seq, images
        self.parts: dict[int, tuple[int, list[int]]] = {}  # part id -> (encoder, image indices being encoded)
        self.next_part = 0
        self.refs: dict[int, tuple[int, int]] = {}  # image index -> (encoder, MM block), until prefill takes them
        self.prefill: int | None = None  # the instances it was routed to (prefill: until Prefilled)
        self.decode: int | None = None
