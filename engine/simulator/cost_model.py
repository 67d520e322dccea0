"""The simulator's cost model: measured stage times, interpolated.

A profiler (run on the GPU, written elsewhere) measures each stage on the real engine and writes
one JSON file; `CostModel.load` reads it. Schema (version 1, keys kept exactly):

    {"version": 1, "device": "NVIDIA H200", "model": "<dir>", "backend": "cuda", "dtype": "bfloat16",
     "block_size": 16, "image_tokens": 576,
     "preprocess": {"1920x1080": [[batch, seconds], ...], ...},  # JPEG decode + preprocess, per batch
     "tower": [[items, seconds], ...],                           # vision tower + projector
     "prefill": [[tokens, seconds], ...],                        # one prefill forward, tokens in all
     "decode": [[batch, context, seconds], ...],                 # one decode step at mean context
     "handoff": {"fixed_s": s, "mm_item_s": s, "kv_token_s": s}}

Between measured points times are piecewise linear; past the ends the end segment's line goes
on (never below 0); decode is bilinear in (batch, context). A size never measured takes the
nearest measured size's time, scaled by pixel count. What it ignores: times that vary from run
to run (the interpolant is a mean), and any dependence not in the table (a prefill's time on how
its tokens split into prompts, a decode step's on how contexts spread around their mean).

Calibration (optional section, scripts/fit_simulator.py fits it on measured bench_serve.py runs;
a file without it reads as all zeros, i.e. the profile alone, and to_dict writes it back only when
it was given):

    "calibration": {"request_overhead_s": s, "encode_batch_overhead_s": s, "colocation_factor": f,
                    "fit": {...}}   # fit: how it was fitted (free-form, kept as read)

The profile times each stage alone; the running engine pays for three things it cannot see, each
from a measurement of the H200 run in docs/runs/h200-2026-12-01/:

- request_overhead_s: a fixed delay per request between its send and its dispatch to the stages
  (it counts in TTFT): the client's HTTP send and the server's parse, base64 decode, the
  orchestrator's SHA-256 of each image (~0.4 ms per 400 KB JPEG) and reading its header, all in
  front of dispatch, and the first token's SSE back. Measured: the client's TTFT minus the
  server's (epd_metrics.ttft_s) is 15 ms p50 at 8 req/s, 20-53 ms from 16 to 96 req/s, and the
  server's own queue before the encoders another 2.5-24 ms. A constant delay of every arrival
  shifts the whole run, so it adds exactly itself to every TTFT. It is one number for all loads,
  while that path grows with load (18 ms p50 in all at 8 req/s, 36-88 ms at 40-96): fitted on
  low rates it stays right at high ones (there TTFT is mostly prefill backlog), fitted on high
  rates only it comes out too large for low ones (docs/runs/h200-2026-12-01/fit.txt).
- encode_batch_overhead_s: a fixed extra time per encoder batch that preprocesses at least one
  image (one whose embeddings are not cached), on the encoder's preprocessing thread: in the
  running engine a batch of ~8 1080p images preprocesses in 18-21 ms, against 5.3 ms alone in
  the profile (2.2 ms at 336x336): ~15 ms that does not scale with pixels, the batch's host
  syncs waiting for time slices of a GPU shared by two encoders, prefill and decode.
- colocation_factor: time-slicing overhead of a shared GPU: while k >= 2 jobs of instances on
  one GPU are busy, each runs at 1 / (k (1 + colocation_factor)) of its solo speed instead of
  processor sharing's 1 / k (events.ProcessorSharing), i.e. the GPU loses that share of its
  throughput to context switches between processes. Measured: the tower takes ~9 ms per batch in
  the pipeline vs 7.3 ms alone; TPOT p50 is 15 ms at 24-96 req/s where pure processor sharing
  predicts 11-11.4 ms.
"""

from __future__ import annotations

import json
import math
from bisect import bisect_left
from dataclasses import dataclass, field, replace
from pathlib import Path

from engine.simulator.workload import parse_size

VERSION = 1
TABLES = ("tower", "prefill")


def interpolate(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise-linear through (xs, ys) (xs ascending, distinct), the end segments extended past
    the ends; one point: its value everywhere. Never negative."""
    if len(xs) == 1:
        return max(0.0, ys[0])
    i = min(max(bisect_left(xs, x), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


def _points(name: str, value: object, width: int) -> list[tuple[float, ...]]:
    """A table's rows, checked: lists of `width` non-negative numbers, sorted, keys distinct."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"cost model: {name!r} must be a non-empty list of {width}-number rows")
    rows = []
    for row in value:
        if (not isinstance(row, (list, tuple)) or len(row) != width
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                           for v in row)):
            raise ValueError(f"cost model: {name!r} row {row!r}: expected {width} non-negative numbers")
        rows.append(tuple(float(v) for v in row))
    rows.sort()
    keys = [r[:-1] for r in rows]
    if len(set(keys)) != len(keys):
        raise ValueError(f"cost model: {name!r} measures one point twice")
    return rows


@dataclass(frozen=True)
class Handoff:
    fixed_s: float = 0.0  # per hand-off message
    mm_item_s: float = 0.0  # per image item's embeddings copied between GPUs
    kv_token_s: float = 0.0  # per prompt token's KV moved to decode


@dataclass(frozen=True)
class Calibration:
    """What the running engine adds to the profile's stage times (the module docstring says why)."""

    request_overhead_s: float = 0.0  # per request, before dispatch
    encode_batch_overhead_s: float = 0.0  # per encoder batch with images to preprocess
    colocation_factor: float = 0.0  # a shared GPU's throughput lost to time-slicing: 1 / (1 + f)
    fit: dict | None = None  # how it was fitted (free-form)

    PARAMETERS = ("request_overhead_s", "encode_batch_overhead_s", "colocation_factor")

    @classmethod
    def from_dict(cls, d: object) -> Calibration:
        if not isinstance(d, dict):
            raise ValueError(f"cost model: 'calibration' must be an object (got {d!r})")
        unknown = set(d) - {*cls.PARAMETERS, "fit"}
        if unknown:
            raise ValueError(f"cost model: 'calibration' takes {', '.join(cls.PARAMETERS)} and fit "
                             f"(got {sorted(unknown)})")
        values = {}
        for k in cls.PARAMETERS:
            v = d.get(k, 0.0)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"cost model: calibration.{k} = {v!r}: expected a non-negative number")
            values[k] = float(v)
        fit = d.get("fit")
        if fit is not None and not isinstance(fit, dict):
            raise ValueError(f"cost model: calibration.fit must be an object (got {fit!r})")
        return cls(**values, fit=fit)

    def to_dict(self) -> dict:
        out: dict = {k: getattr(self, k) for k in self.PARAMETERS}
        return out | ({"fit": self.fit} if self.fit is not None else {})

    def params(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in self.PARAMETERS}


NO_CALIBRATION = Calibration()


@dataclass(frozen=True)
class CostModel:
    """Stage times of one model on one device (see the module docstring for the schema)."""

    preprocess: dict[tuple[int, int], list[tuple[float, float]]]
    tower: list[tuple[float, float]]
    prefill: list[tuple[float, float]]
    decode: list[tuple[float, float, float]]
    handoff: Handoff
    image_tokens: int = 576
    block_size: int = 16
    meta: dict | None = None  # device, model, backend, dtype: as read
    calibration: Calibration | None = None  # None: the file has none (all zeros in effect)
    _curves: dict = field(init=False, repr=False, compare=False)  # table -> (xs, ys), made once

    def __post_init__(self) -> None:
        curves = {name: _curve(getattr(self, name)) for name in TABLES}
        curves |= {size: _curve(pts) for size, pts in self.preprocess.items()}
        batches = sorted({p[0] for p in self.decode})
        curves["decode"] = (batches, [_curve([(c, s) for b_, c, s in self.decode if b_ == b]) for b in batches])
        object.__setattr__(self, "_curves", curves)

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a cost-model JSON ({e})") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, d: dict) -> CostModel:
        if not isinstance(d, dict) or d.get("version") != VERSION:
            raise ValueError(f"cost model: version {d.get('version') if isinstance(d, dict) else d!r}; "
                             f"this simulator reads version {VERSION}")
        missing = [k for k in ("preprocess", "tower", "prefill", "decode", "handoff") if k not in d]
        if missing:
            raise ValueError(f"cost model: missing {missing[0]!r}")
        if not isinstance(d["preprocess"], dict) or not d["preprocess"]:
            raise ValueError("cost model: 'preprocess' must map 'WxH' sizes to [[batch, seconds], ...]")
        preprocess = {parse_size(k): _points(f"preprocess.{k}", v, 2) for k, v in d["preprocess"].items()}
        hand = d["handoff"]
        unknown = set(hand) - {"fixed_s", "mm_item_s", "kv_token_s"} if isinstance(hand, dict) else {"?"}
        if unknown:
            raise ValueError(f"cost model: 'handoff' takes fixed_s, mm_item_s, kv_token_s (got {sorted(unknown)})")
        meta = {k: d[k] for k in ("device", "model", "backend", "dtype", "cpu_cores") if k in d}
        if "cpu_cores" in meta and (isinstance(meta["cpu_cores"], bool) or not isinstance(meta["cpu_cores"], int)
                                    or meta["cpu_cores"] < 1):
            raise ValueError(f"cost model: cpu_cores = {meta['cpu_cores']!r}: expected a positive integer")
        return cls(preprocess=preprocess, tower=_points("tower", d["tower"], 2),
                   prefill=_points("prefill", d["prefill"], 2), decode=_points("decode", d["decode"], 3),
                   handoff=Handoff(**{k: float(v) for k, v in hand.items()}),
                   image_tokens=int(d.get("image_tokens", 576)), block_size=int(d.get("block_size", 16)), meta=meta,
                   calibration=Calibration.from_dict(d["calibration"]) if "calibration" in d else None)

    def to_dict(self) -> dict:
        """The JSON form (what from_dict reads)."""
        h = self.handoff
        return {"version": VERSION, **(self.meta or {}), "block_size": self.block_size,
                "image_tokens": self.image_tokens,
                "preprocess": {f"{w}x{h_}": [list(p) for p in pts] for (w, h_), pts in self.preprocess.items()},
                "tower": [list(p) for p in self.tower], "prefill": [list(p) for p in self.prefill],
                "decode": [list(p) for p in self.decode],
                "handoff": {"fixed_s": h.fixed_s, "mm_item_s": h.mm_item_s, "kv_token_s": h.kv_token_s},
                **({"calibration": self.calibration.to_dict()} if self.calibration is not None else {})}

    @property
    def cpu_cores(self) -> int:
        """Stage jobs that run at full speed at once on the profiled CPU ("cpu_cores": the cores
        the stages share, each stage process one thread; 1 when the file does not say)."""
        return int((self.meta or {}).get("cpu_cores", 1))

    @property
    def calib(self) -> Calibration:
        """The calibration in effect (all zeros when the file has none)."""
        return self.calibration or NO_CALIBRATION

    def calibrated(self, **params: float) -> CostModel:
        """This model with calibration parameters set (the others kept); fit= replaces the fit note."""
        return replace(self, calibration=replace(self.calib, **params))

    # ------------------------------------------------------------------ stage times (seconds)

    def preprocess_s(self, size_wh: tuple[int, int], batch: int) -> float:
        """Decode + preprocess `batch` JPEGs of size (width, height); a size not measured: the
        nearest measured one (by pixel count) scaled by the pixel ratio."""
        if batch <= 0:
            return 0.0
        size = tuple(size_wh)
        if size in self.preprocess:
            return interpolate(*self._curves[size], batch)
        pixels = size[0] * size[1]
        near = min(self.preprocess, key=lambda s: (abs(math.log(pixels / (s[0] * s[1]))), s))
        return interpolate(*self._curves[near], batch) * pixels / (near[0] * near[1])

    def tower_s(self, items: int) -> float:
        return interpolate(*self._curves["tower"], items) if items > 0 else 0.0

    def prefill_s(self, tokens: int) -> float:
        return interpolate(*self._curves["prefill"], tokens) if tokens > 0 else 0.0

    def decode_s(self, batch: int, context: float) -> float:
        """One decode step of `batch` sequences at mean context `context`: along context at each
        measured batch, then along batch."""
        if batch <= 0:
            return 0.0
        batches, along_context = self._curves["decode"]
        return interpolate(batches, [interpolate(*c, context) for c in along_context], batch)

    def handoff_s(self, items: int, kv_tokens: int) -> float:
        """One hand-off message carrying `items` image items' embeddings and `kv_tokens` tokens' KV."""
        h = self.handoff
        return h.fixed_s + items * h.mm_item_s + kv_tokens * h.kv_token_s

    def residuals(self) -> dict[str, float]:
        """Leave-one-out fit check: per table, the largest relative error of the interpolant at a
        measured interior point when that point is left out (tables of >= 3 points)."""
        out: dict[str, float] = {}
        tables = {name: getattr(self, name) for name in TABLES}
        tables |= {f"preprocess.{w}x{h}": pts for (w, h), pts in self.preprocess.items()}
        for b in sorted({p[0] for p in self.decode}):
            tables[f"decode.batch{b:g}"] = [(c, s) for b_, c, s in self.decode if b_ == b]
        for name, pts in tables.items():
            errors = [abs(_line(pts[:i] + pts[i + 1:], pts[i][0]) - pts[i][1]) / pts[i][1]
                      for i in range(1, len(pts) - 1) if pts[i][1] > 0]
            if errors:
                out[name] = max(errors)
        return out


def _curve(points: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    return [p[0] for p in points], [p[1] for p in points]


def _line(points: list[tuple[float, float]], x: float) -> float:
    return interpolate(*_curve(points), x)
