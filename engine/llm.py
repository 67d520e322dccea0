"""Offline API: `LLM(model_dir).generate(requests, sampling)` and the streaming `LLM.stream`."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from engine.aggregated import AggregatedEngine
from engine.config import EngineConfig, ModelConfig
from engine.input_processor import InputProcessor
from engine.output_processor import OutputProcessor
from engine.request import Request, RequestOutput, Sequence, Status, TokenEvent, append_step
from engine.runner import build_runner
from engine.sampling import RequestError, SamplingParams

log = logging.getLogger(__name__)


class LLM:
    """Loads a checkpoint and serves batches of requests in this process.

    `LLM(model_dir, **settings)`: the settings are EngineConfig's fields (engine/config.py:
    backend, dtype, device, max_model_len, block_size, kv_cache_tokens, max_num_seqs,
    max_num_batched_tokens, max_images_per_batch, gpu_memory_utilization, cuda_graphs,
    background_capture, multi_step, seed, progress, torch_threads, mm_cache, mm_pixel_cache_mb); or
    pass an EngineConfig.
    """

    def __init__(self, model: str | Path | EngineConfig, **settings: Any) -> None:
        config = EngineConfig.of(model, **settings)
        self.model_dir = Path(config.model)
        self.cfg = ModelConfig.from_dir(self.model_dir)
        self.config = config = config.for_model(self.cfg)
        self.device, self.dtype = torch.device(config.device), config.torch_dtype
        self.max_model_len = config.max_model_len
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.runner = build_runner(config, self.cfg)
        if config.cuda_graphs and self.runner.backend == "cuda":
            self.runner.capture_graphs(background=config.background_capture)
        self.input_processor = InputProcessor(config, self.cfg, self.runner.num_kv_blocks, self.runner.num_mm_blocks)
        self.tokenizer = self.input_processor.tokenizer
        self.output_processor = OutputProcessor(self.tokenizer)
        self.engine = AggregatedEngine(self.runner, config, on_phase=self.output_processor.stamp)
        self.image_processor = self.input_processor.image_processor
        if self.image_processor and self.runner.backend == "cuda":  # the GPU path's start-up (nvjpeg's warm-up)
            self.input_processor.stage_processor()
        # images are decoded and preprocessed here, off the engine thread; a request waits in
        # _preprocessing (its clock running) until its pixels are ready, then joins the engine
        self._image_pool = (ThreadPoolExecutor(config.image_workers, thread_name_prefix="images")
                            if self.image_processor else None)
        self._preprocessing: dict[int, tuple[Sequence, Future]] = {}
        self.max_num_seqs, self.multi_step = config.max_num_seqs, config.multi_step
        log.info("%s", self.summary())

    def describe(self) -> dict:
        """What was chosen at start-up: model, backend, device, dtype, arenas, limits, graphs."""
        from engine.loader import checkpoint_files

        runner = self.runner
        files = checkpoint_files(self.model_dir)
        graphs = runner.decode_graphs
        captured = sorted(graphs.graphs) if graphs else []
        capturing = runner.backend == "cuda" and graphs is not None and graphs.capture_state == "running"
        pending = sorted(graphs.pending) if capturing else []
        vision = runner.vision_graphs
        return {
            "model": str(self.model_dir),
            "architecture": self.cfg.architecture,
            "backend": runner.backend,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "weights": {"files": [f.name for f in files], "bytes": sum(f.stat().st_size for f in files)},
            "kv_cache": {"blocks": runner.num_kv_blocks, "block_size": runner.block_size,
                         "tokens": runner.num_kv_blocks * runner.block_size,
                         "bytes": runner.num_kv_blocks * runner.kv_block_bytes},
            "mm_blocks": runner.num_mm_blocks,
            "mm_bytes": runner.mm_arena.numel() * runner.mm_arena.element_size(),
            "mm_cache": self.config.mm_cache,
            "max_model_len": self.max_model_len,
            "max_num_seqs": self.max_num_seqs,
            "multi_step": self.multi_step,
            "decode_graphs": {"captured": captured, "pending": pending,
                              "capture_s": sum(seconds for _, seconds, _ in graphs.capture_log) if graphs else 0.0},
            "vision_graphs": sorted(vision.graphs) if vision else [],
        }

    def summary(self) -> str:
        """describe() as one readable line (logged at INFO when the LLM is ready)."""
        d = self.describe()
        kv, w, g = d["kv_cache"], d["weights"], d["decode_graphs"]
        if g["captured"] or g["pending"]:
            graphs = f"decode graphs for batch {g['captured']} captured in {g['capture_s']:.2f} s"
            graphs += f", {g['pending']} capturing in the background" if g["pending"] else ""
        else:
            graphs = "decode eager (no CUDA graphs)"
        files = ", ".join(w["files"][:3]) + (f" +{len(w['files']) - 3} more" if len(w["files"]) > 3 else "")
        return (f"LLM ready: {d['model']} ({d['architecture']}); backend {d['backend']} on {d['device']}, "
                f"{d['dtype']}; weights from {files} ({_size(w['bytes'])}); KV cache {kv['blocks']} blocks x "
                f"{kv['block_size']} = {kv['tokens']} tokens ({_size(kv['bytes'])}); MM arena {d['mm_blocks']} "
                f"blocks ({_size(d['mm_bytes'])}, image cache {'on' if d['mm_cache'] else 'off'}); "
                f"max_num_seqs {d['max_num_seqs']}, multi_step {d['multi_step']}, context {d['max_model_len']}; "
                f"{graphs}")

    # ------------------------------------------------------------------ requests

    def make_sequence(self, request: Request | str, sampling: SamplingParams | None = None) -> Sequence:
        """Validate, preprocess and tokenize one request (errors name the field and the limit)."""
        return self.input_processor.make_sequence(request, sampling)[0]

    # ------------------------------------------------------------------ serving loop

    def add_request(self, request: Request | str, sampling: SamplingParams | None = None,
                    arrival: float | None = None) -> Sequence:
        """Validate and queue one request; its events carry index = the returned seq_id. Its
        images are only header-checked here; the image workers decode and preprocess them while
        the engine runs (its TTFT counts from `arrival`, default now). Data that is corrupt past
        the header fails the request later, as an event with `error` set."""
        arrival = time.perf_counter() if arrival is None else arrival  # its checks and hashing count
        seq, images = self.input_processor.make_sequence(request, sampling, preprocess=False)
        self.output_processor.add(seq.seq_id, seq.prompt_ids, seq.sampling, arrival)
        if images:
            self._preprocessing[seq.seq_id] = (seq, self._image_job(seq, images))
        else:
            self.engine.add(seq)
        return seq

    def step(self, timeout_s: float = 0.05) -> list[TokenEvent]:
        """One engine step: a TokenEvent per token produced (index = the request's seq_id,
        sample = which of its n samples); a request's output comes on the last token of its
        last sample to finish. Requests whose images are ready join the engine first; with
        nothing else to do, it waits up to timeout_s for the first of them."""
        events = self._take_preprocessed(timeout_s)
        produced = self.engine.step() if self.engine.has_work() else []
        now = time.perf_counter()
        for kept in append_step(produced):  # multi-step decode can run past a stop: dropped there
            seq = kept.seq
            event, finished = self.output_processor.process(seq.seq_id, seq.sample_index, kept.token, now,
                                                            kept.finish_reason, kept.logprob)
            # a stop token or max_tokens (the engine's), or a stop string (the frontend's): the
            # sample is done; the request's output comes with its last sample
            if (kept.finish_reason or finished) and seq.status is not Status.FINISHED:
                self.engine.finish(seq)
            if event is not None:
                events.append(event)
        return events

    def _take_preprocessed(self, timeout_s: float) -> list[TokenEvent]:
        """Requests whose image jobs are done: into the engine, or failed (an error event)."""
        if not self._preprocessing:
            return []
        if not self.engine.has_work():
            wait([job for _, job in self._preprocessing.values()], timeout=timeout_s, return_when=FIRST_COMPLETED)
        failed = []
        for seq_id, (seq, job) in list(self._preprocessing.items()):
            if not job.done():
                continue
            del self._preprocessing[seq_id]
            try:
                self._take_pixels(seq, job.result())
            except Exception as e:  # a bad image fails its request only
                self.output_processor.remove(seq_id)
                seq.status = Status.FINISHED
                failed.append(TokenEvent(seq_id, -1, "", error=str(e) or type(e).__name__))
                continue
            self.engine.add(seq)
        return failed

    def _image_job(self, seq: Sequence, images: list) -> Future:
        """Decode and preprocess a sequence's images on the image workers: (pixels, start, end)."""
        return self._image_pool.submit(_timed, self.input_processor.preprocess, images, seq.image_sizes, seq.mm_keys)

    def _take_pixels(self, seq: Sequence, done: tuple) -> None:
        """An image job's result onto its sequence, and its time into the request's timeline."""
        seq.pixel_values, start, end = done
        if seq.pixel_values.is_cuda:  # made on an image worker's stream, read on the engine's
            seq.pixel_values.record_stream(torch.cuda.current_stream(seq.pixel_values.device))
        self.output_processor.stamp(seq.seq_id, "preprocess", start, end)

    def has_work(self) -> bool:
        return bool(self._preprocessing) or self.engine.has_work()

    def status(self) -> dict:
        engine = self.engine
        return {
            "mode": "aggregated",
            "running": len(engine.decode.running),
            "waiting_preprocess": len(self._preprocessing),
            "waiting_prefill": len(engine.prefill.waiting),
            "waiting_encode": len(engine.encode.waiting) if engine.encode else 0,
            "kv_blocks_free": engine.kv_blocks.num_free,
            "kv_blocks_total": self.runner.num_kv_blocks,
            "decode_graphs_captured": sorted(self.runner.decode_graphs.graphs) if self.runner.decode_graphs else [],
            "preemptions": engine.num_preemptions,
            "mm_cache": self.mm_cache_stats(),
        }

    def mm_cache_stats(self) -> dict:
        """The image caches (engine/mm_cache.py): embeddings (hits, misses, evictions, blocks
        idle / in use / free) and pixels; {} for a model without a vision tower."""
        if self.engine.encode is None:
            return {}
        pixels = self.input_processor.pixel_cache
        return {**self.engine.encode.cache.stats(), **(pixels.stats() if pixels else {})}

    def abort(self, seq: Sequence) -> RequestOutput | None:
        """Drop a request (every one of its samples) wherever it is; its blocks return to the
        pools. Returns its output so far, finish_reason "abort" on each sample it cut short
        (samples not yet forked come back empty), or None if it had already finished."""
        root = seq.root
        pending = self._preprocessing.pop(root.seq_id, None)
        if pending is not None:
            pending[1].cancel()  # a job already running finishes; its pixels are dropped
        for s in root.samples or [root]:
            if s.status is not Status.FINISHED:
                self.engine.finish(s)
        return self.output_processor.abort(root.seq_id, time.perf_counter())

    def stream(
        self, requests: Iterable[Request | str] | Request | str, sampling: SamplingParams | None = None
    ) -> Iterator[TokenEvent]:
        """Yield a TokenEvent per generated token (index = position in `requests`, sample = which
        of its n samples), for all requests batched together.

        Every request is validated before any runs: one bad request raises RequestError and
        nothing is queued. A consumer that stops early aborts what is left (no output: nobody
        is listening any more); call `abort` on a request from `add_request` for its partial
        output with finish_reason "abort"."""
        if isinstance(requests, (Request, str)):
            reqs = [requests]
        elif isinstance(requests, Iterable):
            reqs = list(requests)
        else:
            raise RequestError(f"requests must be a Request, a prompt string or a list of them, "
                               f"got {type(requests).__name__}")
        arrival = time.perf_counter()
        made = [self.input_processor.make_sequence(r, sampling, preprocess=False) for r in reqs]
        # every request's images decoded (in parallel) before any is queued: a bad one raises here
        jobs = [self._image_job(seq, images) if images else None for seq, images in made]
        try:
            timed = [job.result() if job else None for job in jobs]
        finally:
            for job in jobs:
                if job:
                    job.cancel()
        seqs = [seq for seq, _ in made]
        position = {s.seq_id: i for i, s in enumerate(seqs)}
        for seq, done in zip(seqs, timed):
            self.output_processor.add(seq.seq_id, seq.prompt_ids, seq.sampling, arrival)
            if done is not None:
                self._take_pixels(seq, done)
            self.engine.add(seq)
        idle_steps = 0
        try:
            while any(s.status is not Status.FINISHED for seq in seqs for s in seq.samples or [seq]):
                events = self.step()
                idle_steps = 0 if events else idle_steps + 1
                if idle_steps > 3:
                    raise RuntimeError("engine made no progress (arena too small for the waiting requests)")
                for ev in events:
                    yield replace(ev, index=position[ev.index])
        finally:
            for s in seqs:  # a consumer that stops early must not leak blocks
                self.abort(s)

    def generate(
        self, requests: Iterable[Request | str] | Request | str, sampling: SamplingParams | None = None
    ) -> list[RequestOutput]:
        """Run all requests to completion; outputs in request order."""
        single = isinstance(requests, (Request, str))
        outputs: dict[int, RequestOutput] = {}
        for ev in self.stream(requests, sampling):
            if ev.output is not None:
                outputs[ev.index] = ev.output
        result = [outputs[i] for i in range(len(outputs))]
        return result[:1] if single else result

    # ------------------------------------------------------------------ tokenize, graph capture (RPC verbs)

    def tokenize(self, prompt: str, num_images: int = 0, raw_prompt: bool = False,
                 image_sizes: list[tuple[int, int]] | None = None) -> tuple[str, list[int]]:
        """(text after the chat template, token ids) as generate builds them for this prompt."""
        return self.input_processor.tokenize(prompt, num_images, raw_prompt, image_sizes)

    def capture_start(self) -> dict:
        """Start capturing the decode buckets not captured yet, in the background (serving
        goes on); a no-op if every bucket is captured or a capture runs."""
        graphs = self._capturable_graphs()
        started = bool(graphs.pending) and graphs.capture_state != "running"
        if started:
            graphs.capture_all(background=True)
        return {"started": started, **self.capture_status()}

    def capture_stop(self) -> dict:
        """Ask the background capture to stop after the bucket in progress."""
        self._capturable_graphs().stop_capture()
        return self.capture_status()

    def capture_wait(self, timeout_s: float | None = None) -> dict:
        """Wait up to timeout_s for a background capture to end (every bucket captured,
        stopped or failed); returns the capture status either way."""
        self._capturable_graphs().join_capture(timeout_s)
        return self.capture_status()

    def capture_status(self) -> dict:
        """Decode buckets captured and pending, and the capture state (running, stopped, failed,
        idle; "unavailable" where graphs cannot be captured)."""
        graphs = self.runner.decode_graphs
        if graphs is None or self.runner.backend != "cuda" or self.device.type != "cuda":
            return {"captured": [], "pending": [], "state": "unavailable"}
        return {"captured": sorted(graphs.graphs.copy()), "pending": graphs.pending, "state": graphs.capture_state}

    def _capturable_graphs(self):
        graphs, backend = self.runner.decode_graphs, self.runner.backend
        if backend != "cuda" or self.device.type != "cuda":
            raise RequestError(f"CUDA graphs need the cuda backend on a GPU; this server runs the {backend} backend "
                               f"on {self.device.type}")
        if not self.runner.has_attention_kernel:
            raise RequestError(f"head_dim {self.cfg.text.head_dim} has no attention kernel: decode runs eagerly")
        return graphs


def _timed(fn, *args):
    """fn(*args) and the perf_counter times it started and ended (an image job)."""
    start = time.perf_counter()
    return fn(*args), start, time.perf_counter()


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"
