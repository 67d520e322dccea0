"""The parity scripts against HF transformers, fp32 on the CPU, for the tiny models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["logits", "decode", "greedy", "vision"])
@pytest.mark.parametrize("kind", ["llava", "llava-next", "llama"])
def test_parity_script(script: str, kind: str, request: pytest.FixtureRequest) -> None:
    if script == "vision" and kind == "llama":
        pytest.skip("text-only model has no vision tower")
    fixture = {"llava": "tiny_llava", "llava-next": "tiny_llava_next", "llama": "tiny_llama"}[kind]
    model = request.getfixturevalue(fixture)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "parity" / f"{script}.py"), "--model", str(model), "--steps", "32"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "RESULT: PASS" in proc.stdout


@pytest.mark.parametrize("script", ["logits", "decode"])
def test_parity_in_batch_invariant_mode(script: str, tiny_llava_next: Path) -> None:
    """deterministic=True changes how GEMMs are blocked, not what they compute: fp32 parity holds
    (LLaVA-NeXT: tiles, several aspect ratios, newline rows)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "parity" / f"{script}.py"), "--model", str(tiny_llava_next), "--steps", "16",
         "--deterministic"], capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "RESULT: PASS" in proc.stdout
