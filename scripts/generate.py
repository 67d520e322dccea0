"""Token generation driver: image(s) + prompt -> streamed text, then TTFT and tokens/s.

    python scripts/generate.py --image cat.png --prompt "What is in the picture?"

The installed entry point is `epd-generate` (engine/generate_cli.py); this checkout wrapper adds
one default: without --model it uses the tiny random LLaVA made by scripts/make_tiny_model.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.cli import run_main  # noqa: E402


def tiny_llava() -> Path:
    """The cached tiny LLaVA (made on first use); says where it is."""
    from scripts.make_tiny_model import default_tiny_llava_dir, ensure_tiny_llava

    made = not default_tiny_llava_dir().is_dir()
    path = ensure_tiny_llava()
    print(f"model: the tiny random LLaVA {'written to' if made else 'cached at'} {path} "
          "(its text is gibberish; --model DIR for a real checkpoint)", file=sys.stderr)
    return path


def main(argv: list[str] | None = None) -> int:
    from engine.generate_cli import main as generate_main

    return generate_main(argv, default_model=tiny_llava)


if __name__ == "__main__":
    sys.exit(run_main(main))
