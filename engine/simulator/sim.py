"""A simulated run: a workload through a placement's instances, as the orchestrator routes it.

Modes: "epd" (encoders, prefill, decode as in a placement such as "E:0,0 P:0 D:0"), "pd"
(prefill encodes its own requests' images: "P:0 D:0") and "aggregated" (one instance doing
everything per entry of "A:0,1"). Routing is engine/router.py's code on the simulated loads:
a request's items are split over the least-loaded encoders (load: items in flight), a prefill
and a decode are the least loaded (load: requests from dispatch until prefilled / finished).
Hand-offs (CostModel.handoff_s) delay a request between stages: encoders -> prefill once its
last part is encoded (embeddings copied only from an encoder on another GPU), prefill -> decode
(KV moved unless one prefill and one decode share a GPU, and so a KV arena). Requests across
aggregated instances go to the least loaded one.

Images with content keys (SimRequest.image_keys; none: every image is new) go through the
encoders' caches as engine/mm_cache.py's: an item an encoder holds is answered without
preprocessing or tower, and routing sends a key to the encoder that took it last (the
orchestrator's hints, through engine/router.py's split_items). `cache_state` / `warm` carry the
caches from one run to the next, as one server serves bench_serve.py's rates in turn.

The cost model's calibration (cost_model.Calibration) acts here: request_overhead_s delays each
request's dispatch (its TTFT counts from its arrival), colocation_factor slows the GPUs' shared
work (events.ProcessorSharing), encode_batch_overhead_s each encoder batch that preprocesses
(stages.Encoder).

TTFT = the prefill's completion (its first token) - arrival; TPOT = (last token - first token) /
(tokens - 1). The same seed gives the same run.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from engine.placement import Placement
from engine.router import InstanceLoad, least_loaded, split_items
from engine.simulator.aggregated import Aggregated
from engine.simulator.cost_model import CostModel
from engine.simulator.events import EventLoop, ProcessorSharing
from engine.simulator.metrics import summarize_phases, summarize_rate
from engine.simulator.request import SimRequest
from engine.simulator.stages import Decode, Encoder, Instance, Part, Prefill
from engine.simulator.workload import Phase, phase_arrivals

MODES = ("epd", "pd", "aggregated")
DEFAULT_PLACEMENTS = {"epd": "E:0,0 P:0 D:0", "pd": "P:0 D:0", "aggregated": "A:0"}


@dataclass(frozen=True)
class SimConfig:
    """The engine settings the simulation obeys (EngineConfig's names and defaults)."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    max_images_per_batch: int = 8
    image_workers: int = 4  # aggregated: threads preprocessing images
    mm_cache: bool = True  # EPD encoders keep embeddings by image key (requests with image_keys)
    mm_cache_items: int | None = None  # MM-arena blocks beyond two encode batches (None: 256, a GPU's)

    @property
    def mm_cache_capacity(self) -> int:
        """Items an encoder's cache holds (EngineConfig.num_mm_blocks); 0 with the cache off."""
        extra = 256 if self.mm_cache_items is None else self.mm_cache_items
        return 2 * self.max_images_per_batch + extra if self.mm_cache else 0

    @classmethod
    def of(cls, config: object) -> SimConfig:
        """The simulated settings of an EngineConfig (or anything with those attributes)."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls) if hasattr(config, f.name)})


@dataclass(frozen=True)
class BatchRecord:
    """One batch an instance ran: a tower's items, a prefill's or decode step's sequences."""

    instance: str
    kind: str  # encode | prefill | decode
    device: str
    start: float
    end: float
    items: int = 0
    tokens: int = 0
    seqs: int = 0


def parse_devices(mode: str, placement: str | None) -> dict[str, tuple[str, ...]]:
    """Stage kind -> each instance's device: engine/placement.py's syntax for epd and pd, and
    "A:0,1" (aggregated instances on GPUs 0 and 1) for aggregated."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
    text = placement or DEFAULT_PLACEMENTS[mode]
    if mode != "aggregated":
        return Placement.parse(text, mode).devices
    letter, _, listed = text.strip().partition(":")
    if letter != "A" or not listed or " " in listed:
        raise ValueError(f"placement {text!r}: aggregated takes A:<gpu>[,<gpu>...], e.g. A:0,1")
    return {"aggregated": tuple(listed.split(","))}


class Simulation:
    """The instances of one placement on their GPUs, and the orchestrator between them."""

    def __init__(self, costs: CostModel, mode: str = "epd", placement: str | None = None,
                 config: SimConfig | None = None, sharing: type = ProcessorSharing) -> None:
        self.costs, self.mode, self.config = costs, mode, config or SimConfig()
        self.devices = parse_devices(mode, placement)
        self.placement = placement or DEFAULT_PLACEMENTS[mode]
        self.loop = EventLoop()
        factor, cores = costs.calib.colocation_factor, costs.cpu_cores
        shared = isinstance(sharing, type) and issubclass(sharing, ProcessorSharing)
        # a CPU's stage processes each run one thread: as many run at full speed as it has cores
        self.gpus = {d: sharing(self.loop, factor, servers=cores if d == "cpu" else 1) if shared else sharing(self.loop)
                     for kind in self.devices.values() for d in kind}
        make = {"encode": Encoder, "prefill": lambda s, i, d: Prefill(s, i, d, encodes=mode == "pd"),
                "decode": Decode, "aggregated": Aggregated}
        self.instances: dict[str, list[Instance]] = {
            kind: [make[kind](self, i, d) for i, d in enumerate(devs)] for kind, devs in self.devices.items()}
        self.loads = {kind: [0] * len(devs) for kind, devs in self.devices.items()}
        self.shared_kv = mode != "aggregated" and Placement.parse(self.placement, mode).shares_kv_device()
        self.batches: list[BatchRecord] = []
        self._parts: dict[SimRequest, list[Part]] = {}  # a request's encoder parts
        self.hints: dict[object, int] = {}  # image key -> the encoder that took it last

    def cache_state(self) -> dict:
        """The encoders' caches (keys, least recently used first) and the routing hints."""
        return {"hints": dict(self.hints), "encoders": [list(e.cache) for e in self.instances.get("encode", [])]}

    def warm(self, state: dict | None) -> None:
        """Start with the caches of `state` (cache_state() of a run on the same placement)."""
        if not state:
            return
        self.hints.update(state["hints"])
        for encoder, keys in zip(self.instances.get("encode", []), state["encoders"]):
            for key in keys:
                encoder.remember(key)

    def run(self, requests: list[SimRequest]) -> list[SimRequest]:
        """Simulate until every request has finished; the requests, their timelines filled in."""
        delay = self.costs.calib.request_overhead_s
        for req in requests:
            self.loop.at(req.arrival + delay, lambda req=req: self._arrive(req))
        self.loop.run()
        return requests

    def _snapshot(self, kind: str) -> list[InstanceLoad]:
        return [InstanceLoad(i, load) for i, load in enumerate(self.loads[kind])]

    def _least_loaded(self, kind: str) -> int:
        index = least_loaded(self._snapshot(kind))
        self.loads[kind][index] += 1
        return index

    def _arrive(self, req: SimRequest) -> None:
        if self.mode == "aggregated":
            self.instances["aggregated"][self._least_loaded("aggregated")].add(req)
        elif self.mode == "epd" and req.images:
            keys = req.image_keys if self.config.mm_cache else ()
            assignment = split_items(list(range(req.images)), self._snapshot("encode"), keys, self.hints)
            parts = [Part(req, len(items), e, tuple(keys[i] for i in items if i < len(keys)))
                     for e, items in assignment.items()]
            self._parts[req] = parts
            req.parts_left = len(parts)
            for part in parts:
                self.loads["encode"][part.encoder] += part.items
                self.instances["encode"][part.encoder].add(part)
        else:
            self._to_prefill(req, [])

    def encoded(self, part: Part) -> None:
        """An encoder finished a part; after the request's last, it goes to a prefill."""
        req = part.req
        self.loads["encode"][part.encoder] -= part.items
        req.parts_left -= 1
        if req.parts_left == 0:  # this part was the critical path
            req.preprocess_s, req.tower_s = part.prep_end - part.prep_start, part.tower_end - part.tower_start
            req.encode_end = self.loop.now
            self._to_prefill(req, self._parts.pop(req))

    def _to_prefill(self, req: SimRequest, parts: list[Part]) -> None:
        p = self._least_loaded("prefill")
        device = self.devices["prefill"][p]
        if parts:
            copied = sum(x.items for x in parts if self.devices["encode"][x.encoder] != device)
            delay = self.costs.handoff_s(copied, 0)
            req.handoff_s += delay
            self.loop.after(delay, lambda: self.instances["prefill"][p].add(req))
        else:
            self.instances["prefill"][p].add(req)

    def prefilled(self, req: SimRequest, prefill: Prefill) -> None:
        """Its first token is out: on to the least-loaded decode (unless that was its only token)."""
        self.loads["prefill"][prefill.index] -= 1
        if req.done:
            return
        d = self._least_loaded("decode")
        delay = self.costs.handoff_s(0, 0 if self.shared_kv else req.prompt_tokens)
        req.handoff_s += delay
        self.loop.after(delay, lambda: self.instances["decode"][d].add(req))

    def finished(self, req: SimRequest, instance: Instance) -> None:
        self.loads[instance.kind][instance.index] -= 1

    def log_batch(self, instance: Instance, start: float, kind: str | None = None, items: int = 0, tokens: int = 0,
                  seqs: int = 0) -> None:
        self.batches.append(BatchRecord(instance.name, kind or instance.kind, instance.device, start, self.loop.now,
                                        items, tokens, seqs))


def make_requests(phases: list[Phase], costs: CostModel, seed: int = 0, phased: bool = True) -> list[SimRequest]:
    """The workload's requests at their send times (workload.phase_arrivals); a prompt is its
    phase's text tokens plus image_tokens per image. phased: each has its phase's index (else
    None, as bench_serve.py records a run of --rates)."""
    index = [k if phased else None for k, p in enumerate(phases) for _ in range(p.requests)]
    return [SimRequest(id=i, arrival=t, images=p.images, image_size=p.image_size, max_tokens=p.max_tokens,
                       prompt_tokens=p.prompt_tokens + p.images * costs.image_tokens, phase=k, rate=p.rate)
            for i, ((t, p), k) in enumerate(zip(phase_arrivals(phases, seed), index))]


@dataclass
class SimResult:
    """A simulated run: per-request records (bench_serve's format), the summary over all of them
    (bench_serve's summarize_rate), one per phase when there are several, and every batch run."""

    records: list[dict]
    summary: dict
    per_phase: list[dict] = field(default_factory=list)
    batches: list[BatchRecord] = field(default_factory=list)


def summarize(phases: list[Phase], records: list[dict], slo_ttft: float, slo_tpot: float,
              phased: bool = True) -> tuple[dict, list[dict]]:
    """(summary over all records, per-phase summaries if phased), with bench_serve's duration: from
    the first send (at 0) to the last reply."""
    duration = max((r["start_s"] + (r["e2el_s"] or 0.0) for r in records), default=0.0)
    if not phased:
        return summarize_rate(phases[0].rate, records, duration, slo_ttft, slo_tpot), []
    per_phase, overall = summarize_phases(phases, records, duration, slo_ttft, slo_tpot)
    return overall, per_phase


def simulate(costs: CostModel, mode: str, placement: str | None, phases: list[Phase], *,
             config: SimConfig | None = None, seed: int = 0, slo_ttft: float = 1.4, slo_tpot: float = 0.04,
             sharing: type = ProcessorSharing, phased: bool | None = None) -> SimResult:
    """Run the workload `phases` (seeded as bench_serve.py seeds it) on `placement` in `mode`.
    phased (default: more than one phase): as bench_serve.py --phases (records with phase
    indices, a summary per phase); else as one rate of --rates."""
    phased = len(phases) > 1 if phased is None else phased
    sim = Simulation(costs, mode, placement, config, sharing)
    records = [r.record() for r in sim.run(make_requests(phases, costs, seed, phased))]
    summary, per_phase = summarize(phases, records, slo_ttft, slo_tpot, phased)
    return SimResult(records, summary, per_phase, sim.batches)
