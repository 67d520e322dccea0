"""EPD across processes vs the aggregated engine, at LLaVA-1.5-7B shapes, in one run:

1. correctness: the same requests sent one at a time through `epd` and through `aggregated`
   (same batch shapes in both, so bf16 numerics match): greedy tokens must be identical;
2. load: all requests at once through `epd`: output tokens/s, TTFT and its breakdown by stage
   (queue / encode / wait / prefill), and the hand-offs: image embeddings into prefill and KV
   blocks into decode (bytes, seconds, GB/s vs the copy between those devices measured now).

    python scripts/bench_epd.py --model /tmp/llava-7b --placement "E:0,0 P:0 D:0"
    python scripts/bench_epd.py --model /tmp/llava-7b --placement "E:0,1 P:2 D:3"
    python scripts/bench_epd.py ... --no-share  # one GPU: copy the KV blocks instead of sharing

Several image sizes (`--image-size 336x336,1920x1080,4032x3024`) and both preprocessing paths
(`--image-preprocess auto,cpu`: on the GPU, then PIL threads) run in one call: a table per size
with TTFT p50 / p99 and its breakdown (queue / preprocess / tower / wait / prefill) per engine.

Exit status 1 if any request's tokens differ between the modes, or between two passes of one.
"""

from __future__ import annotations

import gc
import io
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine import LLM, Request, SamplingParams  # noqa: E402
from engine.epd import EPDEngine  # noqa: E402

PROMPT = "Describe this picture in detail: the colours, the animals, the weather, and what happens next."


def requests(n: int, images_per_request: int, size: tuple[int, int] = (336, 336), fmt: str = "png",
             seed: int = 0) -> list[Request]:
    """n requests of images_per_request distinct seeded images, width x height `size`: a smooth
    pattern (drawn at a quarter of the size, upscaled) plus noise: photo-like to a codec, never
    constant, and quick to make at 4032x3024. PNG or JPEG (quality 90)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0 : max(h // 4, 1), 0 : max(w // 4, 1)].astype(np.float32) * 4
    noise = rng.integers(-12, 13, (h, w, 3), dtype=np.int16)
    out = []
    for _ in range(n):
        data = []
        for _ in range(images_per_request):
            phase = rng.uniform(0, 6.28, 3)
            base = np.stack([127 + 100 * np.sin(xx / (40 + 30 * c) + yy / (55 + 20 * c) + phase[c])
                             for c in range(3)], -1).astype(np.uint8)
            smooth = np.asarray(Image.fromarray(base).resize((w, h), Image.BILINEAR), dtype=np.int16)
            shifted = np.roll(noise, (int(rng.integers(h)), int(rng.integers(w))), (0, 1))
            pixels = np.clip(smooth + shifted, 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="JPEG" if fmt == "jpeg" else "PNG", quality=90)
            data.append(buf.getvalue())
        out.append(Request(PROMPT, images=data))
    return out


def _sync(*devices: str) -> None:
    for d in devices:
        if d.startswith("cuda"):
            torch.cuda.synchronize(d)


def _median_s(fn, devices: tuple[str, ...], reps: int) -> float:
    """Median seconds of fn() between syncs of `devices`, the first 2 calls being warm-up."""
    times = []
    for _ in range(reps):
        _sync(*devices)
        t0 = time.perf_counter()
        fn()
        _sync(*devices)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def copy_gbps(src_device: str, dst_device: str, nbytes: int = 1 << 30) -> float:
    """Bytes moved per second by one large copy src -> dst (a peer copy between GPUs)."""
    src = torch.randn(nbytes // 2, dtype=torch.bfloat16, device=src_device)
    dst = torch.empty_like(src, device=dst_device)
    return nbytes / _median_s(lambda: dst.copy_(src), (src_device, dst_device), 12) / 1e9


def pull_gbps(src_device: str, dst_device: str, block_shape: tuple, dtype: torch.dtype, n: int,
              scattered: bool) -> tuple[float, int]:
    """GB/s of pull_blocks moving n blocks between two arenas here (ids in order, or shuffled
    so that every block is its own run); and the number of copies it issued."""
    from ipc.migration import block_runs, pull_blocks

    src = torch.randn(2 * n, *block_shape, device=src_device).to(dtype)
    dst = torch.empty_like(src, device=dst_device)
    g = torch.Generator().manual_seed(0)
    src_ids = torch.randperm(2 * n, generator=g)[:n].tolist() if scattered else list(range(n))
    dst_ids = torch.randperm(2 * n, generator=g)[:n].tolist() if scattered else list(range(n, 2 * n))
    seconds = _median_s(lambda: pull_blocks(src, src_ids, dst, dst_ids), (src_device, dst_device), 10)
    assert torch.equal(dst[dst_ids[-1]], src[src_ids[-1]].to(dst_device))
    nbytes = n * src[0].numel() * src.element_size()
    return nbytes / seconds / 1e9, len(block_runs(src_ids, dst_ids))


def one_at_a_time(engine, reqs: list[Request], sp: SamplingParams) -> list:
    return [engine.generate([r], sp)[0] for r in reqs]


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0


def p99(xs: list[float]) -> float:
    return float(np.percentile(xs, 99)) if xs else 0.0


@dataclass
class Workload:
    """One image size: warm-up requests (their own images: no cache hits later), the requests
    compared one at a time, and the load sent all at once."""

    size: str
    warm: list[Request]
    check: list[Request]
    load: list[Request]


@dataclass
class Run:
    """What one engine did with one workload."""

    alone: list  # the check requests' outputs, one at a time
    again: list  # the same, a second time (a moving output is a race)
    outs: list  # the load's outputs
    wall: float  # seconds for the load


def run_workloads(engine, workloads: list[Workload], sp: SamplingParams) -> list[Run]:
    runs = []
    for w in workloads:
        engine.generate(w.warm, sp)  # warm-up: first use of each kernel (and graph bucket) at this size
        alone, again = one_at_a_time(engine, w.check, sp), one_at_a_time(engine, w.check, sp)
        t0 = time.perf_counter()
        outs = engine.generate(w.load, sp)
        runs.append(Run(alone, again, outs, time.perf_counter() - t0))
    return runs


def compare(name: str, a: list, b: list) -> int:
    """How many requests' tokens are equal in a and b; prints where the others part."""
    same = 0
    for i, (x, y) in enumerate(zip(a, b)):
        x, y = x.token_ids, y.token_ids
        same += x == y
        if x != y:
            first = next((j for j, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
            print(f"  {name}, request {i}: tokens differ from position {first}: {x[first:first + 4]} vs "
                  f"{y[first:first + 4]}")
    return same


def load_row(label: str, run: Run) -> str:
    outs = run.outs
    n_tokens = sum(len(o.token_ids) for o in outs)
    br = {k: median([o.ttft_breakdown.get(k, 0.0) for o in outs]) * 1e3
          for k in ("queue_s", "preprocess_s", "encode_s", "wait_s", "prefill_s")}
    share = median([sum(o.ttft_breakdown.get(k, 0.0) for k in ("queue_s", "preprocess_s", "encode_s"))
                    for o in outs]) * 1e3
    ttft = [o.ttft_s for o in outs]
    return (f"| {label} | {n_tokens / run.wall:.0f} | {median(ttft) * 1e3:.1f} | {p99(ttft) * 1e3:.1f} | "
            f"{br['queue_s']:.1f} | {br['preprocess_s']:.1f} | {br['encode_s']:.1f} | {br['wait_s']:.1f} | "
            f"{br['prefill_s']:.1f} | {share:.1f} |")


SEGMENTS = (("intake", None, "encode_start"), ("to encoder batch", "encode_start", "preprocess_start"),
            ("preprocess", "preprocess_start", "preprocess_end"), ("to tower", "preprocess_end", "tower_start"),
            ("tower", "tower_start", "tower_end"), ("to orchestrator", "tower_end", "encode_end"))
# the preprocess segment's steps (GPU path: host times of the encoder's preprocessing thread)
PREP_STEPS = (("read bytes", "preprocess_start", "sources_end"), ("decode", "sources_end", "decode_end"),
              ("resize + normalize", "decode_end", "resize_end"), ("stack + sync", "resize_end", "preprocess_end"))


def timeline_row(label: str, outs: list, segments=SEGMENTS) -> str | None:
    """The encode share of these outputs split at each stamp of their timelines (p50s, ms); None
    without those stamps (aggregated; PREP_STEPS on the CPU path)."""
    stamps = {k for _, a, b in segments for k in (a, b) if k}
    lines = [o.timeline for o in outs if stamps <= set(o.timeline)]
    if not lines:
        return None
    cells = [median([t[b] - (t[a] if a else 0.0) for t in lines]) * 1e3 for _, a, b in segments]
    return f"| {label} | " + " | ".join(f"{c:.1f}" for c in cells) + " |"


def write_timelines(out: Path, pre: str, workloads: list[Workload], epd_runs: list[Run], agg_runs: list[Run]) -> None:
    """One JSON line per request of each load: engine, size, arrival (perf_counter), its
    timeline stamps and token times (seconds since arrival)."""
    out.mkdir(parents=True, exist_ok=True)
    for w, e, a in zip(workloads, epd_runs, agg_runs):
        with open(out / f"timeline_{pre}_{w.size}.jsonl", "w") as f:
            for engine, run in (("epd", e), ("aggregated", a)):
                for o in run.outs:
                    f.write(json.dumps({"engine": engine, "size": w.size, "arrival": o.arrival, "ttft": o.ttft_s,
                                        "timeline": o.timeline, "token_times": o.token_times_s}) + "\n")


def transports(stages: dict) -> str:
    """How each reader reaches its peers' arenas, from status: mapped (CUDA IPC or a shared
    file, same host) or pulled over a link (another host)."""
    out = []
    for name, st in stages.items():
        for key, what in (("kv_linked_from", "KV"), ("mm_linked_from", "MM")):
            if key in st:
                out.append(f"{name} {what} {'linked from ' + str(st[key]) if st[key] else 'mapped'}")
    return ", ".join(out) or "none reported"


def main(argv: list[str] | None = None) -> None:
    from engine.cli import PLACEMENT_HELP, ArgumentParser, check_device, check_placement, positive_int

    p = ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, help="LLaVA checkpoint dir (e.g. from scripts/make_random_model.py)")
    p.add_argument("--placement", default="E:0,0 P:0 D:0", help=PLACEMENT_HELP.partition(". Default")[0])
    p.add_argument("--mode", default="epd", choices=["epd", "pd"], help="pd: prefill encodes the images itself")
    p.add_argument("--requests", type=int, default=32, help="requests in the load run")
    p.add_argument("--check-requests", type=int, default=6, help="requests compared one at a time")
    p.add_argument("--images", type=int, default=1, help="images per request")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    p.add_argument("--kv-cache-tokens", type=int,
                   help="KV arena capacity in tokens, per stage (default: from GPU memory, shared out by the stages)")
    p.add_argument("--backend", default="cuda", choices=["cuda", "torch"],
                   help='torch: a CPU smoke run (--placement "E:cpu P:cpu D:cpu")')
    p.add_argument("--deterministic", action="store_true",
                   help="batch-invariant ops (epd_kernels/invariant.py): outputs independent of the batch; slower")
    p.add_argument("--no-share", action="store_true", help="copy KV blocks even when P and D share a GPU")
    p.add_argument("--max-images-per-batch", type=int, default=8, help="vision-tower items per encode batch")
    p.add_argument("--image-size", default="336x336",
                   help="WxH of each image, or several comma-separated (each its own workload; default: 336x336)")
    p.add_argument("--image-format", default="png", choices=["png", "jpeg"], help="how the images are encoded")
    p.add_argument("--image-preprocess", default="auto",
                   help="auto: the stages that encode decode and preprocess on their GPU; cpu: PIL on image_workers "
                        "threads; or both, comma-separated (each its own pair of engines)")
    p.add_argument("--timeline", metavar="DIR",
                   help="write each load's requests (arrival, timeline stamps, token times) as JSON lines there")
    p.add_argument("--no-encode-first", action="store_true",
                   help="prefills do not wait for busy encoders on their GPU (EngineConfig.encode_first=False)")
    args = p.parse_args(argv)
    sizes = []
    for text in args.image_size.split(","):
        try:
            size = tuple(int(v) for v in text.lower().split("x"))
            assert len(size) == 2 and min(size) > 0
        except (ValueError, AssertionError):
            p.error(f"--image-size {text!r}: expected WxH, e.g. 1920x1080")
        sizes.append((text, size))
    modes = args.image_preprocess.split(",")
    if any(m not in ("auto", "cpu") for m in modes):
        p.error(f"--image-preprocess {args.image_preprocess!r}: expected auto, cpu or auto,cpu")
    for flag in ("requests", "check_requests", "images", "max_tokens", "kv_cache_tokens", "max_images_per_batch"):
        positive_int(f"--{flag.replace('_', '-')}", getattr(args, flag))
    devices = check_placement(args.placement, args.mode)
    check_device(None, args.backend)
    sp = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    workloads = [Workload(text, requests(2, args.images, size, args.image_format, seed=2),
                          requests(args.check_requests, args.images, size, args.image_format),
                          requests(args.requests, args.images, size, args.image_format, seed=1))
                 for text, size in sizes]
    settings = dict(backend=args.backend, device=devices["P"][0], dtype="bfloat16",
                    kv_cache_tokens=args.kv_cache_tokens, max_images_per_batch=args.max_images_per_batch,
                    encode_first=not args.no_encode_first, deterministic=args.deterministic, progress=False)
    p_dev, d_dev = devices["P"][0], devices["D"][0]
    ceiling = copy_gbps(p_dev, d_dev)
    e_dev = devices.get("E", [p_dev])[0]
    mm_ceiling = copy_gbps(e_dev, p_dev) if e_dev != p_dev else ceiling
    from engine.config import ModelConfig

    t = ModelConfig.from_dir(args.model).text
    block_shape = (t.num_layers, 2, 16, t.num_kv_heads, t.head_dim)
    n_blocks = -(-(len(PROMPT) // 4 + 576) // 16)  # about one request's prompt
    for scattered in (False, True):
        gbps, runs = pull_gbps(p_dev, d_dev, block_shape, torch.bfloat16, n_blocks, scattered)
        print(f"pull_blocks {p_dev}->{d_dev}, {n_blocks} blocks in {runs} copies: {gbps:.0f} GB/s "
              f"({100 * gbps / ceiling:.0f}% of the copy)", flush=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    gpu = f"{torch.cuda.get_device_name()} x{torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
    print(f"{gpu}; placement {args.placement} ({args.mode}); "
          f"copy {p_dev}->{d_dev}: {ceiling:.0f} GB/s; {e_dev}->{p_dev}: {mm_ceiling:.0f} GB/s", flush=True)

    failed = False
    results: dict[str, tuple[list[Run], list[Run]]] = {}
    for pre in modes:
        t0 = time.perf_counter()
        with EPDEngine(args.model, placement=args.placement, mode=args.mode, share_kv_arena=not args.no_share,
                       image_preprocess=pre, **settings) as epd:
            started = time.perf_counter() - t0
            epd_runs = run_workloads(epd, workloads, sp)
            stages = epd.status()["stages"]
            kv = {n: s.get("kv_cache_tokens") for n, s in stages.items() if "kv_cache_tokens" in s}
        print(f"image_preprocess {pre}: stages started in {started:.1f}s; KV tokens per stage: {kv}; "
              f"transport: {transports(stages)}", flush=True)
        agg = LLM(args.model, image_preprocess=pre, **settings)
        agg_runs = run_workloads(agg, workloads, sp)
        del agg
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        results[pre] = epd_runs, agg_runs
        if args.timeline:
            write_timelines(Path(args.timeline), pre, workloads, epd_runs, agg_runs)
        for w, e, a in zip(workloads, epd_runs, agg_runs):
            n = len(w.check)
            same = compare("epd vs aggregated", e.alone, a.alone)
            stable = compare("epd, second pass", e.alone, e.again), compare("aggregated, second pass", a.alone, a.again)
            print(f"image_preprocess {pre}, {w.size}: one at a time: {same}/{n} requests token-for-token equal to "
                  f"aggregated; second pass equal to the first: epd {stable[0]}/{n}, aggregated {stable[1]}/{n} "
                  f"({args.max_tokens} greedy tokens each)", flush=True)
            failed |= same < n or min(stable) < n

    for i, w in enumerate(workloads):
        print(f"\n{args.requests} requests at once, {args.images} {w.size} {args.image_format} image(s) each, "
              f"{args.max_tokens} tokens out (ms; breakdown columns are p50s):")
        print("| engine | image_preprocess | tokens/s | TTFT p50 | TTFT p99 | queue | preprocess | tower | wait | "
              "prefill (incl. hand-off) | encode share (queue + preprocess + tower) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for pre, (epd_runs, agg_runs) in results.items():
            print(load_row(f"{args.mode} {args.placement} | {pre}", epd_runs[i]))
            print(load_row(f"aggregated {p_dev} | {pre}", agg_runs[i]))
        rows = [timeline_row(f"{args.mode} | {pre}", epd_runs[i].outs) for pre, (epd_runs, _) in results.items()]
        if any(rows):
            print("\nthe encode share's stamps (p50 ms of each segment; intake: arrival to dispatch):")
            print("| engine | image_preprocess | " + " | ".join(name for name, _, _ in SEGMENTS) + " |")
            print("|---|---|" + "---|" * len(SEGMENTS))
            print("\n".join(r for r in rows if r))
        rows = [timeline_row(f"{args.mode} | {pre}", epd_runs[i].outs, PREP_STEPS)
                for pre, (epd_runs, _) in results.items()]
        if any(rows):
            print("\nthe preprocess segment's steps (p50 ms; host times of the encoder's preprocessing thread):")
            print("| engine | image_preprocess | " + " | ".join(name for name, _, _ in PREP_STEPS) + " |")
            print("|---|---|" + "---|" * len(PREP_STEPS))
            print("\n".join(r for r in rows if r))
        share = median([sum(o.ttft_breakdown.get(k, 0.0) for k in ("queue_s", "preprocess_s", "encode_s"))
                        for o in results[modes[0]][0][i].outs])
        print(f"encode share of TTFT (queue + preprocess + encode), p50, {w.size}, {modes[0]}: {share * 1e3:.1f} ms")

    print("\nidle-engine TTFT (the check requests one at a time, first pass: fresh images; counted from "
          "arrival, preprocessing included; ms):")
    print("| engine | image_preprocess | image size | prompt tokens | TTFT p50 | min | queue | preprocess | tower | "
          "wait | prefill (incl. hand-off) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for pre, (epd_runs, agg_runs) in results.items():
        for w, e, a in zip(workloads, epd_runs, agg_runs):
            for label, outs in ((f"{args.mode} {args.placement}", e.alone), (f"aggregated {p_dev}", a.alone)):
                cells = [median([o.ttft_breakdown.get(k, 0.0) for o in outs]) * 1e3
                         for k in ("queue_s", "preprocess_s", "encode_s", "wait_s", "prefill_s")]
                ttfts = [o.ttft_s * 1e3 for o in outs]
                print(f"| {label} | {pre} | {w.size} | {median([len(o.prompt_token_ids) for o in outs]):.0f} | "
                      f"{median(ttfts):.1f} | {min(ttfts):.1f} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    for name, segments in (("stamps", SEGMENTS), ("preprocess steps", PREP_STEPS)):
        rows = [timeline_row(f"{args.mode} | {pre} | {w.size}", e.alone, segments)
                for pre, (epd_runs, _) in results.items() for w, e in zip(workloads, epd_runs)]
        if any(rows):
            print(f"\nidle-engine TTFT, the encode share's {name} (p50 ms):")
            print("| engine | image_preprocess | image size | " + " | ".join(n for n, _, _ in segments) + " |")
            print("|---|---|---|" + "---|" * len(segments))
            print("\n".join(r for r in rows if r))

    print("\n| hand-off (median per request) | image size | when | bytes | ms | GB/s | ceiling GB/s | % |")
    print("|---|---|---|---|---|---|---|---|")
    for w, run in zip(workloads, results[modes[0]][0]):
        for when, group in (("one at a time", run.alone), ("under load", run.outs)):
            h = [o.handoff for o in group]
            for name, nbytes, secs, ceil in (("image embeddings E->P", "mm_bytes", "mm_copy_s", mm_ceiling),
                                             ("KV blocks P->D", "kv_bytes", "kv_migrate_s", ceiling)):
                timed = [x for x in h if x[secs] > 0]
                if not timed:
                    print(f"| {name} | {w.size} | {when} | 0 (not moved) | 0 | | | |")
                    continue
                gbps = median([x[nbytes] / x[secs] / 1e9 for x in timed])
                mb, ms = median([x[nbytes] for x in timed]) / 1e6, median([x[secs] for x in timed]) * 1e3
                print(f"| {name} | {w.size} | {when} | {mb:.2f} MB | {ms:.3f} | {gbps:.0f} | {ceil:.0f} | "
                      f"{100 * gbps / ceil:.0f}% |")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    from engine.cli import run_main

    sys.exit(run_main(main))
