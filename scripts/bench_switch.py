"""Role switches and shared weights on one GPU (issue 14), in one run:

1. memory: per stage process, the GPU memory it allocated and whether its weights are its own or
   mapped from another stage on the GPU (CUDA IPC); the GPU's used memory against the sum the
   stages would hold with a copy each;
2. switches under load: encode1 -> prefill (the LM mapped from prefill0), then prefill1 -> decode
   (mapped too), each timed (drain, then build until ready) while requests run; the same
   requests, one at a time, give the same tokens before and after.

    python scripts/bench_switch.py --model /tmp/llava-7b
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine import SamplingParams  # noqa: E402
from engine.epd import EPDEngine  # noqa: E402
from scripts.bench_epd import requests  # noqa: E402


def memory_table(epd: EPDEngine) -> None:
    print("| stage | weights | bytes | shared | GPU allocated GB |")
    print("|---|---|---|---|---|")
    for name, s in epd.status()["stages"].items():
        if "moved_to" in s:
            continue
        w = s.get("weights", {})
        print(f"| {name} | {w.get('parts')} | {w.get('bytes', 0) / 1e9:.2f} GB | {w.get('shared')} | "
              f"{s.get('gpu_allocated_gb', 0):.2f} |")
    own = sum(s["weights"]["bytes"] for s in epd.status()["stages"].values()
              if "moved_to" not in s and not s["weights"]["shared"])
    mapped = sum(s["weights"]["bytes"] for s in epd.status()["stages"].values()
                 if "moved_to" not in s and s["weights"]["shared"])
    used = ""
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        used = f"GPU used {(total - free) / 1e9:.1f} GB of {total / 1e9:.0f}; "
    print(f"{used}weights held once: {own / 1e9:.2f} GB, mapped (a copy each would add): {mapped / 1e9:.2f} GB",
          flush=True)


def main(argv: list[str] | None = None) -> None:
    from engine.cli import ArgumentParser, positive_int

    p = ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, help="LLaVA checkpoint dir")
    p.add_argument("--placement", default="E:0,0 P:0,0 D:0", help="stages on GPU 0")
    p.add_argument("--requests", type=int, default=16, help="requests in flight during each switch")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    p.add_argument("--kv-cache-tokens", type=int, default=32768, help="per KV owner")
    p.add_argument("--backend", default="cuda", choices=["cuda", "torch"],
                   help='torch: a CPU smoke run (--placement "E:cpu,cpu P:cpu,cpu D:cpu")')
    args = p.parse_args(argv)
    for flag in ("requests", "max_tokens", "kv_cache_tokens"):
        positive_int(f"--{flag.replace('_', '-')}", getattr(args, flag))
    sp = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    check = requests(3, 1, (640, 480), "jpeg", seed=5)
    load = requests(args.requests, 1, (640, 480), "jpeg", seed=6)
    device = "cuda:0" if args.backend == "cuda" else "cpu"
    with EPDEngine(args.model, placement=args.placement, share_kv_arena=False, backend=args.backend, device=device,
                   dtype="bfloat16" if args.backend == "cuda" else "float32", kv_cache_tokens=args.kv_cache_tokens,
                   progress=False) as epd:
        epd.generate(requests(2, 1, (640, 480), "jpeg", seed=7), sp)  # warm-up
        before = [epd.generate([r], sp)[0].token_ids for r in check]
        memory_table(epd)
        for kind, index, new_kind in (("encode", 1, "prefill"), ("prefill", 1, "decode")):
            seqs = [epd.add_request(r, sp) for r in load]
            t0 = time.perf_counter()
            record = epd.switch_role(kind, index, new_kind)
            done, deadline = set(), time.monotonic() + 600
            while len(done) < len(seqs) and time.monotonic() < deadline:
                done |= {ev.index for ev in epd.step(timeout_s=0.05) if ev.output is not None or ev.error}
            print(f"switch {record['from']} -> {record['to']} under {len(seqs)} requests: drain "
                  f"{record['drain_s']:.2f} s, total {record['seconds']:.2f} s "
                  f"(call {time.perf_counter() - t0:.2f} s); "
                  f"{len(done)}/{len(seqs)} requests ended", flush=True)
        memory_table(epd)
        after = [epd.generate([r], sp)[0].token_ids for r in check]
    same = sum(a == b for a, b in zip(before, after))
    print(f"one at a time: {same}/{len(check)} requests token-for-token equal before and after the switches")
    sys.exit(0 if same == len(check) else 1)


if __name__ == "__main__":
    from engine.cli import run_main

    sys.exit(run_main(main))
