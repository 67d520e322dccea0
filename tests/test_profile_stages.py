"""scripts/profile_stages.py on the tiny LLaVA (torch backend, CPU, --quick): the JSON a
simulator is fitted from has every key, sane values and the grid asked for; bad flags end
with status 2 and one line naming the flag, before any model loads."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from engine.cli import run_main
from scripts.profile_stages import main

KEYS = {"version", "device", "model", "backend", "dtype", "block_size", "image_tokens", "preprocess", "tower",
        "prefill", "decode", "handoff"}


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()  # --torch-threads sets this process's
    yield
    torch.set_num_threads(threads)


def _base(model: Path, out: Path) -> list[str]:
    return ["--model", str(model), "--quick", "--backend", "torch", "--device", "cpu", "--dtype", "float32",
            "--out", str(out)]


def _numbers(value: object) -> list[float]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in _numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in _numbers(v)]
    return [value]


def test_quick_profile(tiny_llava: Path, tmp_path: Path, capsys: pytest.CaptureFixture, keep_threads) -> None:
    out = tmp_path / "costs.json"
    # one torch thread: steady timings on a CPU shared with other jobs
    assert main([*_base(tiny_llava, out), "--torch-threads", "1"]) == 0
    costs = json.loads(out.read_text())
    assert set(costs) == KEYS | {"cpu_cores"}  # on the CPU: the cores the stage processes share
    assert costs["cpu_cores"] == (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    assert (costs["version"], costs["device"], costs["model"], costs["backend"], costs["dtype"]) == (
        1, "cpu", str(tiny_llava), "torch", "float32")
    assert costs["block_size"] == 16 and costs["image_tokens"] == 36  # (84 / 14) ** 2 patches
    assert set(costs["handoff"]) == {"fixed_s", "mm_item_s", "kv_token_s"}

    # the --quick grid, every point measured
    assert set(costs["preprocess"]) == {"336x336", "1920x1080"}
    assert all([n for n, _ in rows] == [1, 4] for rows in costs["preprocess"].values())
    assert [n for n, _ in costs["tower"]] == [1, 32]
    tokens = [t for t, _ in costs["prefill"]]
    assert tokens == sorted(tokens) and tokens == [16, 60, 120, 512]  # text-only 16, 512; 1 and 2 image prompts
    assert sorted((b, c) for b, c, _ in costs["decode"]) == [(1, 64), (1, 256), (4, 64), (4, 256)]

    numbers = [x for k, v in costs.items() if k not in ("version", "device", "model", "backend", "dtype")
               for x in _numbers(v)]
    assert all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in numbers), costs

    # monotone enough: more work takes longer
    assert costs["tower"][-1][1] > costs["tower"][0][1]
    assert costs["prefill"][-1][1] > costs["prefill"][0][1]
    for rows in costs["preprocess"].values():
        assert rows[-1][1] > rows[0][1]

    text = capsys.readouterr().out
    for title in ("## preprocess", "## tower", "## prefill", "## decode", "## hand-offs"):
        assert title in text


BAD = [
    (["--decode-batches", "0"], "--decode-batches = 0; must be >= 1"),
    (["--tower-batches", "1,x"], "--tower-batches '1,x': expected comma-separated integers"),
    (["--image-sizes", "big"], "--image-sizes 'big': expected comma-separated WxH sizes"),
    (["--decode-contexts", "64,4096"], "--decode-contexts 4096: the model's context is 1024 tokens"),
    (["--prefill-prompt-tokens", "10"], "--prefill-prompt-tokens = 10; must be in [37, 1024]"),
    (["--warmup", "-1"], "--warmup = -1; must be >= 0"),
    (["--repeats", "two"], "argument --repeats: invalid int value: 'two'"),
    (["--backend", "cuda"], "--backend cuda runs on a GPU"),
    (["--peer-device", "cuda:0"], "--peer-device 'cuda:0': must be a cpu device like --device"),
    (["--out", "/nonexistent/dir/costs.json"], "--out /nonexistent/dir/costs.json: directory /nonexistent/dir"),
]


@pytest.mark.parametrize(("extra", "expected"), BAD, ids=[" ".join(extra) for extra, _ in BAD])
def test_bad_flags(extra: list[str], expected: str, tiny_llava: Path, tmp_path: Path,
                   capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "costs.json"
    try:
        rc = run_main(lambda: main([*_base(tiny_llava, out), *extra]))
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert "Traceback" not in err and lines[-1].startswith("error: ") and expected in lines[-1], err
    assert not out.exists()
