"""Decode benchmark: ms per step and bandwidth utilisation at LLaVA-1.5-7B shapes, vs HF eager.

    python scripts/bench_decode.py --model /tmp/llava-7b [--batches 1,8,32,128] [--context 640]

Utilisation = (LM weight bytes + KV bytes read) / (step time x copy bandwidth measured now).
A step is one CUDA-graph replay plus the host work around it (batch copy-in, token copy-out).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine import LLM, SamplingParams  # noqa: E402
from engine.request import Sequence  # noqa: E402
from scripts.bench_kernels import ceilings  # noqa: E402


def prefilled_sequences(llm: LLM, batch: int, context: int, steps: int) -> list[Sequence]:
    """`batch` random prompts of `context` tokens with KV blocks for `steps` more, prefilled
    (their first token sampled). Free their block tables when done."""
    g = torch.Generator().manual_seed(batch)
    seqs = []
    for i in range(batch):
        ids = torch.randint(4, 500, (context,), generator=g).tolist()
        seq = Sequence(seq_id=i, prompt_ids=ids, sampling=SamplingParams(max_tokens=steps, ignore_eos=True),
                       seed=i, stop_token_ids=frozenset())
        seq.block_table = llm.engine.kv_blocks.allocate(-(-(context + steps + 1) // llm.runner.block_size))
        assert seq.block_table is not None, "KV arena too small for this batch"
        seqs.append(seq)
    for i in range(0, batch, 8):  # prefill in slices to bound activations
        out = llm.runner.prefill(seqs[i : i + 8])
        for s, t in zip(seqs[i : i + 8], out.token_ids):
            s.output_ids.append(t)
    return seqs


def timed_decode(llm: LLM, seqs: list[Sequence], num_steps: int) -> float:
    """Seconds of one runner.decode call of num_steps steps (synchronised: .tolist() inside);
    the tokens are appended to seqs afterwards, outside the timing."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    tokens, _ = llm.runner.decode(seqs, num_steps)
    seconds = time.perf_counter() - t0
    for step_tokens in tokens:
        for s, t in zip(seqs, step_tokens):
            s.output_ids.append(t)
    return seconds


def decode_calls(steps: int, multi_step: int) -> int:
    """Timed calls: `steps`, or with multi-step at least 10 (the KV grows about as with single steps)."""
    return steps if multi_step == 1 else max(10, steps // multi_step)


def bench_ours(llm: LLM, batch: int, context: int, steps: int, multi_step: int) -> float:
    """Median ms per decode step for `batch` sequences of `context` tokens, running
    `multi_step` steps per call (one copy-in, one copy-out): `steps` calls (at least 10 with
    multi-step, so the KV stays about as long as with single steps); the first 2 are warm-up."""
    calls = decode_calls(steps, multi_step)
    seqs = prefilled_sequences(llm, batch, context, calls * multi_step)
    times = [timed_decode(llm, seqs, multi_step) / multi_step for _ in range(calls)]
    for s in seqs:
        llm.engine.kv_blocks.free(s.block_table)
    return 1e3 * statistics.median(times[2:])


def bench_hf(model_dir: Path, context: int, steps: int) -> float:
    """HF transformers eager decode, batch 1: median ms per token from generate's timing."""
    from transformers import AutoModelForImageTextToText, LlamaForCausalLM

    try:
        hf = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.bfloat16).cuda().eval()
    except ValueError:
        hf = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16).cuda().eval()
    ids = torch.randint(4, 500, (1, context), device="cuda")

    def run(n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            hf.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    run(4)
    return 1e3 * (run(steps + 1) - run(1)) / steps  # prefill cancels out


def time_to_first_serve(model: str, max_num_seqs: int, background: bool) -> tuple[float, float, int]:
    """In a fresh process (cold CUDA context, as a server starts): seconds from LLM() to the
    first token of a request, seconds until every decode graph exists, and graph memory."""
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); from scripts.bench_decode import _serve_here; "
            f"print(json.dumps(_serve_here({model!r}, {max_num_seqs}, {background})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    first, done, nbytes = json.loads(out.stdout.strip().splitlines()[-1])
    return first, done, nbytes


def _serve_here(model: str, max_num_seqs: int, background: bool) -> tuple[float, float, int]:
    start = time.perf_counter()
    llm = LLM(model, backend="cuda", dtype="bfloat16", device="cuda", max_num_seqs=max_num_seqs,
              background_capture=background, progress=False)
    llm.generate("Hello", SamplingParams(max_tokens=2, ignore_eos=True))
    first = time.perf_counter() - start
    llm.runner.decode_graphs.wait_for_capture()
    done = time.perf_counter() - start
    return first, done, sum(b for _, _, b in llm.runner.decode_graphs.capture_log)


def main(argv: list[str] | None = None) -> None:
    from engine.cli import ArgumentParser, int_list, positive_int, require_cuda_backend

    p = ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, help="checkpoint dir (e.g. from scripts/make_random_model.py)")
    p.add_argument("--batches", default="1,8,32,128", help="decode batch sizes, comma-separated")
    p.add_argument("--context", type=int, default=640, help="tokens of context per sequence")
    p.add_argument("--steps", type=int, default=64, help="decode steps timed per case")
    p.add_argument("--multi-step", default="1,8", help="decode steps per call, comma-separated")
    p.add_argument("--no-hf", action="store_true", help="skip the HF eager baseline")
    p.add_argument("--deterministic", action="store_true",
                   help="batch-invariant ops (epd_kernels/invariant.py): outputs independent of the batch; slower")
    p.add_argument("--serve-time", action="store_true", help="time to first serve, background vs upfront capture")
    p.add_argument("--without-penalty-ops", action="store_true",
                   help="A/B only: capture the decode graphs without the penalty ops (apply_penalties, "
                        "record_tokens), to measure what they cost; tokens of penalised requests would be wrong")
    args = p.parse_args(argv)
    batches = int_list("--batches", args.batches)
    int_list("--multi-step", args.multi_step, upper=64)
    positive_int("--context", args.context)
    positive_int("--steps", args.steps)
    require_cuda_backend("the decode benchmark")
    ceil = ceilings()
    if args.serve_time:
        for background in (False, True):
            mode = "background" if background else "upfront"
            try:
                first, done, nbytes = time_to_first_serve(args.model, 256, background)
            except RuntimeError as e:
                print(f"{mode} capture FAILED: {e}", flush=True)
                continue
            print(f"time to first token in a fresh process, {mode} capture of decode graphs (max batch 256): "
                  f"{first:.2f} s (all graphs ready at {done:.2f} s; graph pool {nbytes / 2**20:.0f} MiB)", flush=True)
    if args.without_penalty_ops:
        from epd_kernels import get_backend

        ops = get_backend("cuda", torch.device("cuda"), torch.bfloat16)
        ops.apply_penalties = lambda logits, *_: logits
        ops.record_tokens = lambda *_: None
        print("A/B: decode graphs captured WITHOUT the penalty ops")
    llm = LLM(args.model, backend="cuda", dtype="bfloat16", device="cuda", max_num_seqs=max(batches),
              max_num_batched_tokens=8 * args.context, multi_step=max(int(x) for x in args.multi_step.split(",")),
              deterministic=args.deterministic)
    t = llm.cfg.text
    weight_bytes = sum(p.numel() * p.element_size() for p in llm.runner.model.lm.parameters())
    kv_token_bytes = t.num_layers * 2 * t.num_kv_heads * t.head_dim * 2
    log = llm.runner.decode_graphs.capture_log
    print(f"{ceil['device']}: copy {ceil['copy_GBps']:.0f} GB/s; LM weights {weight_bytes / 1e9:.2f} GB; "
          f"{len(log)} decode graphs captured in {sum(s for _, s, _ in log):.2f}s, "
          f"{sum(b for _, _, b in log) / 2**20:.0f} MiB")
    print("| batch | context | steps/call | ms/step | tokens/s | bytes/step (GB) | % of copy BW |")
    print("|---|---|---|---|---|---|---|")
    for k in [int(x) for x in args.multi_step.split(",")]:
        for b in batches:
            ms = bench_ours(llm, b, args.context, args.steps, k)
            mean_context = args.context + decode_calls(args.steps, k) * k / 2  # the KV grows as it runs
            moved = weight_bytes + b * mean_context * kv_token_bytes
            pct = 100 * moved / (ms * 1e-3) / (ceil["copy_GBps"] * 1e9)
            print(f"| {b} | {args.context} | {k} | {ms:.3f} | {b * 1e3 / ms:.0f} | {moved / 1e9:.2f} | {pct:.1f}% |",
                  flush=True)
    if not args.no_hf:
        import gc

        del llm  # free the weights, the KV arena and the graph pool before HF loads
        gc.collect()
        torch.cuda.empty_cache()
        ms = bench_hf(Path(args.model), args.context, args.steps)
        moved = weight_bytes + args.context * kv_token_bytes
        pct = 100 * moved / (ms * 1e-3) / (ceil["copy_GBps"] * 1e9)
        print(f"| HF eager, batch 1 | {args.context} | 1 | {ms:.3f} | {1e3 / ms:.0f} | {moved / 1e9:.2f} | "
              f"{pct:.1f}% |")


if __name__ == "__main__":
    from engine.cli import run_main

    sys.exit(run_main(main))
