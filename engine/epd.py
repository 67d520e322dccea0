"""EPD orchestrator: encoders, prefill and decode in separate processes (ipc/stages.py).

Modes on the same code: "epd" (encoder processes, then prefill, then decode) and "pd" (prefill
encodes the images itself: the DistServe-style baseline). A placement such as
"E:0,1 P:2 D:3" says how many instances of each stage run and on which GPU ("cpu" for the CPU);
stages may share a device.

The orchestrator validates and tokenizes (engine/frontend.py), splits each request's images
across the least-loaded encoders, reassembles the embeddings' block references in prompt
order for prefill, hands prefilled KV blocks to decode, and streams tokens back with the
per-request timestamps. A stage process that dies is detected: an encoder's work moves to
another encoder; if prefill or decode dies, the requests in flight fail with an error and the
engine refuses new work.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import torch

from engine.config import ModelConfig
from engine.frontend import Capacity, Frontend
from engine.request import Request, RequestOutput, Sequence, TokenEvent
from engine.sampling import RequestError, SamplingParams
from ipc.stages import (
    Abort,
    DecodeTask,
    Encoded,
    EncodeTask,
    Failed,
    FreeKV,
    FreeMM,
    Migrated,
    Prefilled,
    PrefillTask,
    Ready,
    Shutdown,
    StageConfig,
    StageStatus,
    Token,
    decode_main,
    encoder_main,
    prefill_main,
    run_stage,
)

_OUTBOX = object()  # placeholder in a stage's arguments for the outbox made at its start


class StageError(RuntimeError):
    """A request failed inside a stage (the message names the stage)."""


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
        default = f"E:{home},{home} P:{home} D:{home}" if mode == "epd" else f"P:{home} D:{home}"
        devices = parse_placement(placement or default, mode)
        self.mode = mode
        cfg = replace(cfg, kv_cache_tokens=cfg.kv_cache_tokens or 4 * self.cfg.text.max_position_embeddings)
        ctx = mp.get_context("spawn")
        self.outboxes: dict[str, object] = {}  # stage name -> its own outbox (one writer each)
        self.encoder_inboxes = [ctx.Queue() for _ in devices.get("E", [])]
        self.prefill_inboxes = [ctx.Queue() for _ in devices["P"]]
        self.decode_inboxes = [ctx.Queue() for _ in devices["D"]]
        self.procs: dict[str, object] = {}
        self.handles: list = []
        self.stage_stats: dict[str, dict] = {}
        deadline = time.monotonic() + start_timeout_s

        def start(name: str, target, *args) -> object:
            outbox = ctx.Queue()
            args = [outbox if a is _OUTBOX else a for a in args]
            proc = ctx.Process(target=run_stage, args=(target, *args), name=name, daemon=True)
            proc.start()
            # Only the stage writes to its outbox: closing our write end makes its death an EOF
            # for the reader, even in the middle of a message.
            outbox._writer.close()
            self.procs[name], self.outboxes[name] = proc, outbox

        on = lambda device: replace(cfg, device=device)  # noqa: E731
        for i, inbox in enumerate(self.encoder_inboxes):
            start(f"encode{i}", encoder_main, on(devices["E"][i]), i, inbox, _OUTBOX)
        ready = self._await_ready(len(self.encoder_inboxes), deadline)
        mm_handles = [r.handle for r in sorted(ready, key=lambda r: r.index)]
        self.handles = list(mm_handles)  # every arena, so shutdown can clean up after killed stages
        block_size = 16  # the stages' LLM default
        # One prefill and one decode on one device share prefill's arena, extended by decode's
        # blocks (decode reads the prompt's KV in place); otherwise decode pulls copies.
        shared = cfg.share_kv_arena and len(devices["P"]) == len(devices["D"]) == 1 and devices["P"] == devices["D"]
        decode_blocks = -(-cfg.kv_cache_tokens // block_size) if shared else 0
        for i, inbox in enumerate(self.prefill_inboxes):
            start(f"prefill{i}", prefill_main, on(devices["P"][i]), i, mm_handles, inbox, _OUTBOX, decode_blocks)
        ready = self._await_ready(len(self.prefill_inboxes), deadline)
        kv_handles = [r.handle for r in sorted(ready, key=lambda r: r.index)]
        self.handles += kv_handles
        for j, inbox in enumerate(self.decode_inboxes):
            start(f"decode{j}", decode_main, on(devices["D"][j]), j, kv_handles, inbox, _OUTBOX, shared)
        self._await_ready(len(self.decode_inboxes), deadline)
        self.frontend = Frontend(model, self.cfg, Capacity(self.cfg.text.max_position_embeddings,
                                                           -(-cfg.kv_cache_tokens // block_size), block_size,
                                                           2 * cfg.max_images_per_batch), seed)
        self.encoder_load = [0] * len(self.encoder_inboxes)  # images in flight per encoder
        self.prefill_load = [0] * len(self.prefill_inboxes)  # requests in flight per instance
        self.decode_load = [0] * len(self.decode_inboxes)
        self.broken: str | None = None
        self.dead: set[str] = set()
        self.flights: dict[int, _Flight] = {}  # requests in the stages, by seq_id
        self.late_events: list[TokenEvent] = []  # failures found outside step(), returned by the next

    def _await_ready(self, n: int, deadline: float) -> list[Ready]:
        ready = []
        while len(ready) < n:
            msgs = self._receive(1.0)
            if not msgs:
                dead = [name for name, p in self.procs.items() if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    self.shutdown()
                    raise RuntimeError(f"stage(s) {dead or 'all'} failed to start") from None
            for msg in msgs:
                if isinstance(msg, Ready):
                    ready.append(msg)
                elif isinstance(msg, StageStatus):
                    self.stage_stats[msg.stage] = msg.stats
        return ready

    # ------------------------------------------------------------------ requests

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
        return bool(self.flights)

    def abort(self, seq: Sequence) -> None:
        flight = self.flights.pop(seq.seq_id, None)
        if flight is not None:
            self._release(flight)

    def step(self, timeout_s: float = 0.05) -> list[TokenEvent]:
        """Handle the stage messages that arrive within timeout_s (at least one if any comes):
        a TokenEvent per token, with the output when a request ends, or with `error` when a
        stage failed it."""
        events, self.late_events = self.late_events, []
        msgs = self._receive(timeout_s)
        if not msgs:
            self._check_stages(events)
        for msg in msgs:
            self._handle(msg, events)
        return events

    def _receive(self, timeout_s: float) -> list:
        """Every message queued in the stages' outboxes, waiting up to timeout_s for the first.
        An outbox whose stage is gone (EOF, or a message cut short by its death) is dropped."""
        from multiprocess.connection import wait

        readers = {q._reader: name for name, q in self.outboxes.items()}
        msgs = []
        for reader in wait(list(readers), timeout_s):
            try:
                while reader.poll():
                    msgs.append(reader.recv())
            except (EOFError, OSError):
                del self.outboxes[readers[reader]]
        return msgs

    def _handle(self, msg: object, events: list[TokenEvent]) -> None:
        if isinstance(msg, StageStatus):
            self.stage_stats[msg.stage] = msg.stats
            return
        if isinstance(msg, FreeMM):  # prefill consumed embeddings: to the encoder that holds them
            self.encoder_inboxes[msg.encoder].put(msg)
            return
        if isinstance(msg, FreeKV):  # decode pulled or finished reading KV: to its prefill
            self.prefill_inboxes[msg.prefill].put(msg)
            return
        flight = self.flights.get(getattr(msg, "req_id", None))
        if flight is None:
            if isinstance(msg, Encoded):  # images of a request that ended: give the blocks back
                self.encoder_load[msg.encoder] -= len(msg.blocks)
                self.encoder_inboxes[msg.encoder].put(FreeMM(msg.blocks, msg.encoder))
            elif isinstance(msg, Prefilled):  # KV of a request that ended meanwhile
                self.prefill_load[msg.prefill] -= 1
                self.prefill_inboxes[msg.prefill].put(FreeKV(msg.kv_blocks, msg.prefill))
            elif isinstance(msg, Failed) and msg.stage.startswith("prefill"):
                self.prefill_load[int(msg.stage[len("prefill"):])] -= 1
            return  # a late message for a finished or failed request
        now = time.perf_counter()
        if isinstance(msg, Encoded):
            self.encoder_load[msg.encoder] -= len(msg.blocks)
            for image, block in zip(flight.parts.pop(msg.part), msg.blocks):
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
            flight.refs.clear()  # prefill consumed (and freed) the embeddings
            self.prefill_load[msg.prefill] -= 1
            try:
                flight.decode = self._least_loaded("decode", self.decode_load)
            except StageError as e:  # no decode instance left: give the KV back, fail the request
                self.prefill_inboxes[msg.prefill].put(FreeKV(msg.kv_blocks, msg.prefill))
                self._fail(flight, str(e), events)
                return
            self.decode_load[flight.decode] += 1
            self.decode_inboxes[flight.decode].put(DecodeTask(
                seq.seq_id, seq.prompt_ids, msg.first_token, msg.prefill, msg.kv_blocks, seq.sampling, seq.seed,
                seq.stop_token_ids))
            self._token(flight, msg.first_token, now, events)
        elif isinstance(msg, Token):
            self._token(flight, msg.token_id, now, events)
        elif isinstance(msg, Failed):
            if msg.stage.startswith("prefill"):
                self.prefill_load[flight.prefill] -= 1
            self._fail(flight, f"{msg.stage}: {msg.error}", events)

    def _fail(self, flight: _Flight, error: str, events: list[TokenEvent]) -> None:
        del self.flights[flight.seq.seq_id]
        self._release(flight)
        events.append(TokenEvent(flight.seq.seq_id, -1, "", error=error))

    def _release(self, flight: _Flight) -> None:
        """Free what a request still holds in the stages: unread embeddings, its decode slot
        (KV still in prefill is freed when its late Prefilled arrives)."""
        for encoder, block in flight.refs.values():
            self.encoder_inboxes[encoder].put(FreeMM([block], encoder))
        if flight.decode is not None:
            self.decode_load[flight.decode] -= 1
            self.decode_inboxes[flight.decode].put(Abort(flight.seq.seq_id))

    def _least_loaded(self, kind: str, load: list[int]) -> int:
        live = [i for i in range(len(load)) if self.procs[f"{kind}{i}"].is_alive()]
        if not live:
            raise StageError(f"no {kind} process is alive")
        return min(live, key=lambda i: load[i])

    def generate(self, requests: Iterable[Request | str], sampling: SamplingParams | None = None
                 ) -> list[RequestOutput]:
        """Run all requests through the stages; outputs in request order. A request that fails
        in a stage raises StageError after the others have finished."""
        seqs = [self.add_request(r, sampling) for r in requests]
        outputs: dict[int, RequestOutput] = {}
        errors: dict[int, str] = {}
        while any(s.seq_id in self.flights for s in seqs):
            for ev in self.step():
                if ev.error is not None:
                    errors[ev.index] = ev.error
                elif ev.output is not None:
                    outputs[ev.index] = ev.output
        if errors:
            raise StageError("; ".join(f"request {i}: {e}" for i, e in sorted(errors.items())))
        return [outputs[s.seq_id] for s in seqs]

    def status(self) -> dict:
        return {
            "mode": self.mode,
            "stages_alive": {name: p.is_alive() for name, p in self.procs.items()},
            "requests_in_flight": len(self.flights),
            "encoder_images_in_flight": list(self.encoder_load),
            "broken": self.broken,
            "stages": dict(self.stage_stats),  # each stage's latest report: queues, blocks, graphs
        }

    def _dispatch_encode(self, flight: _Flight) -> None:
        """Split the request's images over the least-loaded live encoders (one part each); in pd
        mode (or without images) go straight to prefill."""
        if not flight.images or self.mode == "pd":
            self._dispatch_prefill(flight, time.perf_counter())
            return
        live = [i for i in range(len(self.encoder_inboxes)) if self.procs[f"encode{i}"].is_alive()]
        if not live:
            raise StageError("no encoder process is alive")
        flight.seq.metrics.encode_start = flight.seq.metrics.encode_start or time.perf_counter()
        assignment: dict[int, list[int]] = {}
        in_flight = {i for images in flight.parts.values() for i in images}
        for image in range(len(flight.images)):
            if image in flight.refs or image in in_flight:
                continue
            encoder = min(live, key=lambda e: self.encoder_load[e])
            self.encoder_load[encoder] += 1
            assignment.setdefault(encoder, []).append(image)
        for encoder, images in assignment.items():
            flight.parts[encoder] = images
            self.encoder_inboxes[encoder].put(
                EncodeTask(flight.seq.seq_id, encoder, [flight.images[i] for i in images]))

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
        self.prefill_inboxes[flight.prefill].put(task)

    def _token(self, flight: _Flight, token: int, now: float, events: list[TokenEvent]) -> None:
        seq = flight.seq
        delta, output = seq.append_token(token, now)
        events.append(TokenEvent(seq.seq_id, token, delta, output))
        if output is not None:
            del self.flights[seq.seq_id]
            self._release(flight)  # a stop string ends it here, not in decode

    def _check_stages(self, events: list[TokenEvent]) -> None:
        """On a quiet queue: find dead stages. An encoder's work moves to the other encoders;
        requests on a dead prefill or decode instance fail; the engine serves on while every
        kind of stage has a live instance."""
        for name, proc in self.procs.items():
            if proc.is_alive() or name in self.dead:
                continue
            self.dead.add(name)
            kind = name.rstrip("0123456789")
            index = int(name[len(kind):])
            if not any(p.is_alive() for n, p in self.procs.items() if n.rstrip("0123456789") == kind):
                self.broken = f"stage {name} died (exit code {proc.exitcode}) and no {kind} process is left"
            for flight in list(self.flights.values()):
                if self.broken:
                    self._fail(flight, self.broken, events)
                elif kind == "encode" and index in flight.parts:
                    del flight.parts[index]
                    self._dispatch_encode(flight)  # the lost images go to a live encoder
                elif (kind == "prefill" and flight.prefill == index and flight.decode is None) or (
                        kind == "decode" and flight.decode == index):
                    flight.decode = None if kind == "decode" else flight.decode  # nothing to abort there
                    self._fail(flight, f"stage {name} died (exit code {proc.exitcode})", events)

    def shutdown(self) -> None:
        """Stop every stage process; none is left behind."""
        for inbox in [*self.encoder_inboxes, *self.prefill_inboxes, *self.decode_inboxes]:
            inbox.put(Shutdown())
        for proc in self.procs.values():
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=10)
        for handle in self.handles:  # a killed stage could not remove its CPU arena file
            if handle.path:
                Path(handle.path).unlink(missing_ok=True)

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
        self.parts: dict[int, list[int]] = {}  # encoder -> image indices still being encoded
        self.refs: dict[int, tuple[int, int]] = {}  # image index -> (encoder, MM block)
        self.prefill: int | None = None  # the instances it was routed to
        self.decode: int | None = None
