"""One simulated request and the record it becomes (bench_serve's record format)."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.simulator.metrics import tpot_of


@dataclass(eq=False)
class SimRequest:
    """A request's shape and its timeline in simulated seconds (None / 0 until reached)."""

    id: int
    arrival: float
    images: int
    image_size: tuple[int, int]
    prompt_tokens: int  # all of the prompt: text and image tokens
    max_tokens: int
    phase: int | None = None  # its phase's index in a --phases workload
    rate: float = 0.0  # its phase's rate (the record's "rate")
    image_keys: tuple = ()  # content keys of its images, for the encoders' caches (empty: all new)
    # the images' encode: of the part that finished last (EPD), or of the request's own batch
    preprocess_s: float = 0.0
    tower_s: float = 0.0
    encode_end: float | None = None
    parts_left: int = 0  # EPD: encoder parts not yet encoded
    prefill_start: float | None = None  # its prefill forward begins (its batch's, after any encode in pd)
    first_token: float | None = None  # the prefill's completion (TTFT ends here)
    token_times: list[float] = field(default_factory=list)  # every output token, the first included
    handoff_s: float = 0.0  # E->P and P->D hand-offs, in all

    @property
    def done(self) -> bool:
        return len(self.token_times) >= self.max_tokens

    def emit(self, now: float) -> None:
        """One output token at `now` (the first one is the prefill's)."""
        if not self.token_times:
            self.first_token = now
        self.token_times.append(now)

    def breakdown(self) -> dict[str, float]:
        """Seconds up to the first token, summing to TTFT (engine/output_processor.py's phases):
        queue (before the images are encoded, other than preprocess and tower: waiting for an
        encoder or a worker), preprocess, tower, prefill wait (encoded, not yet in a prefill
        forward: hand-off and prefill queue), prefill (the forward)."""
        enc1 = self.encode_end if self.encode_end is not None else self.arrival
        pre = self.prefill_start if self.prefill_start is not None else enc1
        end = self.first_token if self.first_token is not None else pre
        return {"queue_s": enc1 - self.arrival - self.preprocess_s - self.tower_s, "preprocess_s": self.preprocess_s,
                "tower_s": self.tower_s, "prefill_wait_s": pre - enc1, "prefill_s": end - pre}

    def record(self) -> dict:
        """The request as bench_serve.py records a measured one (times from its send), plus its
        breakdown; epd_metrics in our server's names, so plot_serve.py draws its timeline."""
        times = self.token_times
        ttft = times[0] - self.arrival if times else None
        e2el = times[-1] - self.arrival if times else None
        b = self.breakdown()
        return {"rate": self.rate, "request_id": self.id, "phase": self.phase, "scheduled_s": self.arrival,
                "start_s": self.arrival, "images": self.images, "max_tokens": self.max_tokens,
                "ttft_s": ttft, "e2el_s": e2el, "itls_s": [b_ - a for a, b_ in zip(times, times[1:])],
                "tpot_s": tpot_of(e2el, ttft, len(times)), "output_tokens": len(times),
                "prompt_tokens": self.prompt_tokens, "finish_reason": "length" if self.done else None,
                "success": self.done, "error": None if self.done else "not finished", "breakdown": b,
                "epd_metrics": {"ttft_s": ttft, "e2e_s": e2el, "queue_s": b["queue_s"],
                                "preprocess_s": b["preprocess_s"], "encode_s": b["tower_s"],
                                "wait_s": b["prefill_wait_s"], "prefill_s": b["prefill_s"],
                                "handoff_s": self.handoff_s}}
