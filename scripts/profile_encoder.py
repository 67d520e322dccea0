"""Where an encoder's GPU time goes, per image: preprocessing (nvjpeg decode, resize, normalize) and
the vision tower, each alone and then pipelined as the encode role runs them (a preprocessing
thread on its own stream, the tower on the worker's).

    python scripts/profile_encoder.py --model /tmp/llava-7b [--size 1920x1080] [--batch 8,32]

Per batch size: the synchronized wall time of each part (median of --repeats), a profile of 3 calls
(kernels grouped by name, busy time = the union of kernel and copy intervals, and the time the GPU
sat idle inside the call), and images/s of --batches-in-a-row batches run serially and pipelined
as the encode role runs them (tower on the default stream / on its own). Then the preprocessing's
steps, each synchronized, alone and during a tower; and the pipelined runs' GPU activity by stream.
CUDA_DEVICE_MAX_CONNECTIONS (the hardware queues, default 8) is read from the environment. What it
answers: the GPU time per image, the part of the wall time the GPU is not busy, how much the
pipeline hides, and what makes a decode wait for a tower.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.config import EngineConfig, ModelConfig  # noqa: E402
from engine.images_anyres import all_items  # noqa: E402
from engine.mm_cache import item_pixels  # noqa: E402
from engine.preprocess import (  # noqa: E402
    nvjpeg_decodable,
    on_side_stream,
    source_bytes,
    stage_image_processor,
)
from engine.request import Sequence  # noqa: E402
from engine.runner import build_runner  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402
from scripts.bench_epd import requests  # noqa: E402
from scripts.profile_decode import busy_time, short_name  # noqa: E402


def wall_ms(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def profile_table(title: str, fn: Callable[[], object], calls: int = 3, top: int = 14) -> float:
    """Print fn's GPU activity per call; returns the busy ms per call."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if not events:
        print(f"{title}: the profiler recorded no GPU activity")
        return float("nan")
    groups: dict[str, list[float]] = {}
    for e in events:
        groups.setdefault(short_name(e.name), []).append(e.time_range.elapsed_us())
    intervals = [(e.time_range.start, e.time_range.end) for e in events]
    span = max(e for _, e in intervals) - min(s for s, _ in intervals)
    busy = busy_time(intervals) / calls / 1e3
    print(f"\n### {title}: per call: GPU busy {busy:.3f} ms, first to last activity {span / calls / 1e3:.3f} ms, "
          f"{len(events) / calls:.0f} kernels/copies")
    print("| kernel or copy | per call | us each (median) | ms per call | % of busy |")
    print("|---|---|---|---|---|")
    ranked = sorted(groups.items(), key=lambda kv: -sum(kv[1]))
    for name, durs in ranked[:top]:
        per_call = sum(durs) / calls / 1e3
        print(f"| {name} | {len(durs) / calls:.1f} | {statistics.median(durs):.2f} | {per_call:.3f} | "
              f"{100 * per_call / busy:.1f}% |")
    rest = sum(sum(d) for _, d in ranked[top:]) / calls / 1e3
    if rest:
        print(f"| (the other {len(ranked) - top}) | | | {rest:.3f} | {100 * rest / busy:.1f}% |")
    return busy


def stream_table(title: str, fn: Callable[[], object]) -> None:
    """Print fn's GPU activity per CUDA stream (from the profiler's trace): which stream the
    tower, nvjpeg and our kernels ran on, and whether they overlapped."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        trace = json.load(open(f.name))
    gpu = [e for e in trace.get("traceEvents", []) if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    streams: dict[int, list[dict]] = {}
    for e in gpu:
        streams.setdefault(int(e.get("args", {}).get("stream", -1)), []).append(e)
    print(f"\n### {title}: GPU activity by stream")
    print("| stream | kernels and copies | busy ms | the most time |")
    print("|---|---|---|---|")
    for sid, events in sorted(streams.items()):
        busy = busy_time([(e["ts"], e["ts"] + e["dur"]) for e in events]) / 1e3
        names: dict[str, float] = {}
        for e in events:
            names[short_name(e["name"])] = names.get(short_name(e["name"]), 0.0) + e["dur"]
        top = ", ".join(f"{k} {v / 1e3:.2f}" for k, v in sorted(names.items(), key=lambda kv: -kv[1])[:3])
        print(f"| {sid} | {len(events)} | {busy:.2f} | {top} |")
    every = busy_time([(e["ts"], e["ts"] + e["dur"]) for e in gpu]) / 1e3
    span = (max(e["ts"] + e["dur"] for e in gpu) - min(e["ts"] for e in gpu)) / 1e3 if gpu else 0.0
    print(f"all streams: busy {every:.2f} ms of a {span:.2f} ms span")


def main(argv: list[str] | None = None) -> int:
    from engine.cli import ArgumentParser, int_list, positive_int, require_cuda_backend

    p = ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, help="LLaVA checkpoint dir (e.g. /tmp/llava-7b)")
    p.add_argument("--size", default="1920x1080", help="JPEG size WxH")
    p.add_argument("--batch", default="8,32", help="images per batch, comma-separated")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per measurement (median)")
    p.add_argument("--batches-in-a-row", type=int, default=24, help="batches per pipelined throughput run")
    args = p.parse_args(argv)
    batches = int_list("--batch", args.batch)
    positive_int("--repeats", args.repeats)
    positive_int("--batches-in-a-row", args.batches_in_a_row)
    width, height = (int(x) for x in args.size.lower().split("x"))
    require_cuda_backend("the encoder profile")

    cfg = ModelConfig.from_dir(args.model)
    config = EngineConfig(model=args.model, backend="cuda", dtype="bfloat16", device="cuda",
                          max_images_per_batch=max(batches), progress=False).for_model(cfg)
    runner = build_runner(config, cfg, parts="vision")
    runner.capture_graphs()
    processor = stage_image_processor(config, cfg)
    inner = getattr(processor, "images", processor)
    print(f"preprocessor: {type(processor).__name__}, nvjpeg {getattr(inner, 'nvjpeg', False)}; "
          f"graph buckets {sorted(runner.vision_graphs.graphs)}")
    stream = torch.cuda.Stream()
    count = max(batches) * 2
    images = [r.images[0] for r in requests(count, 1, (width, height), "jpeg", seed=3)]
    hw = [(height, width)] * count

    def prep(n: int, offset: int = 0) -> torch.Tensor:
        batch = images[offset: offset + n]
        with on_side_stream(stream):
            return item_pixels(processor, cfg, None, batch, all_items(cfg, hw[:n]), hw[:n], [])

    def prep_steps(n: int, during_tower: bool) -> dict[str, float]:
        """GpuImagePreprocessor's steps one by one, each synchronized: ms per step; with
        during_tower, a tower replay is launched on another stream first (it runs meanwhile)."""
        gpu, batch = inner, images[:n]
        marks: list[tuple[str, float]] = []
        if during_tower:  # the graph replay alone: runner.encode's scatter would wait for it on the host
            with torch.cuda.stream(side):
                runner.vision_graphs.run(tower_pixels[n])
        t = time.perf_counter()

        def mark(name: str) -> None:
            nonlocal t
            stream.synchronize()
            now = time.perf_counter()
            marks.append((name, now - t))
            t = now

        with torch.cuda.stream(stream):
            data = [source_bytes(x) for x in batch]
            assert all(nvjpeg_decodable(d) for d in data)
            mark("header checks")
            raw = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
            mark("bytes to tensors")
            decoded = [x.permute(1, 2, 0) for x in gpu._nvjpeg(raw)]
            mark("nvjpeg decode")
            out = gpu.resize_normalize(decoded)
            mark("resize + normalize")
            torch.stack([out[i] for i in range(n)])
            mark("stack")
        side.synchronize()
        return dict(marks)

    def tower(pixels: torch.Tensor) -> None:
        seq = Sequence(seq_id=-1, prompt_ids=[], sampling=SamplingParams(), seed=0, stop_token_ids=frozenset(),
                       pixel_values=pixels, mm_blocks=list(range(pixels.shape[0])))
        runner.encode([seq])

    print(f"\n## {args.size} JPEGs ({sum(len(x) for x in images) / len(images) / 1e3:.0f} KB each), "
          f"{torch.cuda.get_device_name()}")
    k = args.batches_in_a_row

    def serial(n: int) -> None:
        for i in range(k):
            tower(prep(n, (i % 2) * n))

    side = torch.cuda.Stream()

    def pipelined(n: int, own_stream: bool = False) -> None:
        """As EncodeRole: batch i+1 preprocesses during tower i; the tower on the thread's
        current stream (the legacy default stream) or on a stream of its own."""
        tower_stream = side if own_stream else torch.cuda.current_stream()
        with ThreadPoolExecutor(1) as pool, torch.cuda.stream(tower_stream):
            job = pool.submit(prep, n, 0)
            for i in range(k):
                pixels = job.result()
                pixels.record_stream(tower_stream)
                if i + 1 < k:
                    job = pool.submit(prep, n, ((i + 1) % 2) * n)
                tower(pixels)
                tower_stream.synchronize()

    tower_pixels: dict[int, torch.Tensor] = {}

    def measure(n: int) -> str:
        pixels = tower_pixels[n] = prep(n)
        pre_ms = wall_ms(lambda: prep(n), args.repeats)
        pre_busy = profile_table(f"preprocess, batch {n}", lambda: prep(n))
        tower_ms = wall_ms(lambda: tower(pixels), args.repeats)
        tower_busy = profile_table(f"tower + projector, batch {n}", lambda: tower(pixels))
        variants = (serial, pipelined, lambda n: pipelined(n, own_stream=True))
        rates = [k * n / (wall_ms(lambda fn=fn: fn(n), 5) / 1e3) for fn in variants]
        if getattr(inner, "nvjpeg", False):
            connections = os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS", "8 (default)")
            print(f"\n### preprocess steps, batch {n}, each synchronized (median ms of {args.repeats}), "
                  f"CUDA_DEVICE_MAX_CONNECTIONS {connections}")
            print("| step | alone | during a tower |")
            print("|---|---|---|")
            cases = (False, True)
            runs = {c: [prep_steps(n, c) for _ in range(args.repeats + 2)][2:] for c in cases}
            for step in runs[cases[0]][0]:
                cells = [1e3 * statistics.median(r[step] for r in runs[c]) for c in cases]
                print(f"| {step} | " + " | ".join(f"{x:.2f}" for x in cells) + " |")
        for own in (False, True):
            stream_table(f"pipelined, batch {n}, tower on {'its own stream' if own else 'the default stream'}",
                         lambda own=own: pipelined(n, own))
        return (f"| {n} | {pre_ms:.2f} | {pre_busy:.2f} | {tower_ms:.2f} | {tower_busy:.2f} | "
                + " | ".join(f"{r:.0f}" for r in rates) + " |")

    rows = [measure(n) for n in batches]
    print("\n## summary")
    print("| batch | preprocess wall ms | GPU busy ms | tower wall ms | GPU busy ms | serial images/s | "
          "pipelined images/s | pipelined, tower on its own stream |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    from engine.cli import run_main

    sys.exit(run_main(main))
