"""scripts/bench_epd.py end to end on the CPU (torch backend, tiny LLaVA): the script every device
visit runs must not fail there on something this machine can catch."""

from __future__ import annotations

import re
from pathlib import Path

import pytest


def test_bench_epd_reports_equality_load_and_idle_ttft(tiny_llava: Path, capsys: pytest.CaptureFixture) -> None:
    from scripts import bench_epd

    with pytest.raises(SystemExit) as done:
        bench_epd.main(["--model", str(tiny_llava), "--backend", "torch", "--placement", "E:cpu,cpu P:cpu D:cpu",
                        "--requests", "3", "--check-requests", "2", "--max-tokens", "3", "--image-size", "64x48"])
    out = capsys.readouterr().out
    assert done.value.code == 0, out
    assert "one at a time: 2/2 requests token-for-token equal to aggregated" in out
    assert re.search(r"^\| epd E:cpu,cpu P:cpu D:cpu \| auto \| \d+ \|", out, re.M), out
    idle = out[out.index("idle-engine TTFT"):]
    for engine in ("epd E:cpu,cpu P:cpu D:cpu", "aggregated cpu"):
        row = re.search(rf"^\| {re.escape(engine)} \| auto \| 64x48 \| (\d+) \| ([\d.]+) \| ([\d.]+) \|", idle, re.M)
        assert row, idle
        prompt_tokens, p50, fastest = int(row[1]), float(row[2]), float(row[3])
        assert prompt_tokens > 10 and 0 < fastest <= p50, row[0]
