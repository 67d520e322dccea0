"""Serve a model: the OpenAI HTTP API on --host/--port, or the RPC server (ipc/server.py).

    python scripts/serve.py --model DIR --port 8000                     # OpenAI API
    EPD_AUTHKEY=secret python scripts/serve.py --model DIR --socket /tmp/epd.sock
    EPD_AUTHKEY=secret python scripts/serve.py --model DIR --mode epd --placement "E:0,1 P:2 D:3"

The installed entry point is `epd-serve` (ipc/serve_cli.py: flags, signals, the address); this
checkout wrapper adds one default: without --model it serves the tiny random LLaVA made by
scripts/make_tiny_model.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.cli import run_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from ipc.serve_cli import main as serve_main
    from scripts.generate import tiny_llava

    return serve_main(argv, default_model=tiny_llava)


if __name__ == "__main__":
    sys.exit(run_main(main))
