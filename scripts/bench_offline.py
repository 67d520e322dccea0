"""Offline throughput at LLaVA-1.5-7B shapes vs HF transformers, measured in one run:

- N requests (one 336x336 image each, ~40 text tokens, M output tokens): output tokens/s of
  `LLM.generate` vs HF `generate` batched (HF on the first --hf-requests, same prompts);
- vision tower + projector images/s at several batch sizes vs HF `get_image_features`.

    python scripts/bench_offline.py --model /tmp/llava-7b
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine import LLM, Request, SamplingParams  # noqa: E402

PROMPT = ("Describe this picture in detail: the colours, the animals, how many birds sit in the tree, "
          "and what the weather looks like today.")


def images(n: int, size: int = 336) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def timed(fn, repeats: int = 10) -> float:
    """Median seconds of fn() (synchronised), after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    from engine.cli import ArgumentParser, int_list, positive_int, require_cuda_backend

    p = ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, help="LLaVA checkpoint dir (e.g. from scripts/make_random_model.py)")
    p.add_argument("--requests", type=int, default=256, help="requests in our run (one image each)")
    p.add_argument("--output-tokens", type=int, default=256, help="tokens generated per request")
    p.add_argument("--hf-requests", type=int, default=64, help="HF runs this many (time per token is constant)")
    p.add_argument("--hf-batch", type=int, default=32, help="HF generate batch size")
    p.add_argument("--vision-batches", default="1,8,32", help="image batch sizes for the vision tower, comma-separated")
    p.add_argument("--multi-step", type=int, default=8, help="decode steps per device call (1-64)")
    p.add_argument("--deterministic", action="store_true",
                   help="batch-invariant ops (epd_kernels/invariant.py): outputs independent of the batch; slower")
    args = p.parse_args(argv)
    vision_batches = int_list("--vision-batches", args.vision_batches)
    for flag in ("requests", "output_tokens", "hf_requests", "hf_batch"):
        positive_int(f"--{flag.replace('_', '-')}", getattr(args, flag))
    positive_int("--multi-step", args.multi_step, 64)
    require_cuda_backend("the offline benchmark")

    llm = LLM(args.model, backend="cuda", dtype="bfloat16", device="cuda", max_num_seqs=args.requests,
              max_images_per_batch=max(vision_batches), multi_step=args.multi_step, deterministic=args.deterministic)
    pics = images(args.requests)
    reqs = [Request(PROMPT, images=[im]) for im in pics]
    sp = SamplingParams(max_tokens=args.output_tokens, ignore_eos=True)
    llm.generate(reqs[:2], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(reqs, sp)
    ours_s = time.perf_counter() - t0
    ours_tps = sum(len(o.token_ids) for o in outs) / ours_s
    prompt_len = len(outs[0].prompt_token_ids)
    ttft = statistics.median(o.ttft_s for o in outs)
    pixels = llm.image_processor.preprocess(pics[: max(vision_batches)])
    # Both sides start from bf16 pixels already on the GPU: the towers are compared, not host copies.
    on_gpu = pixels.to("cuda", torch.bfloat16)
    ours_vision = {b: b / timed(lambda b=b, f=llm.runner.encode_images: f(on_gpu[:b])) for b in vision_batches}
    prompt_ids = outs[0].prompt_token_ids
    import gc

    del llm, outs
    gc.collect()
    torch.cuda.empty_cache()

    from transformers import LlavaForConditionalGeneration

    hf = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=torch.bfloat16).cuda().eval()
    hf_vision = {}
    with torch.inference_mode():
        for b in vision_batches:
            hf_vision[b] = b / timed(lambda px=on_gpu[:b]: hf.model.get_image_features(pixel_values=px))
        n_hf = min(args.hf_requests, args.requests)
        hf_tokens, t0 = 0, time.perf_counter()
        for i in range(0, n_hf, args.hf_batch):
            b = min(args.hf_batch, n_hf - i)
            ids = torch.tensor([prompt_ids] * b, device="cuda")  # same prompt: no padding needed
            px = pixels[torch.arange(i, i + b) % pixels.shape[0]].to("cuda", torch.bfloat16)
            out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px,
                              max_new_tokens=args.output_tokens, min_new_tokens=args.output_tokens,
                              do_sample=False, pad_token_id=0)
            hf_tokens += (out.shape[1] - ids.shape[1]) * b
        torch.cuda.synchronize()
        hf_tps = hf_tokens / (time.perf_counter() - t0)

    print(f"{torch.cuda.get_device_name()}: {args.requests} requests, 1 image each, prompt {prompt_len} tokens "
          f"(576 image), {args.output_tokens} output tokens")
    print("| case | ours | HF transformers | speed-up |")
    print("|---|---|---|---|")
    print(f"| offline output tokens/s | {ours_tps:.0f} (all {args.requests}; median TTFT {ttft:.2f} s) | "
          f"{hf_tps:.0f} (first {n_hf}, batch {args.hf_batch}) | {ours_tps / hf_tps:.1f}x |")
    for b in vision_batches:
        print(f"| vision tower + projector, batch {b}: images/s | {ours_vision[b]:.0f} | {hf_vision[b]:.0f} | "
              f"{ours_vision[b] / hf_vision[b]:.2f}x |")


if __name__ == "__main__":
    from engine.cli import run_main

    sys.exit(run_main(main))
