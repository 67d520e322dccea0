"""Serve a model (`epd-serve`): the OpenAI HTTP API (ipc/http_server.py) on --host/--port, or
the RPC server (ipc/server.py) on a local socket or, with --api rpc, on TCP.

    epd-serve --model DIR --port 8000                      # OpenAI API on 127.0.0.1:8000
    EPD_API_KEY=secret epd-serve --model DIR --mode epd --placement "E:cpu P:cpu D:cpu"
    EPD_AUTHKEY=secret epd-serve --model DIR --socket /tmp/epd.sock
    EPD_AUTHKEY=secret epd-serve --model DIR --api rpc --host 127.0.0.1 --port 7777
    EPD_AUTHKEY=secret epd-serve --model DIR --mode epd --placement "E:0,1 P:2 D:3"
    EPD_AUTHKEY=secret epd-serve --model DIR --mode epd --placement "E:cpu,cpu P:cpu D:cpu"

HTTP: /health answers 503 while the model loads (the port is bound first); --api-key or
EPD_API_KEY guards /v1/*. RPC clients: ipc.client.RPCClient(address, authkey); the key comes from
EPD_AUTHKEY (never argv, which other users can read). SIGTERM and SIGINT stop either server as
the RPC `stop` call does (streams in flight end with "server stopped", stages and arenas go, the
socket file is removed; exit 0).
A socket path with no listener behind it is replaced; one with a live server is refused before
the model loads. Bad input exits with status 2 and one line naming the flag.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from engine.cli import (
    PLACEMENT_HELP,
    ArgumentParser,
    CLIError,
    add_log_level,
    check_device,
    check_placement,
    dtype_arg,
    positive_int,
    run_main,
    setup_logging,
)

log = logging.getLogger("ipc.serve")
AGGREGATED_ONLY = ("background_capture",)  # EPD decode captures its graphs before it reports ready


class StopRequested(BaseException):  # noqa: N818 -- a signal, not an error
    """SIGTERM before the server is up: unwinds the start-up (BaseException: no `except
    Exception` in the loading code swallows it)."""


def build_parser(model_help: str = "HF checkpoint directory (required)") -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--model", help=model_help)
    where = p.add_argument_group("address (a unix socket, or TCP on a local interface)")
    where.add_argument("--api", choices=["openai", "rpc"],
                       help="openai: the OpenAI HTTP API on --host/--port; rpc: the RPC server (default: rpc with "
                            "--socket, else openai)")
    where.add_argument("--socket", help="unix socket path, RPC only (default: TCP on --host/--port)")
    where.add_argument("--host", default="127.0.0.1", help="TCP host, when no --socket")
    where.add_argument("--port", type=int, help="TCP port, when no --socket (default: 8000 for openai, 7777 for rpc)")
    http = p.add_argument_group("OpenAI HTTP API (--api openai)")
    http.add_argument("--served-model-name", help="the model name requests must give (default: the model dir's name)")
    http.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* (default: env EPD_API_KEY; "
                                        "unset: no key)")
    http.add_argument("--max-waiting", type=int, default=256,
                      help="requests admitted and not finished at most; beyond it the answer is 429")
    http.add_argument("--max-request-bytes", type=int, default=64 * 2**20, help="largest request body (413 beyond)")
    p.add_argument("--mode", choices=["aggregated", "epd", "pd"], default="aggregated",
                   help="aggregated: one process; epd: encoder/prefill/decode processes; pd: prefill encodes")
    p.add_argument("--placement", help=PLACEMENT_HELP)
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "cuda"],
                   help="ops backend: torch (reference, any device), cuda (our kernels), auto (cuda where it runs)")
    p.add_argument("--dtype", default="auto", type=dtype_arg,
                   help="auto (the checkpoint's), float32, bfloat16 or float16")
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when present); epd: the default placement's")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences decoded together at most")
    p.add_argument("--kv-cache-tokens", type=int,
                   help="KV arena capacity in tokens, per stage in epd (default: from GPU memory; CPU: 4 x context)")
    p.add_argument("--max-images-per-batch", type=int, default=8,
                   help="vision-tower items encoded together at most (a LLaVA-1.5 image is 1, a NeXT image 1 + tiles)")
    p.add_argument("--seed", type=int, default=0, help="engine seed for requests without one")
    p.add_argument("--allowed-local-media-path",
                   help="directory whose image files requests may name by path (default: none: paths are refused)")
    p.add_argument("--multi-step", type=int, help="decode steps per device call, 1-64 (default: 1)")
    p.add_argument("--max-model-len", type=int, help="context cap in tokens (default: the model's)")
    p.add_argument("--max-num-batched-tokens", type=int, help="prefill token budget per step (default: 8192)")
    p.add_argument("--gpu-memory-utilization", type=float,
                   help="share of the GPU for weights + KV (default: 0.9; epd: the stages on one GPU share it)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="decode eagerly (cuda backend)")
    p.add_argument("--no-mm-cache", action="store_true",
                   help="encode every image, even one seen before (no caches keyed by image content)")
    p.add_argument("--mm-pixel-cache-mb", type=int, default=256,
                   help="preprocessed pixels kept per process, MB (0: none)")
    p.add_argument("--deterministic", action="store_true",
                   help="batch-invariant ops: a request's output is bit-identical whatever shares its batches "
                        "or the E/P/D split (epd_kernels/invariant.py; slower)")
    dyn = p.add_argument_group("epd / pd modes")
    dyn.add_argument("--cluster", help="a Ray cluster's address: stages whose --placement names a host run as actors "
                                       "on the node with that custom resource (the ray extra)")
    dyn.add_argument("--dynamic", action="store_true",
                     help="instances change role as the load shifts (engine/allocator.py), steered by the SLOs")
    dyn.add_argument("--slo-ttft", type=float, default=1.4, help="TTFT SLO in seconds (--dynamic's target)")
    dyn.add_argument("--slo-tpot", type=float, default=0.04, help="TPOT SLO in seconds (--dynamic's target)")
    agg = p.add_argument_group("aggregated mode only")
    agg.add_argument("--background-capture", action="store_true",
                     help="serve at once; capture the decode graphs on a side stream")
    add_log_level(p)
    return p


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked before the model loads (fast, so a typo costs no load)."""
    from engine.config import ModelConfig

    if args.api is None:
        args.api = "rpc" if args.socket else "openai"
    if args.port is None:
        args.port = 8000 if args.api == "openai" else 7777
    if args.api == "openai" and args.socket:
        raise CLIError("--socket serves the RPC api; the OpenAI api listens on --host/--port (or use --api rpc)")
    if args.api == "rpc" and not os.environ.get("EPD_AUTHKEY"):
        raise CLIError("EPD_AUTHKEY is not set: export the clients' shared secret (it never goes on argv)")
    if args.socket is None and not 1 <= args.port <= 65535:
        raise CLIError(f"--port = {args.port}; must be in [1, 65535]")
    cfg = ModelConfig.from_dir(args.model)  # a missing dir or a bad config.json fails here
    positive_int("--max-num-seqs", args.max_num_seqs)
    positive_int("--max-waiting", args.max_waiting)
    if args.max_request_bytes < 1024:
        raise CLIError(f"--max-request-bytes = {args.max_request_bytes}; must be >= 1024")
    positive_int("--kv-cache-tokens", args.kv_cache_tokens)
    positive_int("--max-images-per-batch", args.max_images_per_batch)
    positive_int("--multi-step", args.multi_step, 64)
    positive_int("--max-model-len", args.max_model_len)
    positive_int("--max-num-batched-tokens", args.max_num_batched_tokens)
    if args.mm_pixel_cache_mb < 0:
        raise CLIError(f"--mm-pixel-cache-mb = {args.mm_pixel_cache_mb}; must be >= 0")
    if args.gpu_memory_utilization is not None and not 0.0 < args.gpu_memory_utilization <= 1.0:
        raise CLIError(f"--gpu-memory-utilization = {args.gpu_memory_utilization}; must be in (0, 1]")
    if args.allowed_local_media_path is not None and not Path(args.allowed_local_media_path).is_dir():
        raise CLIError(f"--allowed-local-media-path {args.allowed_local_media_path!r}: not a directory")
    check_device(args.device, args.backend)
    for flag in ("slo_ttft", "slo_tpot"):
        if not getattr(args, flag) > 0:
            raise CLIError(f"--{flag.replace('_', '-')} = {getattr(args, flag)}; must be > 0 (seconds)")
    if args.mode == "aggregated":
        if args.placement:
            raise CLIError("--placement applies to --mode epd or pd; aggregated runs on --device")
        if args.dynamic:
            raise CLIError("--dynamic applies to --mode epd or pd (stages that change role)")
        if args.cluster:
            raise CLIError("--cluster applies to --mode epd or pd (stages on the cluster's nodes)")
        return
    if not cfg.is_multimodal:
        raise CLIError(f"--mode {args.mode} needs a vision tower; {cfg.architecture} has none (use aggregated)")
    given = [f"--{name.replace('_', '-')}" for name in AGGREGATED_ONLY if getattr(args, name) not in (None, False)]
    if given:
        raise CLIError(f"{', '.join(given)}: aggregated mode only (the EPD stages use their own settings)")
    if args.placement:
        check_placement(args.placement, args.mode, cluster=bool(args.cluster))


def load_engine(args: argparse.Namespace, model: Path):
    """The in-process LLM (aggregated) or the EPD orchestrator with its stage processes."""
    from engine.config import EngineConfig

    optional = {"multi_step": args.multi_step, "max_model_len": args.max_model_len,
                "max_num_batched_tokens": args.max_num_batched_tokens,
                "gpu_memory_utilization": args.gpu_memory_utilization}
    config = EngineConfig(model=str(model), backend=args.backend, dtype=args.dtype, device=args.device,
                          max_num_seqs=args.max_num_seqs, kv_cache_tokens=args.kv_cache_tokens,
                          max_images_per_batch=args.max_images_per_batch, cuda_graphs=not args.no_cuda_graphs,
                          background_capture=args.background_capture, seed=args.seed,
                          mm_cache=not args.no_mm_cache, mm_pixel_cache_mb=args.mm_pixel_cache_mb,
                          deterministic=args.deterministic, **{k: v for k, v in optional.items() if v is not None})
    if args.mode == "aggregated":
        from engine import LLM

        return LLM(config)
    from engine.allocator import AllocatorPolicy
    from engine.epd import EPDEngine

    dynamic = (AllocatorPolicy(slo_ttft_s=args.slo_ttft, slo_tpot_s=args.slo_tpot, max_num_seqs=args.max_num_seqs)
               if args.dynamic else False)
    return EPDEngine(config, placement=args.placement, mode=args.mode, dynamic=dynamic, cluster=args.cluster)


def _describe(args: argparse.Namespace, engine, address: object) -> str:
    where = address if isinstance(address, str) else f"{address[0]}:{address[1]}"
    on = f"on http://{where} (OpenAI API, model {args.served_model_name!r})" if args.api == "openai" else f"on {where}"
    text = f"serving {args.model} {on} (pid {os.getpid()}): mode {args.mode}"
    if args.mode != "aggregated":
        pids = ", ".join(f"{name} pid {proc.pid}" for name, proc in engine.procs.items())
        text += f", placement {args.placement or 'default (all on ' + (args.device or 'the default device') + ')'}"
        text += f", stages: {pids}"
    media = args.allowed_local_media_path
    return text + f"; local image paths: {'only under ' + media if media else 'refused'}"


def main(argv: list[str] | None = None, default_model: Callable[[], Path] | None = None) -> int:
    """default_model: what to use without --model (the checkout's scripts/serve.py: the tiny LLaVA)."""
    parser = build_parser() if default_model is None else build_parser(
        "HF checkpoint directory (default: the tiny random LLaVA from scripts/make_tiny_model.py)")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    if args.model is None:
        if default_model is None:
            raise CLIError("--model is required (an HF checkpoint directory)")
        args.model = str(default_model())
    check_args(args)
    if args.api == "openai":
        return serve_http(args)
    from ipc.server import RPCServer, claim_address

    address: str | tuple[str, int] = args.socket or (args.host, args.port)
    claim_address(address)  # a live server: AddressInUse (exit 2); a stale socket file: removed

    server = None

    def on_signal(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if server is None:  # still loading: unwind the start-up
            log.info("%s during start-up: stopping", name)
            raise KeyboardInterrupt if signum == signal.SIGINT else StopRequested
        log.info("%s: stopping the server", name)
        server.shutdown()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    engine = None
    try:
        engine = load_engine(args, Path(args.model))
        server = RPCServer(engine, address, os.environ["EPD_AUTHKEY"].encode(),
                           allowed_local_media_path=args.allowed_local_media_path)
        log.info("%s", _describe(args, engine, server.address))
        server.serve_forever()
    except StopRequested:
        log.info("stopped before serving")
    finally:
        if server is not None:
            server.close()  # idempotent; removes the socket file (if still ours), as serve_forever did
        _wind_down(args, engine, previous)
    return 0


def _wind_down(args: argparse.Namespace, engine, previous: dict) -> None:
    """After the frontend stopped: the stages go (EPD), the signal handlers come back."""
    if engine is not None and args.mode != "aggregated":
        engine.shutdown()  # stop every stage, unlink the arenas
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    log.info("stopped")


def serve_http(args: argparse.Namespace) -> int:
    """The OpenAI API: bind and serve first (/health 503), load the engine in this (the main)
    thread, which EPDEngine's stages must outlive, then serve it until SIGTERM / SIGINT."""
    import threading

    try:
        from engine.serving import EngineLoop
        from ipc.http_server import UvicornThread, build_app
    except ImportError as e:
        raise CLIError(f"--api openai needs the http extra ({e.name} is missing): "
                       "pip install 'epd-engine[http]'") from e

    args.served_model_name = args.served_model_name or Path(args.model).resolve().name
    app = build_app(None, args.served_model_name, api_key=args.api_key or os.environ.get("EPD_API_KEY") or None,
                    max_waiting=args.max_waiting, max_request_bytes=args.max_request_bytes,
                    allowed_local_media_path=args.allowed_local_media_path)
    try:
        http = UvicornThread(app, args.host, args.port, log_level="debug" if args.log_level == "DEBUG" else "warning")
    except OSError as e:
        raise CLIError(f"--host {args.host} --port {args.port}: cannot listen there: {e.strerror or e}") from e
    stop, serving = threading.Event(), threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if not serving.is_set():  # still loading: unwind the start-up
            log.info("%s during start-up: stopping", name)
            raise KeyboardInterrupt if signum == signal.SIGINT else StopRequested
        log.info("%s: stopping the server", name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    engine = loop = None
    try:
        http.start()
        log.info("listening on http://%s:%d; loading %s (/health answers 503 until it is ready)",
                 http.host, http.port, args.model)
        engine = load_engine(args, Path(args.model))
        loop = EngineLoop(engine)
        loop.start()
        app.state.frontend.attach(loop)
        serving.set()
        log.info("%s", _describe(args, engine, (http.host, http.port)))
        while not stop.wait(0.1):
            if not http.thread.is_alive():
                log.error("the HTTP server thread ended; stopping")
                break
    except StopRequested:
        log.info("stopped before serving")
    finally:
        if loop is not None:
            loop.stop()  # live requests end with "server stopped"
            loop.join(timeout_s=30)
        if not http.stop():
            log.error("the HTTP server did not stop within 15 s")
        _wind_down(args, engine, previous)
    return 0


def console_main() -> None:
    """The `epd-serve` entry point."""
    sys.exit(run_main(main))
