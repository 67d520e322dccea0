"""scripts/generate.py: the demo path end to end, JSON output, and non-zero exits on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), *args],
                          capture_output=True, text=True, timeout=600)


def test_json_output(tiny_llava: Path, tmp_path: Path) -> None:
    img = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(img)
    proc = _run("--model", str(tiny_llava), "--image", str(img), "--prompt", "What is it?", "--max-tokens", "8",
                "--backend", "torch", "--device", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) == {"text", "token_ids", "finish_reason", "ttft_s", "tokens_per_s"}
    assert 1 <= len(out["token_ids"]) <= 8 and out["finish_reason"] in ("length", "stop")


def test_streaming_output(tiny_llama: Path) -> None:
    proc = _run("--model", str(tiny_llama), "--prompt", "Hi", "--max-tokens", "5", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "TTFT" in proc.stdout and "tokens/s" in proc.stdout


def test_errors_exit_nonzero(tiny_llava: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    cases = [
        (["--model", str(tmp_path / "nope")], "model directory not found"),
        (["--model", str(tiny_llava), "--image", str(bad)], "image 0"),
        (["--model", str(tiny_llava), "--image", str(tmp_path / "none.png")], "file not found"),
        (["--model", str(tiny_llava), "--temperature", "-1"], "sampling.temperature"),
        (["--model", str(tiny_llava), "--max-tokens", "5000"], "context length"),
    ]
    for args, message in cases:
        proc = _run(*args, "--device", "cpu")
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)
