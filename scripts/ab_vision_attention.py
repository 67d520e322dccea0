"""A/B (issue 16): the vision tower + projector with its attention op swapped, in one process.

    python scripts/ab_vision_attention.py --model /tmp/llava-7b [--batches 1,8,32]

Variants: ours (epd_kernels attention_dense), torch SDPA restricted to its flash backend, and to
its cuDNN backend. The tower runs eagerly (no graphs, so every variant runs the same launches but
the attention); bf16 pixels already on the GPU; median of 20 synchronized calls, the variants
interleaved three times. Prints images/s per batch and variant, and each variant's largest
difference from ours on one batch (the same math: expect bf16 noise, not a different answer).
"""

from __future__ import annotations

import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine import LLM  # noqa: E402
from engine.cli import int_list  # noqa: E402


def sdpa_attention(backend):
    from torch.nn.attention import sdpa_kernel

    def attention_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        with sdpa_kernel(backend):  # [B, N, H, D] views -> [B, H, N, D] views, and back
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
        return out.transpose(1, 2).contiguous()  # a view of a [B, N, H, D] buffer where the backend made one

    return attention_dense


def main(argv: list[str] | None = None) -> None:
    from torch.nn.attention import SDPBackend

    from engine.cli import ArgumentParser, require_cuda_backend

    p = ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, help="LLaVA checkpoint dir (e.g. from scripts/make_random_model.py)")
    p.add_argument("--batches", default="1,8,32", help="image batch sizes, comma-separated")
    args = p.parse_args(argv)
    batches = int_list("--batches", args.batches)
    require_cuda_backend("the attention A/B")
    llm = LLM(args.model, backend="cuda", dtype="bfloat16", device="cuda", max_num_seqs=8,
              max_images_per_batch=max(batches), cuda_graphs=False)
    runner = llm.runner
    size = runner.cfg.vision.image_size
    gen = torch.Generator(device="cuda").manual_seed(0)
    pixels = torch.randn((max(batches), 3, size, size), generator=gen, device="cuda").to(torch.bfloat16)
    variants = {"ours": runner.ops}
    for label, backend in (("SDPA flash", SDPBackend.FLASH_ATTENTION), ("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION)):
        ops = types.ModuleType(runner.ops.__name__)
        ops.__dict__.update(runner.ops.__dict__)
        ops.attention_dense = sdpa_attention(backend)
        variants[label] = ops

    def tower(ops, b: int) -> torch.Tensor:
        with torch.inference_mode():
            return runner.model.encode_images(ops, pixels[:b])

    usable = {}
    for label, ops in variants.items():
        try:
            tower(ops, batches[0])
        except RuntimeError as e:
            print(f"{label}: unavailable: {str(e).splitlines()[0][:160]}")
            continue
        usable[label] = ops
    ref = tower(runner.ops, min(8, max(batches))).float()
    for label, ops in usable.items():
        diff = (tower(ops, min(8, max(batches))).float() - ref).abs().max().item()
        print(f"{label}: max |difference from ours| {diff:.4g} (output max |x| {ref.abs().max().item():.3g})")

    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(3):
        for b in batches:
            for label, ops in usable.items():
                for _ in range(3):
                    tower(ops, b)
                torch.cuda.synchronize()
                for _ in range(20):
                    t0 = time.perf_counter()
                    tower(ops, b)
                    torch.cuda.synchronize()
                    times.setdefault((label, b), []).append(time.perf_counter() - t0)
    print(f"{torch.cuda.get_device_name()}: vision tower + projector, eager, images/s (median of 60 calls)")
    print("| batch | " + " | ".join(usable) + " |")
    print("|---" * (len(usable) + 1) + "|")
    for b in batches:
        print(f"| {b} | " + " | ".join(f"{b / statistics.median(times[(label, b)]):.0f}" for label in usable) + " |")


if __name__ == "__main__":
    from engine.cli import run_main

    run_main(main)
