"""Serving benchmark: an OpenAI-API load generator (TTFT, TPOT, ITL, E2EL as `vllm bench serve`).

    python scripts/bench_serve.py --base-url http://127.0.0.1:8000 --rates 1,2,4,inf --num-requests 100 \\
        --workload epd-synthetic --images-per-request 2 --image-size 336x336 \\
        --records runs/epd.jsonl --out runs/epd.json --label epd

It speaks only the OpenAI HTTP API (POST /v1/chat/completions or /v1/completions, streamed SSE with
stream_options.include_usage; GET /v1/models), so the same command drives our server, vLLM or SGLang.
Requests arrive by a seeded gamma process (shape --burstiness, mean 1/rate; 1.0 = Poisson; inf = all
at once); --phases runs a multi-phase workload instead, as one run (engine/simulator/workload.py:
phases back to back, each with its rate, images per request, image size, prompt and output length;
each record has its phase index, the summary one entry per phase and one over all). Per request:
TTFT = first content chunk - send; E2EL = last chunk - send; ITL = gaps between content chunks;
TPOT = (E2EL - TTFT) / (output tokens - 1), for requests of > 1 token.
Output tokens come from the usage chunk when the server sends one, else the content chunks counted.
A request meets the SLO when it succeeded, TTFT < --slo-ttft and (if it has a TPOT) TPOT < --slo-tpot.
Goodput: the highest rate whose SLO attainment is >= --attainment-target; also reported, the highest
rate whose P99 TTFT and P99 TPOT are under the SLOs. Our server's optional `epd_metrics` field
(server-side phase timings) is kept in the records when present.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.cli import ArgumentParser, CLIError, positive_int, run_main  # noqa: E402
from engine.simulator.metrics import (  # noqa: E402, F401 -- defined there (one rule with the simulator)
    METRICS,
    PERCENTILES,
    attainment,
    goodput_by_attainment,
    goodput_by_p99,
    meets_slo,
    offered_rate,
    percentile,
    stats_ms,
    summarize_phases,
    summarize_rate,
    tpot_of,
)
from engine.simulator.workload import (  # noqa: E402
    Phase,
    arrival_offsets,
    parse_phases,
    phase_arrivals,
    phase_dict,
)

WORKLOADS = ("epd-synthetic", "mixed", "long-output")
OUTPUT_TOKENS = {"epd-synthetic": 10, "mixed": 32, "long-output": 256}
PROMPT_WORDS = 22  # the EPD paper's synthetic prompt: 22 tokens (one common word is ~one Llama token)
WORDS = ("the", "a", "image", "picture", "photo", "describe", "what", "is", "in", "this", "please", "tell", "me",
         "about", "scene", "color", "shape", "object", "left", "right", "top", "bottom", "one", "two", "small",
         "large", "many", "how", "where", "show", "see", "look", "and", "of", "on", "with")


# ---------------------------------------------------------------- output helpers


def strict_json(obj):
    """obj with inf / -inf as the strings "inf" / "-inf" and NaN as None, so json.dumps writes strict
    JSON (jq, JavaScript) rather than Python's Infinity; readers take a rate back with float()."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def parse_rates(text: str) -> list[float]:
    """"1,2,4,inf" -> [1.0, 2.0, 4.0, inf]: positive numbers, or inf (all at once)."""
    rates = []
    for part in text.split(","):
        try:
            rate = float(part)
        except ValueError:
            raise CLIError(f"--rates {text!r}: expected comma-separated numbers or inf, e.g. 1,2,4,inf") from None
        if not rate > 0 or math.isnan(rate):
            raise CLIError(f"--rates {text!r}: {part} must be > 0 (or inf)")
        rates.append(rate)
    return rates


def parse_size(text: str) -> tuple[int, int]:
    """"336x336" -> (336, 336): width x height, each in [1, 8192]."""
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise CLIError(f"--image-size {text!r}: expected WxH, e.g. 336x336 or 1920x1080") from None
    positive_int("--image-size width", w, 8192)
    positive_int("--image-size height", h, 8192)
    return w, h


# ---------------------------------------------------------------- workloads


@dataclass
class RequestSpec:
    id: int
    prompt: str
    images: list[str] = field(default_factory=list)  # data URLs
    max_tokens: int = 10
    phase: int | None = None  # its phase's index in a --phases workload


def make_jpeg(width: int, height: int, seed: int | list[int], quality: int = 85) -> bytes:
    """A noise-ish JPEG of width x height: coarse random colour blocks, smoothed, plus fine noise
    (not pure noise, so a 1920x1080 image is ~300 KB, as a photo, not megabytes). Seeded."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(max(1, height // 32), max(1, width // 32), 3), dtype=np.uint8)
    img = Image.fromarray(coarse, "RGB").resize((width, height), Image.BILINEAR)
    pixels = np.asarray(img, dtype=np.int16) + rng.integers(-6, 7, size=(height, width, 3), dtype=np.int16)
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def data_url(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def make_prompt(n_words: int, seed: int | list[int]) -> str:
    import numpy as np

    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), size=n_words))


def make_workload(name: str, n: int, seed: int = 0, images_per_request: int = 1,
                  image_size: tuple[int, int] = (336, 336), max_tokens: int | None = None) -> list[RequestSpec]:
    """n requests of a preset, all seeded (same seed -> same prompts and images):
    epd-synthetic: a 22-word prompt, images_per_request images, 10 output tokens (the EPD paper's);
    mixed: as epd-synthetic but half the requests (a seeded half) are text-only, 32 output tokens;
    long-output: as epd-synthetic with 256 output tokens. max_tokens overrides the output length."""
    import numpy as np

    if name not in WORKLOADS:
        raise CLIError(f"--workload {name!r}: expected one of {', '.join(WORKLOADS)}")
    out_tokens = max_tokens if max_tokens is not None else OUTPUT_TOKENS[name]
    text_only: set[int] = set()
    if name == "mixed":
        text_only = set(np.random.default_rng(seed & 0xFFFFFFFF).permutation(n)[: n // 2].tolist())
    return [make_spec(i, seed, 0 if i in text_only else images_per_request, image_size, PROMPT_WORDS, out_tokens)
            for i in range(n)]


def make_spec(i: int, seed: int, images: int, image_size: tuple[int, int], prompt_words: int, max_tokens: int,
              phase: int | None = None) -> RequestSpec:
    """Request i of a seeded workload: a prompt of prompt_words words and `images` JPEGs, all made
    from (seed, i), so equal seeds give equal requests."""
    s, (w, h) = seed & 0xFFFFFFFF, image_size
    return RequestSpec(id=i, prompt=make_prompt(prompt_words, [s, i]), max_tokens=max_tokens, phase=phase,
                       images=[data_url(make_jpeg(w, h, seed=[s, i, j])) for j in range(images)])


def make_phase_workload(phases: list[Phase], seed: int = 0) -> list[RequestSpec]:
    """The requests of a --phases workload in send order (ids 0.. across the phases), each shaped by
    its phase: images per request, image size, max_tokens, a prompt of prompt_tokens words."""
    specs: list[RequestSpec] = []
    for k, phase in enumerate(phases):
        specs += [make_spec(len(specs) + i, seed, phase.images, phase.image_size, phase.prompt_tokens,
                            phase.max_tokens, phase=k) for i in range(phase.requests)]
    return specs


def request_body(spec: RequestSpec, endpoint: str, model: str, ignore_eos: bool = False) -> dict:
    """The streamed OpenAI request for a spec: chat (text part + image_url parts) or completions."""
    body: dict = {"model": model, "max_tokens": spec.max_tokens, "temperature": 0.0, "stream": True,
                  "stream_options": {"include_usage": True}}
    if endpoint == "chat":
        if spec.images:
            content: str | list = [{"type": "text", "text": spec.prompt}]
            content += [{"type": "image_url", "image_url": {"url": url}} for url in spec.images]
        else:
            content = spec.prompt
        body["messages"] = [{"role": "user", "content": content}]
    else:
        if spec.images:
            raise CLIError("--endpoint completions takes no images; use --endpoint chat or --images-per-request 0")
        body["prompt"] = spec.prompt
    if ignore_eos:
        body["ignore_eos"] = True  # vLLM / SGLang / ours; a strict OpenAI server may refuse it
    return body


# ---------------------------------------------------------------- SSE


DONE = "[DONE]"


def parse_sse_line(line: str) -> dict | str | None:
    """One SSE line: its JSON payload for `data: {...}`, DONE for `data: [DONE]`, None for anything
    else (blank lines, comments, event:/id: fields). Bad JSON raises ValueError."""
    line = line.strip()
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    if payload == DONE:
        return DONE
    if not payload:
        return None
    return json.loads(payload)


@dataclass
class ChunkInfo:
    text: str = ""  # content delta (chat) or text (completions)
    finish_reason: str | None = None
    usage: dict | None = None
    epd_metrics: dict | None = None
    error: str | None = None


def chunk_info(chunk: dict) -> ChunkInfo:
    """What a streamed chunk carries (chat.completion.chunk or text_completion)."""
    info = ChunkInfo(usage=chunk.get("usage") or None, epd_metrics=chunk.get("epd_metrics"))
    if "error" in chunk:
        err = chunk["error"]
        info.error = err.get("message", str(err)) if isinstance(err, dict) else str(err)
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta")
        text = (delta or {}).get("content") if delta is not None else choice.get("text")
        info.text += text or ""
        info.finish_reason = choice.get("finish_reason") or info.finish_reason
        info.epd_metrics = info.epd_metrics or choice.get("epd_metrics")
    return info


class StreamState:
    """Accumulates one streamed response: arrival times of content chunks, usage, epd_metrics."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.token_times: list[float] = []  # perf_counter of each chunk with content
        self.text = ""
        self.usage: dict | None = None
        self.epd_metrics: dict | None = None
        self.finish_reason: str | None = None
        self.done = False
        self.error: str | None = None

    def feed(self, line: str, now: float) -> None:
        event = parse_sse_line(line)
        if event is None:
            return
        if event == DONE:
            self.done = True
            return
        info = chunk_info(event)  # type: ignore[arg-type]
        if info.text:
            self.token_times.append(now)
            self.text += info.text
        self.usage = info.usage or self.usage
        self.epd_metrics = info.epd_metrics or self.epd_metrics
        self.finish_reason = info.finish_reason or self.finish_reason
        self.error = info.error or self.error

    def record(self) -> dict:
        """The timing fields of a request record (seconds)."""
        times = self.token_times
        ttft = times[0] - self.start if times else None
        e2el = times[-1] - self.start if times else None
        usage = self.usage or {}
        output_tokens = usage.get("completion_tokens") or len(times)
        return {
            "ttft_s": ttft,
            "e2el_s": e2el,
            "itls_s": [b - a for a, b in zip(times, times[1:])],
            "tpot_s": tpot_of(e2el, ttft, output_tokens),
            "output_tokens": output_tokens,
            "prompt_tokens": usage.get("prompt_tokens"),
            "finish_reason": self.finish_reason,
            "epd_metrics": self.epd_metrics,
        }


# ---------------------------------------------------------------- the client


class Progress:
    """tqdm when installed, else one rewritten stderr line; nothing when disabled."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.total, self.desc, self.n, self.bar = total, desc, 0, None
        self.enabled = enabled
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False)
            except ImportError:
                pass

    def update(self) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.enabled:
            print(f"\r{self.desc}: {self.n}/{self.total}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)


def _httpx():
    try:
        import httpx
    except ImportError:
        raise CLIError("bench_serve.py needs httpx (pip install httpx)") from None
    return httpx


def _headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def first_model(client, base_url: str, api_key: str | None, timeout: float) -> str:
    """The first model id of GET /v1/models."""
    try:
        resp = await asyncio.wait_for(client.get(f"{base_url}/v1/models", headers=_headers(api_key)), timeout)
        resp.raise_for_status()
        return resp.json()["data"][0]["id"]
    except Exception as e:
        raise CLIError(f"--model not given and GET {base_url}/v1/models failed ({type(e).__name__}: {e}); "
                       "pass --model") from None


async def send_one(client, url: str, body: bytes, headers: dict, timeout: float) -> dict:
    """One streamed request; its record (timings, tokens, success / error). Never raises for a server or
    network fault, nor waits longer than `timeout` in all."""
    start = time.perf_counter()
    state = StreamState(start)

    async def stream() -> None:
        async with client.stream("POST", url, content=body, headers=headers) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode("utf-8", "replace")
                raise RuntimeError(f"HTTP {resp.status_code}: {' '.join(text.split())[:300]}")
            async for line in resp.aiter_lines():
                state.feed(line, time.perf_counter())
                if state.done:
                    break

    error = None
    try:
        await asyncio.wait_for(stream(), timeout)
    except asyncio.TimeoutError:
        error = f"timed out after {timeout:g} s"
    except Exception as e:  # noqa: BLE001 -- a failed request is a record, not a crash
        error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    rec = state.record()
    error = error or state.error
    if error is None and not state.token_times:
        error = "no output tokens"
    rec.update(success=error is None, error=error)
    return rec


@dataclass
class Prepared:
    """A request ready to send: its body already JSON-encoded (a 1920x1080 image is ~400 KB of base64;
    encoding it at send time would stall the event loop and skew the other requests' timings)."""
    id: int
    images: int
    max_tokens: int
    body: bytes
    phase: int | None = None


def prepare(specs: list[RequestSpec], endpoint: str, model: str, ignore_eos: bool = False) -> list[Prepared]:
    return [Prepared(s.id, len(s.images), s.max_tokens, json.dumps(request_body(s, endpoint, model, ignore_eos))
                     .encode(), s.phase) for s in specs]


async def run_rate(base_url: str, endpoint: str, requests: list[Prepared], rate: float, *,
                   burstiness: float, seed: int, api_key: str | None, max_concurrency: int | None,
                   timeout: float, progress: bool, offsets: list[float] | None = None) -> tuple[list[dict], float]:
    """Send the requests at `rate` (seeded arrivals; or at the given offsets, s from the start); their
    records and the wall time from the first send to the last reply."""
    httpx = _httpx()
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    url = base_url + path
    headers = {**_headers(api_key), "Content-Type": "application/json"}
    offsets = offsets if offsets is not None else arrival_offsets(len(requests), rate, burstiness, seed)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = Progress(len(requests), f"rate {rate:g}", progress)
    limits = httpx.Limits(max_connections=max_concurrency or len(requests) or 1, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits) as client:
        t0 = time.perf_counter()

        async def one(req: Prepared, offset: float) -> dict:
            await asyncio.sleep(max(0.0, t0 + offset - time.perf_counter()))
            if sem is not None:
                async with sem:
                    sent = time.perf_counter() - t0
                    rec = await send_one(client, url, req.body, headers, timeout)
            else:
                sent = time.perf_counter() - t0
                rec = await send_one(client, url, req.body, headers, timeout)
            bar.update()
            return {"rate": rate, "request_id": req.id, "phase": req.phase, "scheduled_s": offset, "start_s": sent,
                    "images": req.images, "max_tokens": req.max_tokens, **rec}

        try:
            records = await asyncio.gather(*(one(r, o) for r, o in zip(requests, offsets)))
        finally:
            bar.close()
        duration = time.perf_counter() - t0
    return list(records), duration


# ---------------------------------------------------------------- output


def format_table(summary: dict) -> str:
    """One rate's printed table (vLLM's layout, abridged)."""
    s = summary
    phase = "" if s.get("phase") is None else f"phase {s['phase']}, "
    rows = [f"{'=' * 20} {phase}rate {s['rate']:g} req/s {'=' * 20}",
            f"{'completed / failed:':<34}{s['completed']} / {s['failed']}",
            f"{'duration (s):':<34}{s['duration_s']:.2f}",
            f"{'request throughput (req/s):':<34}{s['request_throughput']:.2f}",
            f"{'output token throughput (tok/s):':<34}{s['output_throughput']:.2f}",
            f"{'SLO attainment:':<34}{s['attainment'] * 100:.1f}%",
            f"{'good request throughput (req/s):':<34}{s['good_request_throughput']:.2f}",
            f"{'(ms)':<10}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}"]
    for name in METRICS:
        st = s[f"{name}_ms"]
        cells = "".join(f"{'-' if st[k] is None else format(st[k], '.2f'):>10}" for k in ("mean", "p50", "p90", "p99"))
        rows.append(f"{name.upper():<10}{cells}")
    for err in s["errors"][:3]:
        rows.append(f"error: {err}")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (no /v1)")
    p.add_argument("--model", help="model name to send (default: the first of GET /v1/models)")
    p.add_argument("--api-key", help="bearer token (default: $OPENAI_API_KEY; none when unset)")
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat",
                   help="/v1/chat/completions (images as image_url parts) or /v1/completions (text only)")
    p.add_argument("--rates", help="request rates (req/s) to run in turn; inf = all at once (default: 1,2,4)")
    p.add_argument("--num-requests", type=int, default=50, help="requests per rate")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the inter-arrival times (1 = Poisson; < 1 burstier)")
    p.add_argument("--seed", type=int, default=0, help="seeds the arrivals, prompts and images (rate i: seed + i)")
    p.add_argument("--same-images", action="store_true",
                   help="send rate 0's requests at every rate (a server's image cache then answers rates 1..)")
    p.add_argument("--workload", choices=WORKLOADS, default="epd-synthetic",
                   help="epd-synthetic: 22-token prompt + images, 10 output tokens; mixed: half text-only, "
                        "32 output tokens; long-output: 256 output tokens")
    p.add_argument("--images-per-request", type=int, default=1, help="images in each request with images")
    p.add_argument("--image-size", default="336x336", help="image resolution WxH, e.g. 336x336 or 1920x1080")
    p.add_argument("--max-tokens", type=int, help="output tokens per request (default: the workload's)")
    p.add_argument("--phases", help="one run of phases back to back instead of --rates, e.g. "
                   '"requests=100,rate=8,images=2,size=1920x1080,max_tokens=10;requests=100,rate=8,images=0,'
                   'max_tokens=128" (keys: requests, rate, images, size, prompt_tokens, max_tokens, burstiness); '
                   "the phases' shapes replace --workload, --num-requests, --images-per-request, --image-size, "
                   "--max-tokens")
    p.add_argument("--ignore-eos", action="store_true",
                   help='send "ignore_eos": true, so every request makes max_tokens (vLLM, SGLang, ours)')
    p.add_argument("--max-concurrency", type=int, help="requests in flight at most (default: unbounded)")
    p.add_argument("--warmup-requests", type=int, default=1,
                   help="requests sent one by one before the first rate, not recorded; the first must succeed")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds one request may take in all")
    p.add_argument("--slo-ttft", type=float, default=1.4, help="TTFT SLO in seconds")
    p.add_argument("--slo-tpot", type=float, default=0.04, help="TPOT SLO in seconds")
    p.add_argument("--attainment-target", type=float, default=0.9,
                   help="goodput: the highest rate whose SLO attainment is at least this")
    p.add_argument("--label", help="name of this run in the summary and plots (e.g. the mode; default: the model)")
    p.add_argument("--records", help="write one JSON line per request here")
    p.add_argument("--out", help="write the summary JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def check_args(args: argparse.Namespace) -> None:
    positive_int("--num-requests", args.num_requests)
    positive_int("--max-tokens", args.max_tokens)
    positive_int("--max-concurrency", args.max_concurrency)
    if args.warmup_requests < 0:
        raise CLIError(f"--warmup-requests = {args.warmup_requests}; must be >= 0")
    if args.images_per_request < 0:
        raise CLIError(f"--images-per-request = {args.images_per_request}; must be >= 0")
    for flag in ("burstiness", "request_timeout", "slo_ttft", "slo_tpot"):
        value = getattr(args, flag)
        if not value > 0 or math.isinf(value):
            raise CLIError(f"--{flag.replace('_', '-')} = {value}; must be a positive number")
    if not 0 < args.attainment_target <= 1:
        raise CLIError(f"--attainment-target = {args.attainment_target}; must be in (0, 1]")
    if not args.base_url.startswith(("http://", "https://")):
        raise CLIError(f"--base-url {args.base_url!r}: expected http://HOST:PORT")


def result_of(args: argparse.Namespace, base_url: str, model: str, label: str, per_rate: list[dict],
              phases: list[Phase] | None = None, overall: dict | None = None) -> dict:
    """The summary JSON: the run's settings, one summary per rate done so far (with --phases: per
    phase, and `overall` over all of them), both goodputs."""
    w, h = parse_size(args.image_size)
    return {
        "label": label, "base_url": base_url, "model": model, "endpoint": args.endpoint,
        "workload": args.workload, "images_per_request": args.images_per_request, "image_size": [w, h],
        "num_requests": args.num_requests, "burstiness": args.burstiness, "seed": args.seed,
        "max_concurrency": args.max_concurrency, "ignore_eos": args.ignore_eos, "max_tokens": args.max_tokens,
        "slo": {"ttft_s": args.slo_ttft, "tpot_s": args.slo_tpot, "attainment_target": args.attainment_target},
        "records_file": str(Path(args.records).resolve()) if args.records else None,
        "phases": [phase_dict(p) for p in phases] if phases else None,
        "rates": per_rate,
        "overall": overall,
        "goodput": {"by_attainment": goodput_by_attainment(per_rate, args.attainment_target),
                    "by_p99": goodput_by_p99(per_rate, args.slo_ttft, args.slo_tpot)},
    }


def write_summary(path: str, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(strict_json(result), indent=2, allow_nan=False) + "\n")
    tmp.replace(path)


async def warm_up(base_url: str, endpoint: str, requests: list[Prepared], n: int, api_key: str | None,
                  timeout: float) -> None:
    """n requests one after another, not recorded; CLIError if the first fails (a wrong model name, an
    endpoint the server lacks, no server): one clear line instead of a run of failed records."""
    if n == 0 or not requests:
        return
    httpx = _httpx()
    url = base_url + ("/v1/chat/completions" if endpoint == "chat" else "/v1/completions")
    headers = {**_headers(api_key), "Content-Type": "application/json"}
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout)) as client:
        for i in range(n):
            rec = await send_one(client, url, requests[i % len(requests)].body, headers, timeout)
            if i == 0 and not rec["success"]:
                raise CLIError(f"the warm-up request to {url} failed: {rec['error']} "
                               "(--warmup-requests 0 to skip the check)")


async def _run(args: argparse.Namespace, rates: list[float], specs: list[RequestSpec],
               phases: list[Phase] | None = None, remake=None) -> dict:
    """Every rate in turn (or, with phases, the one multi-phase run); the summary. remake(i):
    rate i's requests (fresh images: a server's image cache must not answer rate i from the
    images of rate 0); None: the same requests at every rate."""
    httpx = _httpx()
    base_url = args.base_url.rstrip("/")
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    model = args.model
    if model is None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(args.request_timeout)) as client:
            model = await first_model(client, base_url, api_key, args.request_timeout)
    requests = prepare(specs, args.endpoint, model, args.ignore_eos)
    specs.clear()  # the images live on only in the encoded bodies
    label = args.label or model
    await warm_up(base_url, args.endpoint, requests, args.warmup_requests, api_key, args.request_timeout)
    per_rate: list[dict] = []
    overall = None
    if phases:  # one run: each request at its phase's send time, its rate that of its phase
        offsets = [t for t, _ in phase_arrivals(phases, args.seed)]
        runs = [(offered_rate(offsets), offsets)]
    else:
        runs = [(rate, None) for rate in rates]
    if args.records:
        Path(args.records).parent.mkdir(parents=True, exist_ok=True)
    records_file = open(args.records, "w") if args.records else None  # noqa: SIM115
    try:
        for i, (rate, offsets) in enumerate(runs):
            if i > 0 and remake is not None:
                requests = prepare(remake(i), args.endpoint, model, args.ignore_eos)
            records, duration = await run_rate(
                base_url, args.endpoint, requests, rate, burstiness=args.burstiness, seed=args.seed + i,
                api_key=api_key, max_concurrency=args.max_concurrency, timeout=args.request_timeout,
                progress=not args.no_progress, offsets=offsets)
            for rec in records:  # a rate listed twice in --rates makes two runs (the simulator tells them apart)
                rec["run"] = i
            if phases:
                for rec in records:
                    rec["rate"] = phases[rec["phase"]].rate
                per_rate, overall = summarize_phases(phases, records, duration, args.slo_ttft, args.slo_tpot)
                summaries = [*per_rate, overall]
            else:
                summaries = [summarize_rate(rate, records, duration, args.slo_ttft, args.slo_tpot)]
                per_rate += summaries
            for summary in summaries:
                print(format_table(summary), flush=True)
            if records_file is not None:
                for rec in records:
                    records_file.write(json.dumps(strict_json({"label": label, **rec}), allow_nan=False) + "\n")
                records_file.flush()
            if args.out:  # after every rate, so an interrupted sweep keeps the rates it finished
                write_summary(args.out, result_of(args, base_url, model, label, per_rate, phases, overall))
    finally:
        if records_file is not None:
            records_file.close()
    result = result_of(args, base_url, model, label, per_rate, phases, overall)
    g = result["goodput"]
    fmt = lambda r: "none" if r is None else f"{r:g} req/s"
    print(f"goodput: {fmt(g['by_attainment'])} (>= {args.attainment_target:.0%} attain TTFT < {args.slo_ttft:g} s "
          f"and TPOT < {args.slo_tpot:g} s); P99 definition: {fmt(g['by_p99'])}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    phases = None
    if args.phases is not None:
        if args.rates is not None:
            raise CLIError("--phases sets each phase's rate; drop --rates")
        try:
            phases = parse_phases(args.phases)
        except ValueError as e:
            raise CLIError(f"--phases: {e}") from None
    rates = parse_rates(args.rates or "1,2,4")
    size = parse_size(args.image_size)
    _httpx()
    if phases:
        specs = make_phase_workload(phases, args.seed)
    else:
        specs = make_workload(args.workload, args.num_requests, args.seed, args.images_per_request, size,
                              args.max_tokens)
    if args.endpoint == "completions" and any(s.images for s in specs):
        raise CLIError("--endpoint completions takes no images; use --endpoint chat or --images-per-request 0")
    remake = None if phases or args.same_images else (
        lambda i: make_workload(args.workload, args.num_requests, args.seed + i, args.images_per_request, size,
                                args.max_tokens))
    result = asyncio.run(_run(args, rates, specs, phases, remake))
    if args.out:
        write_summary(args.out, result)
        print(f"summary: {args.out}", flush=True)
    failed = sum(r["failed"] for r in result["rates"])
    return 0 if failed < sum(r["num_requests"] for r in result["rates"]) else 1


if __name__ == "__main__":
    sys.exit(run_main(main))
