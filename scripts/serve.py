"""Serve a model over the RPC server (ipc/server.py) on a local socket.

    EPD_AUTHKEY=secret python scripts/serve.py --model DIR --socket /tmp/epd.sock
    EPD_AUTHKEY=secret python scripts/serve.py --model DIR --host 127.0.0.1 --port 7777
    EPD_AUTHKEY=secret python scripts/serve.py --model DIR --mode epd --placement "E:0,1 P:2 D:3"

Clients: ipc.client.RPCClient(address, authkey). The key comes from EPD_AUTHKEY (never argv,
which other users can read).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint dir (default: the tiny LLaVA)")
    p.add_argument("--socket", help="Unix socket path")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7777)
    p.add_argument("--backend", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--multi-step", type=int, default=1)
    p.add_argument("--mode", choices=["aggregated", "epd", "pd"], default="aggregated")
    p.add_argument("--placement", help='stage devices for epd/pd, e.g. "E:0,1 P:2 D:3" (default: all on --device)')
    p.add_argument("--kv-cache-tokens", type=int, help="KV arena capacity in tokens (default: sized from memory)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    authkey = os.environ.get("EPD_AUTHKEY", "").encode()
    if not authkey:
        print("error: set EPD_AUTHKEY (the clients' shared secret)", file=sys.stderr)
        return 2
    from engine import LLM
    from ipc.server import RPCServer

    if args.model:
        model = Path(args.model)
    else:
        from scripts.make_tiny_model import ensure_tiny_llava

        model = ensure_tiny_llava()
    if args.mode == "aggregated":
        engine = LLM(model, backend=args.backend, dtype=args.dtype, device=args.device,
                     max_num_seqs=args.max_num_seqs, multi_step=args.multi_step, kv_cache_tokens=args.kv_cache_tokens)
    else:
        import torch

        from engine.epd import EPDEngine
        from ipc.stages import StageConfig

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        stage = StageConfig(model=str(model), backend=args.backend, device=device, dtype=args.dtype,
                            kv_cache_tokens=args.kv_cache_tokens, max_num_seqs=args.max_num_seqs)
        engine = EPDEngine(model, placement=args.placement, mode=args.mode, stage=stage)
    server = RPCServer(engine, args.socket or (args.host, args.port), authkey)
    logging.info("serving %s on %s", model, server.address)
    try:
        server.serve_forever()
    finally:
        if args.mode != "aggregated":
            engine.shutdown()
    logging.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
