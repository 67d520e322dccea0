"""One-step logits parity: our prefill (several requests packed varlen) vs HF, at every prompt position.

fp32: max |diff| / max |logit| <= 1e-4. Lower precision: our error against HF fp32 must be
<= 1.5x HF's own error at that precision against HF fp32.
"""

from __future__ import annotations

import torch
from common import (
    Report,
    TeacherForcing,
    free_gpu,
    hf_logits,
    load_hf,
    make_llm,
    parser,
    prepare,
    rel_err,
    resolve_model,
    test_requests,
)

from engine.config import parse_dtype


def main() -> None:
    args = parser(__doc__).parse_args()
    model_dir = resolve_model(args)
    dtype = parse_dtype(args.dtype)
    llm = make_llm(args, model_dir)
    items = prepare(llm, test_requests(llm, args.seed), max_tokens=1)
    driver = TeacherForcing(llm, [p.seq for p in items])
    ours = driver.prefill().split([len(p.seq.prompt_ids) for p in items])
    driver.close()
    del driver, llm
    free_gpu()
    report = Report(f"logits parity: {model_dir.name}, {args.dtype}, backend={args.backend}, device={args.device}")
    hf32 = load_hf(model_dir, torch.float32, args.device)
    refs = [hf_logits(hf32, p, args.device, torch.float32) for p in items]
    del hf32
    free_gpu()
    if dtype == torch.float32:
        for i, (o, r) in enumerate(zip(ours, refs)):
            report.check(f"request {i} ({len(r)} positions) rel err vs HF fp32", rel_err(o, r), 1e-4)
    else:
        hf_low = load_hf(model_dir, dtype, args.device)
        for i, (o, r, p) in enumerate(zip(ours, refs, items)):
            base = rel_err(hf_logits(hf_low, p, args.device, dtype), r)
            report.check(f"request {i} ours/HF-{args.dtype} error vs HF fp32", rel_err(o, r) / base, 1.5, ".3f")
    report.finish()


if __name__ == "__main__":
    main()
