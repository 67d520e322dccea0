"""Image preprocessing throughput (images/s) and parity: today's single-thread ImageProcessor, the CPU
thread pool, and the GPU path (nvjpeg decode, resize + normalize, end to end) on seeded synthetic JPEGs.

    python scripts/bench_preprocess.py [--json OUT.json] [--sizes 336x336,1920x1080,4032x3024]

Wall-clock timing (synchronized: host work counts, as it does when serving), median over --iters after
--warmup. Parity in the same run: GPU vs CPU output on the same decoded pixels (must be 0), nvjpeg vs
PIL decode (uint8 levels), and end to end (GPU from JPEG bytes vs ImageProcessor, in uint8 levels).
Targets: >= 1000 images/s for 1920x1080 and >= 150 images/s for 4032x3024 end to end on one H200.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.images import ImageProcessor, ImageProcessorConfig  # noqa: E402
from engine.preprocess import CpuImagePreprocessor, GpuImagePreprocessor, nvjpeg_available  # noqa: E402

TARGETS = {(1920, 1080): 1000.0, (4032, 3024): 150.0}  # (width, height) -> end-to-end images/s


def synthetic_jpegs(width: int, height: int, count: int, seed: int, quality: int = 90) -> list[bytes]:
    """Smooth gradients (different per image) + Gaussian noise, JPEG at `quality`."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = []
    for _ in range(count):
        a, b, c = rng.uniform(0.2, 1.0, 3)
        phase = rng.uniform(0, 6.28)
        base = np.stack([255 * a * xx / width, 255 * b * yy / height,
                         127 + 100 * c * np.sin(phase + 6.28 * (xx + yy) / (width + height))], axis=-1)
        x = np.clip(base + rng.normal(0, 8, base.shape).astype(np.float32), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(x).save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def images_per_s(fn: Callable[[], object], images: int, warmup: int, iters: int, cuda: bool) -> float:
    """Median images/s of fn() (which processes `images` images), synchronized wall clock."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return images / statistics.median(times)


def parity(cfg: ImageProcessorConfig, jpegs: list[bytes], gpu: GpuImagePreprocessor) -> dict:
    """Max |GPU - CPU| on the same decoded pixels (must be 0) and the nvjpeg-vs-PIL decode levels."""
    pil_pixels = [np.asarray(Image.open(io.BytesIO(j)).convert("RGB")) for j in jpegs]
    cpu = ImageProcessor(cfg).preprocess(jpegs)
    same = gpu.resize_normalize(pil_pixels).cpu()
    row = {"same_pixels_max_abs": float((same - cpu).abs().max())}
    if gpu.nvjpeg:
        decoded = [t.cpu().numpy().astype(np.int16) for t in gpu.decode(jpegs)]
        diffs = np.concatenate([np.abs(d - p.astype(np.int16)).ravel() for d, p in zip(decoded, pil_pixels)])
        std = torch.tensor(cfg.image_std).view(1, 3, 1, 1)
        e2e = ((gpu.preprocess(jpegs).cpu() - cpu) * std * 255).abs()
        row.update(decode_max_levels=int(diffs.max()), decode_mean_levels=float(diffs.mean()),
                   e2e_max_levels=float(e2e.max()), e2e_mean_levels=float(e2e.mean()))
    return row


def bench_size(cfg: ImageProcessorConfig, gpu: GpuImagePreprocessor | None, width: int, height: int,
               args: argparse.Namespace) -> tuple[list[dict], dict | None]:
    """The rows of one image size, and its parity stats (None without a GPU)."""
    label, rows = f"{width}x{height}", []
    batches = [int(b) for b in args.batches.split(",")]
    jpegs = synthetic_jpegs(width, height, max(batches + [args.cpu_images]), seed=width * 7 + height)
    cpu_set = jpegs[: args.cpu_images]

    def add(case: str, batch: int, ips: float, target: float | None = None) -> None:
        rows.append({"size": label, "case": case, "batch": batch, "images_per_s": ips, "target": target})
        print(f"  {label} {case} batch {batch}: {ips:.1f} images/s", file=sys.stderr, flush=True)

    single = ImageProcessor(cfg)
    add("ImageProcessor (1 thread)", len(cpu_set),
        images_per_s(lambda: single.preprocess(cpu_set), len(cpu_set), 1, args.cpu_iters, False))
    for workers in [int(w) for w in args.workers.split(",")]:
        pool = CpuImagePreprocessor(cfg, workers)
        add(f"CPU pool {workers} workers", len(cpu_set),
            images_per_s(lambda pool=pool: pool.preprocess(cpu_set), len(cpu_set), 1, args.cpu_iters, False))
        pool.close()
    if gpu is None:
        return rows, None
    for batch in batches:
        sub = jpegs[:batch]
        if gpu.nvjpeg:
            add("GPU nvjpeg decode", batch, images_per_s(lambda sub=sub: gpu.decode(sub), batch,
                                                         args.warmup, args.iters, True))
        decoded = gpu.decode(sub)
        add("GPU resize + normalize", batch, images_per_s(lambda d=decoded: gpu.resize_normalize(d), batch,
                                                          args.warmup, args.iters, True))
        add("GPU end to end" + ("" if gpu.nvjpeg else " (PIL decode)"), batch,
            images_per_s(lambda sub=sub: gpu.preprocess(sub), batch, args.warmup, args.iters, True),
            TARGETS.get((width, height)))
    return rows, parity(cfg, jpegs[: min(8, len(jpegs))], gpu)


def run(args: argparse.Namespace) -> dict:
    cfg = ImageProcessorConfig(image_size=args.image_size)
    cuda = torch.cuda.is_available()
    gpu = GpuImagePreprocessor(cfg) if cuda else None
    rows, parities = [], {}
    for size in args.sizes.split(","):
        width, height = (int(v) for v in size.split("x"))
        size_rows, size_parity = bench_size(cfg, gpu, width, height, args)
        rows += size_rows
        if size_parity is not None:
            parities[f"{width}x{height}"] = size_parity
    device = torch.cuda.get_device_name() if cuda else "cpu only"
    return {"device": device, "image_size": args.image_size, "nvjpeg": bool(gpu and gpu.nvjpeg),
            "rows": rows, "parity": parities}


def table(result: dict) -> str:
    lines = [f"device {result['device']}, output {result['image_size']}x{result['image_size']}, "
             f"nvjpeg {'on' if result['nvjpeg'] else 'off'}", "",
             "| size | case | batch | images/s | target | % of target |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        target = r["target"]
        pct = f"{100 * r['images_per_s'] / target:.0f}%" if target else ""
        lines.append(f"| {r['size']} | {r['case']} | {r['batch']} | {r['images_per_s']:.1f} | "
                     f"{target or ''} | {pct} |")
    if result["parity"]:
        lines += ["", "| size | GPU vs CPU, same pixels: max abs | nvjpeg vs PIL decode: max / mean levels | "
                  "end to end: max / mean levels |", "|---|---|---|---|"]
        for size, p in result["parity"].items():
            dec = f"{p['decode_max_levels']} / {p['decode_mean_levels']:.3f}" if "decode_max_levels" in p else "n/a"
            e2e = f"{p['e2e_max_levels']:.1f} / {p['e2e_mean_levels']:.3f}" if "e2e_max_levels" in p else "n/a"
            lines.append(f"| {size} | {p['same_pixels_max_abs']:g} | {dec} | {e2e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from engine.cli import ArgumentParser, positive_int

    p = ArgumentParser(description=__doc__)
    p.add_argument("--sizes", default="336x336,1920x1080,4032x3024", help="WIDTHxHEIGHT list")
    p.add_argument("--batches", default="1,8,32", help="GPU batch sizes")
    p.add_argument("--workers", default="1,4,8,16", help="CPU pool sizes")
    p.add_argument("--image-size", type=int, default=336, help="vision tower input side")
    p.add_argument("--cpu-images", type=int, default=32, help="images per CPU measurement")
    p.add_argument("--cpu-iters", type=int, default=3, help="timed repetitions of each CPU measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed GPU calls before timing")
    p.add_argument("--iters", type=int, default=10, help="timed GPU calls (median reported)")
    p.add_argument("--json", help="also write the rows and parity stats to this JSON file")
    args = p.parse_args(argv)
    for flag in ("image_size", "cpu_images", "cpu_iters", "warmup", "iters"):
        positive_int(f"--{flag.replace('_', '-')}", getattr(args, flag))
    if not nvjpeg_available():
        print("note: torchvision is not importable: GPU rows decode with PIL", file=sys.stderr)
    result = run(args)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    from engine.cli import run_main

    sys.exit(run_main(main))
