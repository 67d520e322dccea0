"""Token generation driver: image(s) + prompt -> streamed text, then TTFT and tokens/s.

    python scripts/generate.py --image cat.png --prompt "What is in the picture?"

Without --model it uses the tiny LLaVA made locally by scripts/make_tiny_model.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF checkpoint dir (default: the tiny LLaVA, made on first use)")
    p.add_argument("--prompt", default="What is shown in this image?")
    p.add_argument("--image", action="append", default=[], help="image path or data: URL (repeatable)")
    p.add_argument("--raw-prompt", action="store_true", help="use the prompt as is: no chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "cuda"])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when present)")
    p.add_argument("--json", action="store_true", help='print {"text", "token_ids", "ttft_s", "tokens_per_s"}')
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from engine import LLM, Request, SamplingParams
    from engine.config import ConfigError
    from engine.images import ImageError
    from engine.loader import LoadError
    from engine.sampling import RequestError

    try:
        if args.model:
            model = Path(args.model)
        else:
            from scripts.make_tiny_model import ensure_tiny_llava

            model = ensure_tiny_llava()
        sampling = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            stop=tuple(args.stop),
        )
        llm = LLM(model, backend=args.backend, dtype=args.dtype, device=args.device)
        request = Request(prompt=args.prompt, images=args.image, raw_prompt=args.raw_prompt)
        output = None
        for event in llm.stream(request, sampling):
            if not args.json:
                print(event.text_delta, end="", flush=True)
            output = event.output or output
    except (ConfigError, LoadError, ImageError, RequestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    assert output is not None
    if args.json:
        print(json.dumps({"text": output.text, "token_ids": output.token_ids, "ttft_s": output.ttft_s,
                          "tokens_per_s": output.tokens_per_s}))
    else:
        print(f"\n[{len(output.token_ids)} tokens, finish: {output.finish_reason}, TTFT {output.ttft_s * 1e3:.1f} ms, "
              f"{output.tokens_per_s:.1f} tokens/s, backend {llm.runner.backend}, {llm.device}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
