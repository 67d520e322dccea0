"""A request as the user gives it, the sequence state the engine keeps for it, the one token
path (Sequence.append_tokens, append_step) and the outputs."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from engine.sampling import RequestError, SamplingParams, first_surrogate


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
class TokenLogprob:
    """A sampled token's log-probability under the raw model logits (before penalties and
    temperature), and the top_logprobs most likely (token_id, logprob) pairs, ties to the lower id."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(eq=False)
class Sequence:
    """The engine's (stage-side) state of one request's sample: token ids, sampling, blocks and
    status. Text, stop strings and timings are the frontend's (engine/output_processor.py)."""

    seq_id: int
    prompt_ids: list[int]
    sampling: SamplingParams
    seed: int
    stop_token_ids: frozenset[int]
    pixel_values: torch.Tensor | None = None  # [num_items, 3, S, S]: the tower's inputs, image after image
    # (height, width) of each image in prompt order: its items and row layout (ModelConfig.image_layout)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    mm_keys: list[str] = field(default_factory=list)  # content key per item (engine/mm_cache.py); [] without
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)  # KV blocks
    mm_blocks: list[int] = field(default_factory=list)  # MM-arena blocks, one per item, until prefill
    # EPD prefill: (encoder, block) per item, read in place in the encoders' arenas on this device
    mm_peer_blocks: list[tuple[int, int]] = field(default_factory=list)
    num_cached: int = 0  # tokens whose K/V are in the arena
    status: Status = Status.WAITING
    finish_reason: str | None = None  # set by append_tokens: "stop" (a stop token) or "length"
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
        return len(self.image_sizes)

    @property
    def num_items(self) -> int:
        """Vision-tower inputs waiting to be encoded (a LLaVA-1.5 image is one, a NeXT image 1 + tiles)."""
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
        """Sample `index` of this (prefilled, not yet sampled) sequence: same prompt and images,
        its own seed and (empty) block table."""
        return Sequence(seq_id=self.seq_id, prompt_ids=self.prompt_ids, sampling=self.sampling, seed=seed,
                        stop_token_ids=self.stop_token_ids, pixel_values=self.pixel_values,
                        image_sizes=self.image_sizes, mm_keys=self.mm_keys,
                        num_cached=self.num_cached, status=self.status, sample_index=index, parent=self)

    def append_tokens(self, tokens: list[int]) -> list[int]:
        """The token path of every mode: append `tokens` (sampled in this order) up to the first
        that ends the sequence, a stop token (finish_reason "stop") or the max_tokens-th
        ("length"); the rest are dropped (multi-step decode samples past a stop). Returns the
        tokens kept; none once finished (stop strings are the frontend's: it finishes the
        sequence in the engine)."""
        kept: list[int] = []
        if self.finish_reason is not None or self.status is Status.FINISHED:
            return kept
        for token in tokens:
            self.output_ids.append(token)
            kept.append(token)
            if token in self.stop_token_ids:
                self.finish_reason = "stop"
            elif len(self.output_ids) >= self.sampling.max_tokens:
                self.finish_reason = "length"
            if self.finish_reason is not None:
                break
        return kept


class Kept(NamedTuple):
    """A token append_step kept: its sequence, its logprob record (sequences that asked for
    them), and the finish_reason when it ended the sequence (else None)."""

    seq: Sequence
    token: int
    finish_reason: str | None
    logprob: TokenLogprob | None


def append_step(produced: Iterable[tuple[Sequence, int]]) -> list[Kept]:
    """One step's (sequence, sampled token) pairs through Sequence.append_tokens, each
    sequence's tokens (several with multi-step decode) at once. Returns the tokens kept, in the
    order sampled; the caller finishes the sequences whose kept token has a finish_reason."""
    produced = list(produced)
    tokens: dict[Sequence, list[int]] = {}
    for seq, token in produced:
        tokens.setdefault(seq, []).append(token)
    # the tokens kept are the first of each sequence's, and the last len(kept) of its output_ids
    left = {seq: len(seq.append_tokens(ts)) for seq, ts in tokens.items()}
    pos = {seq: len(seq.output_ids) - n for seq, n in left.items()}
    kept: list[Kept] = []
    for seq, token in produced:
        if not left[seq]:
            continue
        left[seq] -= 1
        logprob = seq.logprobs[pos[seq]] if seq.logprobs is not None else None
        pos[seq] += 1
        kept.append(Kept(seq, token, seq.finish_reason if not left[seq] else None, logprob))
    return kept


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
    timeline: dict[str, float] = field(default_factory=dict)  # stamps on the way to the first token (Metrics.timeline)
    arrival: float = 0.0  # perf_counter when it arrived: timeline and token times count from it
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
