"""scripts/generate.py: the demo path end to end, JSON output, and non-zero exits on bad input."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), *args],
                          capture_output=True, text=True, timeout=600, env=env)


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


def test_startup_summary(tiny_llava: Path, caplog) -> None:
    from engine import LLM

    with caplog.at_level(logging.INFO, logger="engine.llm"):
        llm = LLM(tiny_llava, backend="torch", device="cpu", kv_cache_tokens=512, max_num_seqs=8)
    lines = [r.getMessage() for r in caplog.records if r.name == "engine.llm" and r.levelno == logging.INFO]
    assert len(lines) == 1, lines
    line = lines[0]
    for field in (str(tiny_llava), "LlavaForConditionalGeneration", "backend torch on cpu", "float32",
                  "weights from model.safetensors", "KV cache 32 blocks x 16 = 512 tokens", "MB)",
                  "MM arena 16 blocks", "max_num_seqs 8", "context 1024", "decode eager"):
        assert field in line, (field, line)
    d = llm.describe()
    assert d["kv_cache"]["tokens"] == 512 and d["kv_cache"]["bytes"] == 32 * llm.runner.kv_block_bytes
    assert d["weights"]["bytes"] == (tiny_llava / "model.safetensors").stat().st_size
    assert d["decode_graphs"] == {"captured": [], "pending": [], "capture_s": 0}


def test_generate_logs_summary_and_model_location(tmp_path: Path) -> None:
    # Without --model the checkout's driver makes the tiny LLaVA and says where it went.
    env = {**os.environ, "EPD_CACHE_DIR": str(tmp_path)}
    proc = _run("--prompt", "Hi", "--max-tokens", "2", "--device", "cpu", "--log-level", "info", env=env)
    assert proc.returncode == 0, proc.stderr
    assert f"tiny random LLaVA written to {tmp_path / 'tiny-llava'}" in proc.stderr, proc.stderr
    assert "LLM ready:" in proc.stderr and "KV cache" in proc.stderr
    again = _run("--prompt", "Hi", "--max-tokens", "2", "--device", "cpu", env=env)
    assert again.returncode == 0 and f"cached at {tmp_path / 'tiny-llava'}" in again.stderr, again.stderr
    assert "LLM ready:" not in again.stderr  # default --log-level WARNING keeps generate quiet
