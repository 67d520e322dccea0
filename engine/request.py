"""A request as the user gives it, and the sequence state the engine keeps for it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.sampling import RequestError, SamplingParams, first_surrogate
from engine.tokenizer import IncrementalDetokenizer


@dataclass
class Request:
    """prompt: user text (`<image>` marks where each image goes); images: paths, bytes,
    PIL images or data URLs; raw_prompt: use the prompt as is, no chat template."""

    prompt: str
    images: list[Any] = field(default_factory=list)
    raw_prompt: bool = False
    sampling: SamplingParams | None = None

    def __post_init__(self) -> None:
        if self.images is None:
            self.images = []
        self.validate()

    def validate(self) -> None:
        """Check every field's type (servers build requests from JSON); errors name the field."""
        if not isinstance(self.prompt, str):
            raise RequestError(f"prompt must be a string, got {type(self.prompt).__name__}")
        pos = first_surrogate(self.prompt)
        if pos is not None:
            raise RequestError(f"prompt has a lone surrogate {self.prompt[pos]!r} at position {pos}; "
                               "it must be valid Unicode text")
        if not isinstance(self.images, (list, tuple)):
            raise RequestError(f"images must be a list (of paths, bytes, PIL images or data: URLs), "
                               f"got {type(self.images).__name__}")
        if not isinstance(self.raw_prompt, bool):
            raise RequestError(f"raw_prompt = {self.raw_prompt!r}; must be True or False")
        if self.sampling is not None and not isinstance(self.sampling, SamplingParams):
            raise RequestError(f"sampling must be a SamplingParams, got {type(self.sampling).__name__}")


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Metrics:
    """perf_counter timestamps of one request's life."""

    arrival: float = field(default_factory=time.perf_counter)
    encode_start: float | None = None  # first encode of its images (requests with images)
    encode_end: float | None = None
    prefill_start: float | None = None  # first prefill (TTFT = first_token - arrival)
    first_token: float | None = None
    token_times: list[float] = field(default_factory=list)  # one per output token
    finished: float | None = None
    # EPD hand-offs (seconds include the copy's sync): image embeddings into prefill, KV into decode
    mm_bytes: int = 0
    mm_copy_s: float = 0.0
    kv_bytes: int = 0  # 0 with a shared arena: decode reads the prompt's blocks in place
    kv_migrate_s: float = 0.0

    def breakdown(self) -> dict[str, float]:
        """Seconds in each phase up to the first token: queue, encode, wait, prefill."""
        enc0, enc1 = self.encode_start or self.arrival, self.encode_end or self.arrival
        pre = self.prefill_start or enc1
        end = self.first_token or pre
        return {"queue_s": enc0 - self.arrival, "encode_s": enc1 - enc0, "wait_s": pre - enc1, "prefill_s": end - pre}

    def ttft_s(self) -> float:
        return (self.first_token or self.arrival) - self.arrival

    def decode_tokens_per_s(self, num_tokens: int) -> float:
        """Tokens after the first over the time they took (the decode rate)."""
        if num_tokens < 2 or self.first_token is None or self.finished is None:
            return 0.0
        return (num_tokens - 1) / max(self.finished - self.first_token, 1e-9)


@dataclass
class TokenLogprob:
    """A sampled token's log-probability under the raw model logits (before penalties and
    temperature), and the top_logprobs most likely (token_id, logprob) pairs, ties to the lower id."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(eq=False)
class Sequence:
    seq_id: int
    prompt_ids: list[int]
    sampling: SamplingParams
    seed: int
    detok: IncrementalDetokenizer
    stop_token_ids: frozenset[int]
    pixel_values: torch.Tensor | None = None  # [num_images, 3, S, S]
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)  # KV blocks
    mm_blocks: list[int] = field(default_factory=list)  # MM-arena blocks, one per image, until prefill
    # EPD prefill: (encoder, block) per image, read in place in the encoders' arenas on this device
    mm_peer_blocks: list[tuple[int, int]] = field(default_factory=list)
    num_cached: int = 0  # tokens whose K/V are in the arena
    status: Status = Status.WAITING
    finish_reason: str | None = None
    text: str = ""  # output text so far, stop strings cut
    metrics: Metrics = field(default_factory=Metrics)
    # n samples (sampling.n > 1): this sequence is sample 0; at the end of its prefill it forks
    # samples 1..n-1 (same seq_id), which share its full prompt blocks (AggregatedEngine._fork).
    sample_index: int = 0
    parent: Sequence | None = None  # on samples > 0: sample 0
    samples: list[Sequence] = field(default_factory=list)  # on sample 0 once forked: all n, by index
    fork_blocks: list[int] = field(default_factory=list)  # reserved by prefill: the samples' last prompt block
    # penalties: this sequence's slot in the runner's penalty state (-1: none; see engine/penalties.py)
    penalty_slot: int = -1
    logprobs: list[TokenLogprob] | None = None  # sampling.logprobs: one record per sampled token

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_images(self) -> int:
        return 0 if self.pixel_values is None else self.pixel_values.shape[0]

    def slot(self, pos: int, block_size: int) -> int:
        """The KV-arena slot of token `pos`: block * block_size + offset."""
        return self.block_table[pos // block_size] * block_size + pos % block_size

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def needs_fork(self) -> bool:
        """Sample 0 of an n > 1 request whose other samples do not exist yet."""
        return self.sampling.n > 1 and self.parent is None and not self.samples

    @property
    def root(self) -> Sequence:
        """Sample 0: the request's own sequence."""
        return self.parent or self

    def fork(self, index: int, seed: int) -> Sequence:
        """Sample `index` of this (prefilled, not yet sampled) sequence: same prompt, images and
        prefill timings, its own seed, detokenizer and (empty) block table."""
        m = self.metrics
        detok = IncrementalDetokenizer(self.detok.tok, self.detok.skip) if self.detok is not None else None
        metrics = Metrics(arrival=m.arrival, encode_start=m.encode_start, encode_end=m.encode_end,
                          prefill_start=m.prefill_start, mm_bytes=m.mm_bytes, mm_copy_s=m.mm_copy_s)
        return Sequence(seq_id=self.seq_id, prompt_ids=self.prompt_ids, sampling=self.sampling, seed=seed,
                        detok=detok, stop_token_ids=self.stop_token_ids, pixel_values=self.pixel_values,
                        num_cached=self.num_cached, status=self.status, metrics=metrics, sample_index=index,
                        parent=self)

    def stop_reason(self) -> str | None:
        """"stop" if the last token is a stop token, "length" at max_tokens, else None
        (stop strings need the text: append_token checks those)."""
        if self.output_ids and self.output_ids[-1] in self.stop_token_ids:
            return "stop"
        if len(self.output_ids) >= self.sampling.max_tokens:
            return "length"
        return None

    def append_token(self, token: int, now: float) -> tuple[str, RequestOutput | None]:
        """Record a generated token: returns the new text and, when a stop token, max_tokens or
        a stop string ends the sequence, its output (stop strings are cut from the text)."""
        self.output_ids.append(token)
        m = self.metrics
        m.token_times.append(now)
        m.first_token = m.first_token or now
        delta = self.detok.add(token)
        self.finish_reason = self.stop_reason()
        if self.finish_reason:
            delta += self.detok.flush()
        delta = self._apply_stop_strings(delta)
        if self.finish_reason is None:
            return delta, None
        m.finished = now
        root = self.root
        if any(s.finish_reason is None for s in root.samples):
            return delta, None  # the request ends with its last sample
        return delta, root.request_output(now)

    def abort(self, now: float) -> None:
        """Mark every unfinished sample of this request finish_reason "abort"."""
        for s in self.root.samples or [self]:
            if s.finish_reason is None:
                s.finish_reason = "abort"
                s.metrics.finished = now

    def completion(self) -> CompletionOutput:
        # a multi-step decode run may sample past a stop: keep the records of the kept tokens only
        logprobs = None if self.logprobs is None else self.logprobs[: len(self.output_ids)]
        return CompletionOutput(self.sample_index, self.text, list(self.output_ids), self.finish_reason, logprobs)

    def request_output(self, now: float) -> RequestOutput:
        """The request's output (call on sample 0 once every sample has a finish_reason): text,
        token_ids, finish_reason and timings are sample 0's, `outputs` holds every sample."""
        m = self.metrics
        return RequestOutput(
            text=self.text,
            token_ids=list(self.output_ids),
            prompt_token_ids=list(self.prompt_ids),
            finish_reason=self.finish_reason,
            ttft_s=m.ttft_s(),
            tokens_per_s=m.decode_tokens_per_s(len(self.output_ids)),
            e2e_s=now - m.arrival,
            ttft_breakdown=m.breakdown(),
            handoff={"mm_bytes": m.mm_bytes, "mm_copy_s": m.mm_copy_s, "kv_bytes": m.kv_bytes,
                     "kv_migrate_s": m.kv_migrate_s},
            token_times_s=[t - m.arrival for t in m.token_times],
            outputs=self._completions(),
        )

    def _completions(self) -> list[CompletionOutput]:
        """All n samples by index; an abort before the fork has only sample 0: the rest are empty."""
        outputs = [s.completion() for s in self.samples or [self]]
        return outputs + [CompletionOutput(i, "", [], "abort") for i in range(len(outputs), self.sampling.n)]

    def _apply_stop_strings(self, delta: str) -> str:
        """Append delta to the text; on a stop string, cut the text there and finish."""
        before = len(self.text)
        self.text += delta
        for stop in self.sampling.stop:
            hit = self.text.find(stop, max(0, before - len(stop) + 1))  # only where new text can match
            if hit != -1:
                self.text = self.text[:hit]
                self.finish_reason = "stop"
        return self.text[before:] if len(self.text) > before else ""


@dataclass
class CompletionOutput:
    """One of a request's n samples (vLLM's shape). finish_reason: "stop" (a stop token or stop
    string), "length" (max_tokens) or "abort"."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None  # with sampling.logprobs: one record per token


@dataclass
class RequestOutput:
    """A finished (or aborted) request. text / token_ids / finish_reason / timings are sample
    0's, so n = 1 callers need not look at `outputs` (all n samples, by index)."""

    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "abort"
    ttft_s: float
    tokens_per_s: float  # decode rate: tokens after the first over their time
    e2e_s: float
    ttft_breakdown: dict[str, float] = field(default_factory=dict)  # queue / encode / wait / prefill seconds
    token_times_s: list[float] = field(default_factory=list)  # each token's time since arrival
    handoff: dict[str, float] = field(default_factory=dict)  # EPD: mm_bytes, mm_copy_s, kv_bytes, kv_migrate_s
    outputs: list[CompletionOutput] = field(default_factory=list)


@dataclass
class TokenEvent:
    """One streamed token: which request (and which of its n samples), the token, the new text,
    and the request's output on the last token of its last sample."""

    index: int
    token_id: int
    text_delta: str
    output: RequestOutput | None = None
    error: str | None = None  # the request failed (EPD: a stage failed it); token_id is -1
    sample: int = 0  # which of the request's n samples produced the token
