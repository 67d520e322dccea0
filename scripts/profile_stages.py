"""Per-stage cost profile on this device, with the engine's own code: the costs an EPD simulator
is fitted from, written as one JSON file (schema below) and printed as a table per stage.

    python scripts/profile_stages.py --model /tmp/llava-7b --out costs.json
    python scripts/profile_stages.py --model DIR --backend torch --device cpu --dtype float32 --quick

What each entry times (warm-up calls first, then the median of --repeats calls, the device
synchronized before and after each; random token ids, real JPEG bytes, random KV and pixels):
- preprocess {"WxH": [[batch, s]]}: a batch of distinct JPEGs of that size through the encoder's
  image processor (`stage_image_processor`: nvjpeg + our kernels on a GPU with the cuda backend,
  else PIL on image_workers threads), as an encoder's preprocessing job runs it (`item_pixels`
  on a side stream, synchronized); not the read of the bytes from the orchestrator's byte arena.
- tower [[items, s]]: `ModelRunner.encode` of `items` items into the MM arena (vision graphs as
  configured; max_images_per_batch is set to the largest batch so each has its bucket).
- prefill [[tokens, s]]: one `ModelRunner.prefill` call (host tensors, forward, logits at the
  last positions, sampling, read back): batches of --prefill-prompts prompts with one image each
  (embeddings read in place from an encoder's MM arena on this device, as an EPD prefill does),
  and single text-only prompts of --prefill-tokens tokens.
- decode [[batch, context, s]]: one `ModelRunner.decode` step (a graph replay on the cuda
  backend, eager on the torch backend) for `batch` sequences each of `context` tokens, with real
  block tables (scattered blocks) over a KV arena of random data.
- handoff: fixed_s, the median round trip of a DecodeTask through the engine's pipes to a worker
  process (ipc/channel.Inbox -> ipc/worker's loop -> its outbox): the two hops of a hand-off
  (stage -> orchestrator -> stage), without the orchestrator's own work; mm_item_s, copying
  --handoff-items items' embeddings into a prefill's MM arena as PrefillRole does (per item,
  synchronized) divided by the items; kv_token_s, `ipc.migration.pull_blocks` of the blocks of
  --handoff-tokens tokens (scattered ids on both sides, synchronized) divided by their tokens.
  The sources live on --peer-device (default --device: on one GPU EPD reads both in place, so
  these are what a copy would cost).

Schema: {"version": 1, "device", "model", "backend", "dtype", "block_size", "image_tokens",
"preprocess", "tower", "prefill", "decode", "handoff": {"fixed_s", "mm_item_s", "kv_token_s"}}, and
on the CPU "cpu_cores": the cores this process may use (stage processes run one thread each
when they outnumber the cores: the simulator runs that many stage jobs at full speed at once).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.cli import CLIError  # noqa: E402
from engine.config import EngineConfig, ModelConfig  # noqa: E402
from engine.request import Sequence  # noqa: E402
from engine.runner import ModelRunner, kv_block_shape, load_weights, mm_arena_shape  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402
from engine.stage_handles import usable_cores  # noqa: E402

VERSION = 1
BLOCK_SIZE = 16  # the engine's default KV block
PROMPT_TEXT_TOKENS = 24  # text around the image in a prefill prompt by default (576 + 24 = 600 for LLaVA-1.5)
HEADROOM_BYTES = 6 << 30  # GPU memory kept free beside the arenas: activations, graph pools, hand-off sources
# grid flags: (full grid, --quick grid)
GRIDS = {
    "image_sizes": ("336x336,1920x1080", "336x336,1920x1080"),
    "preprocess_batches": ("1,2,4,8,16", "1,4"),
    "tower_batches": ("1,2,4,8,16,32", "1,32"),
    "prefill_prompts": ("1,2,3,4,5,6,7,8", "1,2"),
    "prefill_tokens": ("16,64,256,1024,2048", "16,512"),
    "decode_batches": ("1,2,4,8,16,32,64", "1,4"),
    "decode_contexts": ("256,1024,2048", "64,256"),
    "repeats": (10, 3),
    "warmup": (3, 1),
}


# ----------------------------------------------------------------------------- timing


class Timer:
    """Median seconds of fn() over `repeats` calls after `warmup` calls, the devices
    synchronized before and after each timed call."""

    def __init__(self, devices: list[torch.device], repeats: int, warmup: int) -> None:
        self.devices = [d for d in devices if d.type == "cuda"]
        self.repeats, self.warmup = repeats, warmup

    def sync(self) -> None:
        for d in self.devices:
            torch.cuda.synchronize(d)

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.repeats):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def random_ids(n: int, cfg: ModelConfig, g: torch.Generator) -> list[int]:
    """n random text token ids (never the image token)."""
    ids = torch.randint(4, cfg.text.vocab_size, (n,), generator=g)
    if cfg.image_token_id is not None:
        ids[ids == cfg.image_token_id] = 4
    return ids.tolist()


# ----------------------------------------------------------------------------- stages


def profile_preprocess(config: EngineConfig, cfg: ModelConfig, sizes: list[tuple[str, tuple[int, int]]],
                       batches: list[int], timer: Timer) -> tuple[dict[str, list[list[float]]], str]:
    """{size: [[batch, seconds]]} of the encoder's preprocessing, and which path ran."""
    from engine.images_anyres import all_items
    from engine.mm_cache import item_pixels
    from engine.preprocess import on_side_stream, stage_image_processor
    from scripts.bench_epd import requests

    processor = stage_image_processor(config, cfg)  # what an encoder on this device builds
    device = torch.device(config.device)
    stream = torch.cuda.Stream(device) if getattr(processor, "device", device).type == "cuda" else None
    inner = getattr(processor, "images", processor)  # LLaVA-NeXT's GPU path wraps the CLIP one
    path = type(processor).__name__ + (" (nvjpeg)" if getattr(inner, "nvjpeg", False) else "")
    out: dict[str, list[list[float]]] = {}
    try:
        for seed, (text, (w, h)) in enumerate(sizes):
            images = [r.images[0] for r in requests(max(batches), 1, (w, h), "jpeg", seed=seed)]
            for n in batches:
                batch, hw = images[:n], [(h, w)] * n
                items = all_items(cfg, hw)

                def run(batch: list = batch, hw: list = hw, items: list = items) -> torch.Tensor:
                    with on_side_stream(stream):
                        return item_pixels(processor, cfg, None, batch, items, hw, [])

                out.setdefault(text, []).append([n, timer(run)])
    finally:
        close = getattr(processor, "close", None) or getattr(inner, "close", None)
        if close is not None:
            close()  # its thread pool
    return out, path


def profile_tower(runner: ModelRunner, cfg: ModelConfig, batches: list[int], timer: Timer) -> list[list[float]]:
    """[[items, seconds]] of ModelRunner.encode into the MM arena (an encoder's tower step)."""
    size = cfg.vision.image_size
    g = torch.Generator().manual_seed(1)
    out = []
    for n in batches:
        pixels = torch.randn(n, 3, size, size, generator=g).clamp_(-2, 2).to(runner.device, runner.dtype)
        seq = Sequence(seq_id=-1, prompt_ids=[], sampling=SamplingParams(), seed=0, stop_token_ids=frozenset(),
                       pixel_values=pixels, mm_blocks=list(range(n)))
        out.append([n, timer(lambda seq=seq: runner.encode([seq]))])
    return out


def image_prompt(cfg: ModelConfig, tokens: int, g: torch.Generator) -> tuple[list[int], tuple[int, int], int]:
    """(prompt ids of `tokens` tokens with one image of the tower's size, its size, its items)."""
    size = cfg.vision.image_size
    layout = cfg.image_layout(size, size)
    text = tokens - len(layout.rows)
    head = min(8, text)
    ids = random_ids(text, cfg, g)
    return ids[:head] + [cfg.image_token_id] * len(layout.rows) + ids[head:], (size, size), layout.num_items


def profile_prefill(runner: ModelRunner, cfg: ModelConfig, prompts: list[int], prompt_tokens: int,
                    text_tokens: list[int], timer: Timer) -> list[tuple[int, int, int, float]]:
    """(prompts, tokens, images, seconds) per prefill call: image batches, then text-only prompts."""
    g = torch.Generator().manual_seed(2)
    bs = runner.block_size
    cases: list[list[Sequence]] = []
    for n in prompts:
        seqs, block, item = [], 0, 0
        for i in range(n):
            ids, hw, items = image_prompt(cfg, prompt_tokens, g)
            nb = blocks_for(prompt_tokens, bs)
            seq = Sequence(seq_id=i, prompt_ids=ids, sampling=SamplingParams(), seed=i, stop_token_ids=frozenset(),
                           image_sizes=[hw], block_table=list(range(block, block + nb)),
                           mm_peer_blocks=[(0, b) for b in range(item, item + items)])  # the encoder's arena, in place
            block, item = block + nb, item + items
            seqs.append(seq)
        cases.append(seqs)
    for t in text_tokens:
        cases.append([Sequence(seq_id=0, prompt_ids=random_ids(t, cfg, g), sampling=SamplingParams(), seed=0,
                               stop_token_ids=frozenset(), block_table=list(range(blocks_for(t, bs))))])
    out = []
    for seqs in cases:
        def run(seqs: list[Sequence] = seqs) -> None:
            for s in seqs:
                s.num_cached = 0  # the whole prompt again
            runner.prefill(seqs)

        tokens = sum(s.num_tokens for s in seqs)
        out.append((len(seqs), tokens, sum(len(s.image_sizes) for s in seqs), timer(run)))
    return out


def profile_decode(runner: ModelRunner, cfg: ModelConfig, batches: list[int], contexts: list[int],
                   timer: Timer) -> list[list[float]]:
    """[[batch, context, seconds]] of one decode step: `batch` sequences of `context` tokens on
    scattered KV blocks (random data), each feeding its last token at position context - 1."""
    g = torch.Generator().manual_seed(3)
    bs = runner.block_size
    out = []
    for ctx in contexts:
        for b in batches:
            nb = blocks_for(ctx, bs)
            blocks = torch.randperm(runner.num_kv_blocks, generator=g)[: b * nb].tolist()
            seqs = []
            for i in range(b):
                ids = random_ids(ctx, cfg, g)
                seq = Sequence(seq_id=i, prompt_ids=ids[:-1], sampling=SamplingParams(), seed=i,
                               stop_token_ids=frozenset(), block_table=blocks[i * nb : (i + 1) * nb])
                seq.output_ids.append(ids[-1])  # decoded so far: the step feeds it at position ctx - 1
                seq.num_cached = ctx - 1
                seqs.append(seq)
            out.append([b, ctx, timer(lambda seqs=seqs: runner.decode(seqs, 1))])
    return out


class _EchoRole:
    """A stage role that sends every message straight back: the hand-off transport alone."""

    busy = False

    def __init__(self, send: Callable[[object], None]) -> None:
        self.send = send

    def handle(self, msg: object) -> None:
        self.send(msg)

    def step(self) -> None:
        pass

    def drain(self) -> None:
        pass

    def stats(self) -> dict:
        return {}

    def close(self) -> None:
        pass


def handoff_fixed_s(prompt_tokens: int, kv_blocks: int, calls: int, warmup: int) -> float:
    """Median round trip of a DecodeTask through a worker process, as the EPD stages talk to
    the orchestrator (a spawned ipc.worker shell, its Inbox and outbox)."""
    import multiprocess as mp
    from multiprocess.connection import wait

    from engine.messages import DecodeTask
    from engine.stage_handles import _sigint_ignored_by_children
    from ipc.channel import Inbox
    from ipc.worker import Shutdown, worker_main

    ctx = mp.get_context("spawn")
    inbox = Inbox(ctx, "echo")
    outbox, writer = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=worker_main, args=(_EchoRole, "echo0", os.getpid(), 0, inbox.reader, writer),
                       name="echo0", daemon=True)
    with _sigint_ignored_by_children():  # as the engine starts its stages: Ctrl-C is the parent's
        proc.start()
    writer.close()
    inbox.started()
    g = torch.Generator().manual_seed(4)
    msg = DecodeTask(req_id=7, prompt_ids=torch.randint(4, 32000, (prompt_tokens,), generator=g).tolist(),
                     first_token=29871, prefill=0, kv_blocks=list(range(100, 100 + kv_blocks)),
                     sampling=SamplingParams(), seed=7)
    try:
        if not outbox.poll(300):  # the worker reports once before it waits for messages
            raise RuntimeError("the echo worker did not start within 300 s")
        outbox.recv()
        times = []
        for i in range(warmup + calls):
            start = time.perf_counter()
            inbox.put(msg)
            if not wait([outbox], 30):
                raise RuntimeError("the echo worker did not answer within 30 s")
            outbox.recv()
            if i >= warmup:
                times.append(time.perf_counter() - start)
        return statistics.median(times)
    finally:
        inbox.put(Shutdown())
        proc.join(10)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
        inbox.close()
        outbox.close()


def handoff_mm_item_s(runner: ModelRunner, src_device: torch.device, items: int, timer: Timer) -> float:
    """Seconds per item of copying `items` items' embeddings from an encoder's arena into a
    prefill's MM arena, as PrefillRole._stage_images does (one copy per item, synchronized)."""
    shape = runner.mm_arena.shape[1:]
    src = torch.empty(items, *shape, dtype=runner.dtype, device=src_device).normal_(0, 0.02)
    dst = torch.empty(items, *shape, dtype=runner.dtype, device=runner.device)

    def run() -> None:
        for i in range(items):
            dst[i].copy_(src[i], non_blocking=True)

    return timer(run) / items


def handoff_kv_token_s(runner: ModelRunner, src_device: torch.device, tokens: int, timer: Timer) -> float:
    """Seconds per token of pull_blocks moving the blocks of `tokens` tokens from a prefill's
    arena into this (decode's) arena, ids scattered on both sides."""
    from ipc.migration import pull_blocks

    n = blocks_for(tokens, runner.block_size)
    g = torch.Generator().manual_seed(5)
    src = torch.empty(2 * n, *runner.kv_arena.shape[1:], dtype=runner.dtype, device=src_device).normal_()
    src_ids = torch.randperm(2 * n, generator=g)[:n].tolist()
    dst_ids = torch.randperm(runner.num_kv_blocks, generator=g)[:n].tolist()
    seconds = timer(lambda: pull_blocks(src, src_ids, runner.kv_arena, dst_ids))
    return seconds / (n * runner.block_size)


# ----------------------------------------------------------------------------- set-up


def parse_sizes(flag: str, text: str) -> list[tuple[str, tuple[int, int]]]:
    """'336x336,1920x1080' -> [("336x336", (336, 336)), ("1920x1080", (1920, 1080))] (width x height)."""
    out = []
    for part in text.split(","):
        try:
            w, h = (int(v) for v in part.strip().lower().split("x"))
        except ValueError:
            raise CLIError(f"{flag} {text!r}: expected comma-separated WxH sizes, e.g. 336x336,1920x1080") from None
        if w < 1 or h < 1:
            raise CLIError(f"{flag} {part!r}: width and height must be >= 1")
        out.append((f"{w}x{h}", (w, h)))
    return out


def build_profile_runner(config: EngineConfig, cfg: ModelConfig, kv_blocks: int) -> ModelRunner:
    """The whole model, an MM arena (read in place by prefill as an encoder's arena on this
    device) and a KV arena of `kv_blocks` random blocks; graphs captured as configured."""
    model = load_weights(config, cfg)
    device, dtype = torch.device(config.device), config.torch_dtype
    mm_shape = mm_arena_shape(config, cfg)
    kv_shape = (kv_blocks, *kv_block_shape(config, cfg))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        need = (math.prod(kv_shape) + math.prod(mm_shape)) * dtype.itemsize
        if need + HEADROOM_BYTES > free:
            raise CLIError(
                f"--decode-batches / --decode-contexts: the KV arena for the largest grid point ({kv_blocks} blocks, "
                f"{need / 2**30:.1f} GiB with the MM arena) and {HEADROOM_BYTES / 2**30:.0f} GiB for activations do "
                f"not fit in the {free / 2**30:.1f} GiB this GPU has free after the weights; use a smaller grid")
    mm_arena = torch.empty(mm_shape, dtype=dtype, device=device).normal_(0, 0.02)
    kv_arena = torch.empty(kv_shape, dtype=dtype, device=device).normal_()
    runner = ModelRunner(config, cfg, model, kv_arena, mm_arena, mm_peers=[mm_arena])
    if config.cuda_graphs and runner.backend == "cuda":
        runner.capture_graphs()
    return runner


def dump(costs: dict) -> str:
    """The JSON text: one top-level key per line."""
    return "{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in costs.items()) + "\n}\n"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _table(title: str, header: list[str], rows: list[list[str]]) -> None:
    print(f"\n## {title}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    sys.stdout.flush()


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    from engine.cli import ArgumentParser, add_log_level, check_device, int_list, positive_int, setup_logging

    p = ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, help="LLaVA checkpoint dir (e.g. /tmp/llava-7b from make_random_model.py)")
    p.add_argument("--backend", default="cuda", choices=["cuda", "torch"], help="ops backend")
    p.add_argument("--device", default="cuda", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="model dtype")
    p.add_argument("--out", default="costs.json", help="the JSON file written")
    p.add_argument("--quick", action="store_true", help="a small grid (CI, tests): the --quick values below")
    help_grid = {
        "image_sizes": "JPEG sizes WxH for the preprocessing profile",
        "preprocess_batches": "images per preprocessing batch",
        "tower_batches": "items per vision-tower batch",
        "prefill_prompts": "prompts per prefill batch, one image each (--prefill-prompt-tokens tokens each)",
        "prefill_tokens": "text-only prefill prompts of these token counts (one prompt per call)",
        "decode_batches": "decode batch sizes",
        "decode_contexts": "decode context lengths (tokens per sequence)",
        "repeats": "timed calls per point (the median is kept)",
        "warmup": "untimed calls before them",
    }
    for name, (full, quick) in GRIDS.items():
        kind = int if isinstance(full, int) else str
        p.add_argument(f"--{name.replace('_', '-')}", type=kind,
                       help=f"{help_grid[name]} (default {full}; with --quick {quick})")
    p.add_argument("--prefill-prompt-tokens", type=int,
                   help=f"tokens per image prompt (default: the image's tokens + {PROMPT_TEXT_TOKENS}, "
                        "600 for LLaVA-1.5)")
    p.add_argument("--handoff-items", type=int, default=8, help="image items copied per MM hand-off measurement")
    p.add_argument("--handoff-tokens", type=int,
                   help="tokens of KV migrated per measurement (default: --prefill-prompt-tokens)")
    p.add_argument("--handoff-calls", type=int, default=200, help="round trips timed for the fixed hand-off cost")
    p.add_argument("--peer-device",
                   help="where the hand-offs' source arenas live (an encoder's / prefill's GPU; default: --device)")
    p.add_argument("--image-workers", type=int, default=4, help="preprocessing threads (EngineConfig.image_workers)")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="torch CPU threads of this process (EngineConfig.torch_threads; 0: torch's default)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run the tower and decode eagerly on the cuda backend")
    add_log_level(p, "WARNING")
    args = p.parse_args(argv)
    setup_logging(args.log_level)
    for name, (full, quick) in GRIDS.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)

    sizes = parse_sizes("--image-sizes", args.image_sizes)
    pre_batches = int_list("--preprocess-batches", args.preprocess_batches)
    tower_batches = int_list("--tower-batches", args.tower_batches)
    prefill_prompts = int_list("--prefill-prompts", args.prefill_prompts)
    prefill_tokens = int_list("--prefill-tokens", args.prefill_tokens)
    decode_batches = int_list("--decode-batches", args.decode_batches)
    decode_contexts = int_list("--decode-contexts", args.decode_contexts)
    positive_int("--repeats", args.repeats)
    for flag in ("warmup", "torch_threads"):
        if getattr(args, flag) < 0:
            raise CLIError(f"--{flag.replace('_', '-')} = {getattr(args, flag)}; must be >= 0")
    for flag in ("prefill_prompt_tokens", "handoff_items", "handoff_tokens", "handoff_calls", "image_workers"):
        positive_int(f"--{flag.replace('_', '-')}", getattr(args, flag))
    out = Path(args.out)
    if not out.parent.is_dir():
        raise CLIError(f"--out {args.out}: directory {out.parent} does not exist")
    check_device(args.device, args.backend)
    device = torch.device(args.device)
    try:
        peer = torch.device(args.peer_device) if args.peer_device else device
    except (RuntimeError, ValueError):
        raise CLIError(f"--peer-device {args.peer_device!r}: expected cpu, cuda or cuda:N") from None
    if peer.type != device.type:
        raise CLIError(f"--peer-device {args.peer_device!r}: must be a {device.type} device like --device")
    if peer.type == "cuda" and (peer.index or 0) >= torch.cuda.device_count():
        raise CLIError(f"--peer-device {args.peer_device!r}: GPU {peer.index} does not exist; this machine has "
                       f"{torch.cuda.device_count()}")
    if device.type == "cuda":
        from epd_kernels import cuda_available

        if not cuda_available():  # ipc.migration.pull_blocks copies with it on a GPU
            raise CLIError("--device cuda: the KV hand-off needs the CUDA extension epd_kernels._epd_C "
                           "(python -m epd_kernels.build)")

    cfg = ModelConfig.from_dir(args.model)
    if not cfg.is_multimodal:
        raise CLIError(f"--model {args.model}: {cfg.architecture} has no vision tower; the stage profile needs a "
                       "LLaVA checkpoint")
    context = cfg.text.max_position_embeddings
    size = cfg.vision.image_size
    image_rows = len(cfg.image_layout(size, size).rows)
    prompt_tokens = args.prefill_prompt_tokens or image_rows + PROMPT_TEXT_TOKENS
    if not image_rows < prompt_tokens <= context:
        raise CLIError(f"--prefill-prompt-tokens = {prompt_tokens}; must be in [{image_rows + 1}, {context}] (the "
                       f"image's {image_rows} tokens plus text, within the model's context of {context})")
    for flag, values in (("--prefill-tokens", prefill_tokens), ("--decode-contexts", decode_contexts)):
        if max(values) > context:
            raise CLIError(f"{flag} {max(values)}: the model's context is {context} tokens")
    handoff_tokens = args.handoff_tokens or prompt_tokens

    bs = BLOCK_SIZE
    kv_blocks = 1 + max(max(decode_batches) * blocks_for(max(decode_contexts), bs),
                        max(prefill_prompts) * blocks_for(prompt_tokens, bs), blocks_for(max(prefill_tokens), bs),
                        blocks_for(handoff_tokens, bs))
    items = cfg.image_layout(size, size).num_items
    mm_needed = max(max(tower_batches), max(prefill_prompts) * items)
    max_images = max(tower_batches)
    config = EngineConfig(
        model=args.model, backend=args.backend, dtype=args.dtype, device=args.device, block_size=bs,
        kv_cache_tokens=kv_blocks * bs,
        max_num_seqs=max(decode_batches), max_images_per_batch=max_images,
        max_num_batched_tokens=max(max(prefill_prompts) * prompt_tokens, max(prefill_tokens)),
        mm_cache_items=max(0, mm_needed - 2 * max_images), cuda_graphs=not args.no_cuda_graphs, progress=False,
        image_workers=args.image_workers, torch_threads=args.torch_threads,
    ).for_model(cfg)
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)

    started = time.perf_counter()
    timer = Timer([device, peer], args.repeats, args.warmup)
    runner = build_profile_runner(config, cfg, kv_blocks)
    print(f"{device_name(device)}: {args.model} ({cfg.architecture}), backend {runner.backend}, {args.dtype}; "
          f"KV arena {kv_blocks} blocks x {bs}; MM arena {runner.num_mm_blocks} items; "
          f"cuda graphs {'on' if runner.vision_graphs is not None else 'off'}; "
          f"median of {args.repeats} after {args.warmup} warm-up", flush=True)

    preprocess, path = profile_preprocess(config, cfg, sizes, pre_batches, timer)
    _table(f"preprocess: {path}, seconds per batch of JPEGs", ["size", "batch", "ms", "images/s"],
           [[text, str(n), _ms(s), f"{n / s:.0f}"] for text, rows in preprocess.items() for n, s in rows])
    tower = profile_tower(runner, cfg, tower_batches, timer)
    _table("tower + projector (ModelRunner.encode)", ["items", "ms", "items/s"],
           [[str(n), _ms(s), f"{n / s:.0f}"] for n, s in tower])
    prefill = profile_prefill(runner, cfg, prefill_prompts, prompt_tokens, prefill_tokens, timer)
    _table("prefill (ModelRunner.prefill, one call)", ["prompts", "images", "tokens", "ms", "tokens/s"],
           [[str(n), str(i), str(t), _ms(s), f"{t / s:.0f}"] for n, t, i, s in prefill])
    decode = profile_decode(runner, cfg, decode_batches, decode_contexts, timer)
    _table("decode (ModelRunner.decode, one step)", ["batch", "context", "ms", "tokens/s"],
           [[str(b), str(c), _ms(s), f"{b / s:.0f}"] for b, c, s in decode])
    handoff = {
        "fixed_s": handoff_fixed_s(prompt_tokens, blocks_for(prompt_tokens, bs), args.handoff_calls,
                                   max(args.warmup, 10)),
        "mm_item_s": handoff_mm_item_s(runner, peer, args.handoff_items, timer),
        "kv_token_s": handoff_kv_token_s(runner, peer, handoff_tokens, timer),
    }
    _table(f"hand-offs (sources on {peer})", ["what", "us"],
           [["fixed: message round trip to a worker process", f"{handoff['fixed_s'] * 1e6:.1f}"],
            [f"MM embeddings, per item ({args.handoff_items} items)", f"{handoff['mm_item_s'] * 1e6:.2f}"],
            [f"KV migration, per token ({handoff_tokens} tokens)", f"{handoff['kv_token_s'] * 1e6:.4f}"]])

    costs = {
        "version": VERSION, "device": device_name(device), "model": args.model, "backend": runner.backend,
        "dtype": args.dtype, "block_size": bs, "image_tokens": cfg.tokens_per_item, "preprocess": preprocess,
        "tower": tower, "prefill": sorted([t, s] for _, t, _, s in prefill), "decode": decode, "handoff": handoff,
    }
    if device.type == "cpu":
        costs["cpu_cores"] = usable_cores()  # what the stages' threads are shared out of (stage_threads)
    out.write_text(dump(costs))
    print(f"\nwrote {out} in {time.perf_counter() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    from engine.cli import run_main

    sys.exit(run_main(main))
