"""The frontend side of a request's output, one path for every mode (the in-process LLM and the
EPD orchestrator): the kept tokens from the engine's token path (engine.request.append_step)
become TokenEvents with text deltas, stop strings cut the text and finish the sample, and the
RequestOutput comes with the last token of the last sample.

The engine side (engine.request.Sequence) holds token ids and decides stop tokens and
max_tokens; this side holds what only the frontend needs: one incremental detokenizer and text
per sample, the stop strings' effect, finish reasons, logprob records passed through, and the
request's timings (Metrics; the EPD orchestrator sets the hand-off figures on them).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from engine.messages import ENCODER_STAMPS
from engine.request import CompletionOutput, RequestOutput, TokenEvent, TokenLogprob
from engine.sampling import SamplingParams
from engine.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class Metrics:
    """perf_counter timestamps of one request's life (its sample 0's tokens)."""

    arrival: float = field(default_factory=time.perf_counter)
    preprocess_s: float = 0.0  # decoding and preprocessing its images (inside the encode interval in EPD)
    tower_s: float | None = None  # EPD: the encoder's tower time (the rest of the encode interval is queueing)
    encode_start: float | None = None  # first encode of its images (requests with images)
    encode_end: float | None = None
    encoder_times: tuple[float, ...] = ()  # EPD: the last part's batch: ENCODER_STAMPS
    prefill_times: tuple[float, ...] = ()  # EPD: its prefill batch's start and end in the prefill stage
    prefill_start: float | None = None  # first prefill (TTFT = first_token - arrival)
    first_token: float | None = None
    token_times: list[float] = field(default_factory=list)  # one per output token
    finished: float | None = None
    # EPD hand-offs (seconds include the copy's sync): image embeddings into prefill, KV into decode
    mm_bytes: int = 0
    mm_copy_s: float = 0.0
    kv_bytes: int = 0  # 0 with a shared arena: decode reads the prompt's blocks in place
    kv_migrate_s: float = 0.0

    def stamp(self, phase: str, start: float, end: float) -> None:
        """The preprocessing of its images ("preprocess": start and end), the first encode
        ("encode": start and end) or prefill ("prefill": start) of the request; later ones (a
        preempted sequence computed again) change nothing."""
        if phase == "preprocess":
            self.preprocess_s = self.preprocess_s or end - start
        elif phase == "encode":
            self.encode_start, self.encode_end = self.encode_start or start, self.encode_end or end
        elif phase == "prefill":
            self.prefill_start = self.prefill_start or start
        else:
            raise ValueError(f"phase {phase!r}: 'preprocess', 'encode' or 'prefill'")

    def breakdown(self) -> dict[str, float]:
        """Seconds in each phase up to the first token, summing to TTFT: queue (everything
        before the images' encode that is not preprocessing: waiting for a worker, for the
        encode scheduler), preprocess, encode, wait (encoded, not yet prefilling), prefill."""
        enc0, enc1 = self.encode_start or self.arrival, self.encode_end or self.arrival
        pre = self.prefill_start or enc1
        end = self.first_token or pre
        tower = enc1 - enc0 if self.tower_s is None else self.tower_s  # EPD: the encoder measured it
        return {"queue_s": enc1 - self.arrival - self.preprocess_s - tower, "preprocess_s": self.preprocess_s,
                "encode_s": tower, "wait_s": pre - enc1, "prefill_s": end - pre}

    def timeline(self) -> dict[str, float]:
        """Each stamp of the request's way to its first token, in seconds since its arrival: the
        encode dispatched (EPD) or started, the encoder's batch (preprocess start and end, tower
        start and end; EPD), encoded (the orchestrator has the embeddings), prefill start (sent to
        a prefill, in EPD), the prefill batch in the stage (start, end; EPD), first token. Stamps
        a request has not had are left out."""
        stamps = {"encode_start": self.encode_start, "encode_end": self.encode_end,
                  "prefill_start": self.prefill_start, "first_token": self.first_token}
        stamps.update(zip(ENCODER_STAMPS, self.encoder_times))
        stamps.update(zip(("prefill_batch_start", "prefill_batch_end"), self.prefill_times))
        return {k: v - self.arrival for k, v in stamps.items() if v is not None}

    def ttft_s(self) -> float:
        return (self.first_token or self.arrival) - self.arrival

    def decode_tokens_per_s(self, num_tokens: int) -> float:
        """Tokens after the first over the time they took (the decode rate)."""
        if num_tokens < 2 or self.first_token is None or self.finished is None:
            return 0.0
        return (num_tokens - 1) / max(self.finished - self.first_token, 1e-9)


class SampleState:
    """One of a request's n samples as the frontend sees it: its kept tokens, detokenizer, text
    (stop strings cut), finish reason and logprob records."""

    def __init__(self, index: int, detok: IncrementalDetokenizer) -> None:
        self.index, self.detok = index, detok
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.logprobs: list[TokenLogprob] | None = None

    def add(self, token: int, finish_reason: str | None, stops: tuple[str, ...],
            logprob: TokenLogprob | None) -> str:
        """Record a kept token (finish_reason: the engine ended the sample on it); returns the new
        text. A stop string in the text cuts it there and finishes the sample ("stop")."""
        self.token_ids.append(token)
        if logprob is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.append(logprob)
        self.finish_reason = finish_reason
        delta = self.detok.add(token)
        if finish_reason is not None:
            delta += self.detok.flush()
        before = len(self.text)
        self.text += delta
        for stop in stops:
            hit = self.text.find(stop, max(0, before - len(stop) + 1))  # only where new text can match
            if hit != -1:
                self.text = self.text[:hit]
                self.finish_reason = "stop"
        return self.text[before:] if len(self.text) > before else ""

    def completion(self) -> CompletionOutput:
        logprobs = None if self.logprobs is None else list(self.logprobs)
        return CompletionOutput(self.index, self.text, list(self.token_ids), self.finish_reason, logprobs)


class RequestState:
    """The frontend's record of one request: its prompt ids, sampling, timings, and its samples
    by index (each made on its first token: forks exist from their first token on)."""

    def __init__(self, request_id: int, prompt_ids: list[int], sampling: SamplingParams, tokenizer: Tokenizer,
                 arrival: float | None = None) -> None:
        self.request_id, self.prompt_ids, self.sampling = request_id, prompt_ids, sampling
        self.tokenizer = tokenizer
        self.metrics = Metrics() if arrival is None else Metrics(arrival=arrival)
        self.samples: dict[int, SampleState] = {}
        self.sample(0)

    def sample(self, index: int) -> SampleState:
        if index not in self.samples:
            detok = IncrementalDetokenizer(self.tokenizer, self.sampling.skip_special_tokens)
            self.samples[index] = SampleState(index, detok)
        return self.samples[index]

    @property
    def finished(self) -> bool:
        """Every one of the n samples has a finish reason."""
        return len(self.samples) == self.sampling.n and all(s.finish_reason for s in self.samples.values())

    def output(self, now: float) -> RequestOutput:
        """The request's output: text, token_ids, finish_reason and timings are sample 0's,
        `outputs` holds every sample (one never made, aborted before the fork, comes empty)."""
        first, m = self.samples[0], self.metrics
        outputs = [self.samples[i].completion() if i in self.samples else CompletionOutput(i, "", [], "abort")
                   for i in range(self.sampling.n)]
        return RequestOutput(
            text=first.text,
            token_ids=list(first.token_ids),
            prompt_token_ids=list(self.prompt_ids),
            finish_reason=first.finish_reason,
            ttft_s=m.ttft_s(),
            tokens_per_s=m.decode_tokens_per_s(len(first.token_ids)),
            e2e_s=now - m.arrival,
            ttft_breakdown=m.breakdown(),
            timeline=m.timeline(),
            arrival=m.arrival,
            handoff={"mm_bytes": m.mm_bytes, "mm_copy_s": m.mm_copy_s, "kv_bytes": m.kv_bytes,
                     "kv_migrate_s": m.kv_migrate_s},
            token_times_s=[t - m.arrival for t in m.token_times],
            outputs=outputs,
        )


class OutputProcessor:
    """The frontend's requests in flight (RequestState by request id) and the one path from kept
    tokens to TokenEvents and outputs."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.states: dict[int, RequestState] = {}

    def add(self, request_id: int, prompt_ids: list[int], sampling: SamplingParams,
            arrival: float | None = None) -> RequestState:
        """arrival: perf_counter time the request arrived (default: now); TTFT counts from it."""
        state = self.states[request_id] = RequestState(request_id, prompt_ids, sampling, self.tokenizer, arrival)
        return state

    def stamp(self, request_id: int, phase: str, start: float, end: float) -> None:
        """An engine phase began (and ended) for the request (Metrics.stamp); unknown ids are ignored."""
        state = self.states.get(request_id)
        if state is not None:
            state.metrics.stamp(phase, start, end)

    def process(self, request_id: int, sample: int, token: int, now: float, finish_reason: str | None = None,
                logprob: TokenLogprob | None = None) -> tuple[TokenEvent | None, bool]:
        """One kept token of sample `sample` (finish_reason: the engine ended the sample on it).
        Returns its event (None for a request no longer here, or a token past the stop string
        that finished the sample) and whether the sample is finished now: then the caller lets it
        go in the engine (a stop string: the engine does not know). The event of the last token of
        the last sample carries the request's output, and the request leaves."""
        state = self.states.get(request_id)
        if state is None:
            return None, False
        s = state.sample(sample)
        if s.finish_reason is not None:
            return None, False
        m = state.metrics
        if sample == 0:
            m.token_times.append(now)
            m.first_token = m.first_token or now
        delta = s.add(token, finish_reason, state.sampling.stop, logprob)
        output = None
        if s.finish_reason is not None:
            if sample == 0:
                m.finished = now
            if state.finished:
                output = state.output(now)
                del self.states[request_id]
        return TokenEvent(request_id, token, delta, output, sample=sample), s.finish_reason is not None

    def abort(self, request_id: int, now: float) -> RequestOutput | None:
        """The request leaves: its output so far, finish_reason "abort" on each sample not
        finished (None if it is not here: finished, aborted or never added)."""
        state = self.states.pop(request_id, None)
        if state is None:
            return None
        for s in state.samples.values():
            if s.finish_reason is None:
                s.finish_reason = "abort"
                if s.index == 0:
                    state.metrics.finished = now
        return state.output(now)

    def remove(self, request_id: int) -> None:
        """Forget the request (it failed: no output)."""
        self.states.pop(request_id, None)
