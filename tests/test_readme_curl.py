"""The README's curl examples ("Serve the OpenAI API") run as written against a live server on
loopback: the block is read from README.md, only `localhost:8000` (to the test's ephemeral port)
and `/tmp/img.url` (to a temp file) are replaced, and each command's output is checked."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from engine import LLM  # noqa: E402
from engine.serving import EngineLoop  # noqa: E402
from ipc.http_server import UvicornThread, build_app  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"
T = 60


def readme_commands() -> list[str]:
    """The shell commands of the curl block: from `curl -s localhost:8000/health` to the
    `/metrics` line; a command starts at 4 spaces of indent, its continuation lines have more."""
    lines = README.read_text().splitlines()
    start = lines.index("    curl -s localhost:8000/health")
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("    curl -s localhost:8000/metrics"))
    commands: list[str] = []
    for line in lines[start : end + 1]:
        if re.match(r"^    \S", line):
            commands.append(line[4:])
        else:
            assert commands and line.startswith("      "), f"unexpected README line in the curl block: {line!r}"
            commands[-1] += "\n" + line
    return commands


def test_readme_block_is_found() -> None:
    cmds = readme_commands()
    assert len(cmds) == 7 and all(c.startswith(("curl", "python")) for c in cmds), cmds


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_readme_curl_examples(tiny_llava: Path, tmp_path: Path) -> None:
    llm = LLM(tiny_llava, backend="torch", device="cpu")
    loop = EngineLoop(llm)
    loop.start()
    srv = UvicornThread(build_app(loop, "llava"), "127.0.0.1", 0).start()
    try:
        outputs = []
        for cmd in readme_commands():
            cmd = cmd.replace("localhost:8000", f"127.0.0.1:{srv.port}")
            cmd = cmd.replace("/tmp/img.url", str(tmp_path / "img.url"))
            run = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=T)
            assert run.returncode == 0, f"{cmd}\nrc={run.returncode}\n{run.stdout}\n{run.stderr}"
            outputs.append(run.stdout)
        health, models, _, chat, stream, completion, metrics = outputs
        assert json.loads(models)["data"][0]["id"] == "llava"
        assert health.strip() in ("", "{}") or json.loads(health) is not None
        body = json.loads(chat)
        assert body["choices"][0]["message"]["content"] and body["usage"]["completion_tokens"] >= 1
        events = [line.removeprefix("data: ") for line in stream.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["usage"]["completion_tokens"] >= 1
        assert json.loads(completion)["choices"][0]["text"] is not None
        assert "epd_requests_total" in metrics
    finally:
        assert srv.stop()
        loop.stop()
        assert loop.join(T)
