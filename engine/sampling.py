"""Sampling parameters. The sampler itself is an op (`sample` in each backend)."""

from __future__ import annotations

import math
from dataclasses import dataclass

# n: every sample is its own decode row and its own answer blocks; 16 keeps one request to a
# quarter of the default decode batch (max_num_seqs 64), so it cannot starve the others.
MAX_N = 16
MAX_TOP_LOGPROBS = 20  # OpenAI's limit: top_logprobs returns at most 20 alternatives per token


class RequestError(ValueError):
    """A request the engine cannot serve as given; the message names the field and the limit."""


def first_surrogate(text: str) -> int | None:
    """Index of the first lone surrogate (no UTF-8 form, so no tokenizer takes it), else None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def _bad(name: str, value: object, limit: str) -> RequestError:
    return RequestError(f"sampling.{name} = {value!r}; {limit}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_float(name: str, value: object, lo: float, hi: float, lo_open: bool = False) -> None:
    """A finite real number in [lo, hi] ((lo, hi] with lo_open); bools are not numbers here."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (lo < value if lo_open else lo <= value) and value <= hi
    if not ok:
        raise _bad(name, value, f"must be a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]")


def _check_int(name: str, value: object, lo: int, hi: int | None, what: str = "") -> None:
    if not _is_int(value) or value < lo or (hi is not None and value > hi):
        limit = f"must be an integer >= {lo}" if hi is None else f"must be an integer in [{lo}, {hi}]"
        raise _bad(name, value, limit + what)


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise _bad(name, value, "must be True or False")


def _as_stop_strings(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (list, tuple)) or any(not isinstance(s, str) or not s for s in value):
        raise _bad("stop", value, "must be a string or a list of non-empty strings")
    for i, s in enumerate(value):
        pos = first_surrogate(s)
        if pos is not None:
            raise RequestError(f"sampling.stop[{i}] has a lone surrogate {s[pos]!r} at position {pos}; "
                               "stop strings must be valid Unicode text")
    return tuple(value)


def _as_token_ids(value: object) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or any(not _is_int(t) or t < 0 for t in value):
        raise _bad("stop_token_ids", value, "must be a list of non-negative integers")
    return tuple(value)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    temperature 0 is greedy. top_k 0 and top_p 1 disable those filters. seed None draws a
    seed per request from the engine's generator. Stop strings are cut from the output text.
    n: samples of the one prompt (prefilled once); sample i > 0 uses `sample_seed(seed, i)`.
    presence / frequency penalties (OpenAI's, in [-2, 2]) subtract from the logits of tokens
    already generated; repetition_penalty (HF's, > 0) divides positive logits of tokens seen
    in the prompt or the output and multiplies negative ones. logprobs: return each sampled
    token's log-probability, and with top_logprobs > 0 that many most likely alternatives.
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", _as_stop_strings(self.stop))
        object.__setattr__(self, "stop_token_ids", _as_token_ids(self.stop_token_ids))
        _check_int("max_tokens", self.max_tokens, 1, None)
        _check_float("temperature", self.temperature, 0.0, 100.0)
        _check_int("top_k", self.top_k, 0, None, " (0 = disabled)")
        _check_float("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise _bad("seed", self.seed, "must be None or an integer in [0, 2**63)")
        _check_bool("ignore_eos", self.ignore_eos)
        _check_bool("skip_special_tokens", self.skip_special_tokens)
        _check_int("n", self.n, 1, MAX_N)
        _check_float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_float("repetition_penalty", self.repetition_penalty, 0.0, 10.0, lo_open=True)
        _check_bool("logprobs", self.logprobs)
        _check_int("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS)
        if self.top_logprobs and not self.logprobs:
            raise _bad("top_logprobs", self.top_logprobs, "needs logprobs=True")


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of a request seeded `seed`: sample 0 keeps it (n=1 runs are
    unchanged), sample i > 0 gets (seed + i * 0x9E3779B97F4A7C15) mod 2**63 — a fixed odd
    stride (the golden-ratio constant), so the n seeds are distinct and reproducible."""
    return (seed + index * 0x9E3779B97F4A7C15) % 2**63
