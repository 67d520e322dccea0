"""Token generation driver (`epd-generate`): image(s) + prompt -> streamed text, then TTFT and tokens/s.

    epd-generate --model DIR --image cat.png --prompt "What is in the picture?"

Without <image> tags in the prompt, one per image is put first; with a chat template in the
checkpoint it is applied, otherwise LLaVA-1.5's "USER: <image>\\n... ASSISTANT:". Bad input exits
with status 2 and one line naming the field; Ctrl-C with 130.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from engine.cli import ArgumentParser, add_log_level, check_device, dtype_arg, run_main, setup_logging


def build_parser(model_help: str = "HF checkpoint directory (required)") -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--model", help=model_help)
    p.add_argument("--prompt", default="What is shown in this image?", help="user text; <image> marks each image")
    p.add_argument("--image", action="append", default=[], help="image path or data: URL (repeatable)")
    p.add_argument("--raw-prompt", action="store_true", help="use the prompt as is: no chat template")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]; 1 = off")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens; 0 = off")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: one drawn per request)")
    p.add_argument("--stop", action="append", default=[], help="stop string, cut from the output (repeatable)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "cuda"],
                   help="ops backend: torch (reference, any device), cuda (our kernels), auto (cuda where it runs)")
    p.add_argument("--dtype", default="auto", type=dtype_arg,
                   help="auto (the checkpoint's), float32, bfloat16 or float16")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when present)")
    p.add_argument("--deterministic", action="store_true",
                   help="batch-invariant ops: the output does not depend on what else is batched (slower)")
    p.add_argument("--json", action="store_true",
                   help='print one JSON object {"text", "token_ids", "finish_reason", "ttft_s", "tokens_per_s"}')
    add_log_level(p, default="WARNING")
    return p


def main(argv: list[str] | None = None, default_model: Callable[[], Path] | None = None) -> int:
    """default_model: what to use without --model (the checkout's drivers pass the tiny LLaVA)."""
    from engine.cli import CLIError

    parser = build_parser() if default_model is None else build_parser(
        "HF checkpoint directory (default: the tiny random LLaVA from scripts/make_tiny_model.py)")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    from engine import LLM, Request, SamplingParams

    # Everything cheap is checked before the model loads.
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))
    check_device(args.device, args.backend)
    for i, image in enumerate(args.image):
        if not image.startswith("data:") and not Path(image).is_file():
            raise CLIError(f"--image {image!r} (image {i}): file not found")
    if args.model:
        model = Path(args.model)
    elif default_model is not None:
        model = default_model()
    else:
        raise CLIError("--model is required (an HF checkpoint directory)")
    llm = LLM(model, backend=args.backend, dtype=args.dtype, device=args.device, deterministic=args.deterministic)
    request = Request(prompt=args.prompt, images=args.image, raw_prompt=args.raw_prompt)
    output = None
    for event in llm.stream(request, sampling):
        if not args.json:
            print(event.text_delta, end="", flush=True)
        output = event.output or output
    assert output is not None  # stream ends with the finished output
    if args.json:
        print(json.dumps({"text": output.text, "token_ids": output.token_ids, "finish_reason": output.finish_reason,
                          "ttft_s": output.ttft_s, "tokens_per_s": output.tokens_per_s}))
    else:
        print(f"\n[{len(output.token_ids)} tokens, finish: {output.finish_reason}, TTFT {output.ttft_s * 1e3:.1f} ms, "
              f"{output.tokens_per_s:.1f} tokens/s, backend {llm.runner.backend}, {llm.device}]")
    return 0


def console_main() -> None:
    """The `epd-generate` entry point."""
    sys.exit(run_main(main))
