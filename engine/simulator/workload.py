"""The workload: phases of requests and their arrival times, shared by the simulator and the load
generator (scripts/bench_serve.py imports `arrival_offsets` and `parse_phases` from here: one
formula for both).

A phase is a run of requests of one shape (images per request, image size, prompt and output
length) sent at one rate; phases run back to back: a phase starts when the previous one's last
request was sent. Text form, one phase per `;`:

    requests=100,rate=8,images=2,size=1920x1080,max_tokens=10;requests=100,rate=8,images=0,max_tokens=128
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class Phase:
    requests: int
    rate: float  # req/s; math.inf = all at once
    images: int = 1  # images per request
    image_size: tuple[int, int] = (336, 336)  # (width, height)
    prompt_tokens: int = 22  # text tokens per prompt (besides image tokens)
    max_tokens: int = 10  # output tokens per request
    burstiness: float = 1.0

    def __post_init__(self) -> None:
        for name, low in (("requests", 1), ("images", 0), ("prompt_tokens", 0), ("max_tokens", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"phase {name}={value!r}: must be an integer >= {low}")
        if not self.rate > 0 or math.isnan(self.rate):
            raise ValueError(f"phase rate={self.rate!r}: must be > 0 (or inf)")
        if not 0 < self.burstiness < math.inf:
            raise ValueError(f"phase burstiness={self.burstiness!r}: must be a positive number")
        w, h = self.image_size
        if not (isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0):
            raise ValueError(f"phase size={self.image_size!r}: expected positive (width, height)")


# text key -> Phase field
_KEYS = {"requests": "requests", "rate": "rate", "images": "images", "size": "image_size",
         "prompt_tokens": "prompt_tokens", "max_tokens": "max_tokens", "burstiness": "burstiness"}


def parse_size(text: str) -> tuple[int, int]:
    """ "1920x1080" -> (1920, 1080): (width, height)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"image size {text!r}: expected WxH, e.g. 336x336") from None
    if w <= 0 or h <= 0:
        raise ValueError(f"image size {text!r}: width and height must be > 0")
    return w, h


def _value(key: str, text: str) -> object:
    try:
        if key == "size":
            return parse_size(text)
        if key in ("rate", "burstiness"):
            return float(text)
        return int(text)
    except ValueError:
        what = "WxH, e.g. 1920x1080" if key == "size" else ("a number" if key in ("rate", "burstiness")
                                                             else "an integer")
        raise ValueError(f"phases: {key}={text!r}: expected {what}") from None


def parse_phases(text: str) -> list[Phase]:
    """ "requests=100,rate=8,images=2,size=1920x1080;requests=50,rate=inf,images=0" -> phases.
    Keys: requests and rate (required), images, size (WxH), prompt_tokens, max_tokens, burstiness.
    A bad key or value raises ValueError naming it."""
    phases = []
    for n, part in enumerate(p.strip() for p in text.split(";")):
        if not part:
            raise ValueError(f"phases {text!r}: phase {n} is empty")
        settings: dict[str, object] = {}
        for item in part.split(","):
            key, sep, value = (s.strip() for s in item.partition("="))
            if key not in _KEYS:
                raise ValueError(f"phases: unknown key {key!r} in phase {n}; keys: {', '.join(_KEYS)}")
            if not sep or not value:
                raise ValueError(f"phases: {key!r} in phase {n} has no value (expected {key}=VALUE)")
            if _KEYS[key] in settings:
                raise ValueError(f"phases: {key!r} given twice in phase {n}")
            settings[_KEYS[key]] = _value(key, value)
        for required in ("requests", "rate"):
            if required not in settings:
                raise ValueError(f"phases: phase {n} ({part!r}) needs {required}=")
        try:
            phases.append(Phase(**settings))
        except ValueError as e:
            raise ValueError(f"phases: phase {n}: {e}") from None
    return phases


def format_phases(phases: list[Phase]) -> str:
    """The text form parse_phases reads back."""
    def one(p: Phase) -> str:
        return (f"requests={p.requests},rate={p.rate:g},images={p.images},size={p.image_size[0]}x{p.image_size[1]},"
                f"prompt_tokens={p.prompt_tokens},max_tokens={p.max_tokens},burstiness={p.burstiness:g}")
    return ";".join(one(p) for p in phases)


def phase_dict(phase: Phase) -> dict:
    return {f.name: getattr(phase, f.name) for f in fields(phase)} | {"image_size": list(phase.image_size)}


def arrival_offsets(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times (s from the start) of n requests: cumulative gamma inter-arrival gaps of shape
    `burstiness` and mean 1/rate (vLLM's; burstiness 1 = Poisson, < 1 burstier, > 1 steadier).
    The first request goes at 0. rate inf: all at 0."""
    import numpy as np

    if n <= 0:
        return []
    if math.isinf(rate):
        return [0.0] * n
    if rate <= 0 or burstiness <= 0:
        raise ValueError(f"rate {rate} and burstiness {burstiness} must be > 0")
    rng = np.random.default_rng(seed & 0xFFFFFFFF)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n - 1)
    return [0.0] + np.cumsum(gaps).tolist()


def phase_arrivals(phases: list[Phase], seed: int = 0) -> list[tuple[float, Phase]]:
    """Each request's send time and its phase, in order. Phase k's gaps are arrival_offsets with
    seed + k (one phase: exactly arrival_offsets(n, rate, burstiness, seed)); it starts when
    phase k-1's last request was sent."""
    out: list[tuple[float, Phase]] = []
    start = 0.0
    for k, phase in enumerate(phases):
        offsets = arrival_offsets(phase.requests, phase.rate, phase.burstiness, seed + k)
        out += [(start + t, phase) for t in offsets]
        start += offsets[-1]
    return out


def with_rate(phases: list[Phase], rate: float) -> list[Phase]:
    """The same workload shape with every phase at `rate` (the search's knob)."""
    return [replace(p, rate=rate) for p in phases]
