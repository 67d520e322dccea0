"""Kernel benchmarks at LLaVA-1.5-7B shapes: time, achieved GB/s or TFLOP/s, the ceiling measured
in this run (device copy bandwidth; cuBLAS bf16 GEMM), and torch's peer.

    python scripts/bench_kernels.py [--json OUT.json] [--md OUT.md]
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from epd_kernels.bench_utils import copy_bandwidth_GBps, gemm_tflops  # noqa: E402

FAMILIES = ["epd_kernels.rmsnorm_rope.bench", "epd_kernels.elementwise.bench", "epd_kernels.sampling.bench",
            "epd_kernels.attn_varlen.bench", "epd_kernels.attn_varlen.decode_bench", "epd_kernels.gemv.bench"]


def ceilings() -> dict:
    """Copy bandwidth (bytes read + written) and bf16 GEMM rate, measured now."""
    return {"copy_GBps": copy_bandwidth_GBps(), "gemm_TFLOPs": gemm_tflops(), "device": torch.cuda.get_device_name()}


def main(argv: list[str] | None = None) -> None:
    from engine.cli import ArgumentParser, require_cuda_backend

    p = ArgumentParser(description=__doc__)
    p.add_argument("--json", help="also write the rows and ceilings to this JSON file")
    p.add_argument("--md", help="also write the table to this Markdown file")
    args = p.parse_args(argv)
    require_cuda_backend("the kernel benchmarks")
    ceil = ceilings()
    rows = []
    for name in FAMILIES:
        try:
            rows += importlib.import_module(name).run(ceil)
        except Exception as e:  # one family failing must not hide the others' numbers
            rows.append({"case": f"{name}: ERROR {type(e).__name__}: {e}"})
    lines = [f"device {ceil['device']}: copy {ceil['copy_GBps']:.0f} GB/s, bf16 GEMM {ceil['gemm_TFLOPs']:.0f} TFLOP/s",
             "", "| case | ms | achieved | % of ceiling | peer | peer ms |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "ms" not in r:
            lines.append(f"| {r['case']} | | | | | |")
            continue
        lines.append(f"| {r['case']} | {r['ms']:.4f} | {r['achieved']:.1f} {r['unit']} | {r['pct']:.1f}% | "
                     f"{r.get('peer', '')} | {r.get('peer_ms', float('nan')):.4f} |")
    text = "\n".join(lines)
    print(text)
    if args.md:
        Path(args.md).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"ceilings": ceil, "rows": rows}, indent=1))


if __name__ == "__main__":
    from engine.cli import run_main

    sys.exit(run_main(main))
