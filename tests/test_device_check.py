"""scripts/*.sh parse, and scripts/device_check.sh's header names every stage it has (a device
visit is planned from that header; a stage missing there is one nobody runs)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("script", sorted(p.name for p in SCRIPTS.glob("*.sh")))
def test_shell_scripts_parse(script: str) -> None:
    proc = subprocess.run(["bash", "-n", str(SCRIPTS / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_device_check_header_names_every_stage() -> None:
    text = (SCRIPTS / "device_check.sh").read_text()
    header = " ".join(line for line in text.splitlines() if line.startswith("#"))
    stages = set(re.findall(r'STAGES " == \*" ([a-z_]+) "\*', text))
    assert {"build", "test", "parity", "bench", "engine", "ttft", "determ", "splits"} <= stages
    missing = sorted(s for s in stages if not re.search(rf"\b{s}\b", header))
    assert not missing, f"stages without a word in device_check.sh's header: {missing}"
