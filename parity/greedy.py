"""Greedy generation parity: `LLM.generate` (all requests batched) vs HF `generate`, one by one.

Tokens must be identical for every request over --steps tokens (default 32). This is a
full-precision check: at bf16/fp16 ties break differently; decode.py gates those dtypes.
"""

from __future__ import annotations

import torch
from common import Report, free_gpu, load_hf, make_llm, parser, prepare, resolve_model, test_requests
from decode import hf_generate

from engine import SamplingParams
from engine.config import parse_dtype


def main() -> None:
    args = parser(__doc__).parse_args()
    model_dir = resolve_model(args)
    dtype = parse_dtype(args.dtype)
    llm = make_llm(args, model_dir)
    requests = test_requests(llm, args.seed)
    items = prepare(llm, requests, max_tokens=args.steps)
    outs = llm.generate(requests, SamplingParams(max_tokens=args.steps, ignore_eos=True))
    del llm
    free_gpu()
    hf = load_hf(model_dir, dtype, args.device)
    report = Report(f"greedy parity ({args.steps} tokens, {len(items)} requests batched): {model_dir.name}, "
                    f"{args.dtype}, backend={args.backend}, device={args.device}")
    for i, (p, out) in enumerate(zip(items, outs)):
        ref, _ = hf_generate(hf, p, args.steps, args.device)
        same = next((j for j, (a, b) in enumerate(zip(out.token_ids, ref)) if a != b), len(ref))
        limit = args.steps if dtype == torch.float32 else 0
        report.check(f"request {i}: tokens identical before first divergence", same, limit, "d",
                     higher_is_better=True)
    report.finish()


if __name__ == "__main__":
    main()
