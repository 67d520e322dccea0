"""Bad command-line input to every script ends with status 2 and one `error: ...` line naming the
flag and the limit, with no traceback; Ctrl-C ends with 130; --help shows every flag with help
text and its default.

The whole table runs each script as `__main__` in this process (a subprocess costs a torch
import, seconds each on a 2-core machine); a subset, one case per script, also runs as real
subprocesses, where a traceback or a different exit status could not hide.
"""

from __future__ import annotations

import argparse
import logging
import os
import runpy
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from engine.cli import PROJECT_LOGGERS, HelpFormatter

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "scripts").glob("*.py") if p.name != "__init__.py")
NO_GPU = not torch.cuda.is_available()
MISSING = "/nonexistent/epd-model"

# (script, argv, env changes, substring of the error line). {llava}, {llama}, {tmp} are filled in.
CASES: list[tuple[str, list[str], dict, str]] = [
    ("generate.py", ["--model", MISSING], {}, "model directory not found: /nonexistent/epd-model"),
    ("generate.py", ["--model", "{llava}", "--backend", "bogus"], {}, "argument --backend: invalid choice: 'bogus'"),
    ("generate.py", ["--model", "{llava}", "--dtype", "float8"], {}, "dtype 'float8' is not supported"),
    ("generate.py", ["--model", "{llava}", "--device", "tpu"], {}, "--device 'tpu': expected cpu, cuda or cuda:N"),
    ("generate.py", ["--model", "{llava}", "--image", "{tmp}/none.png"], {}, "none.png' (image 0): file not found"),
    ("generate.py", ["--model", "{llava}", "--temperature", "-1"], {}, "sampling.temperature = -1.0"),
    ("generate.py", ["--model", "{llava}", "--top-p", "0"], {}, "sampling.top_p = 0.0"),
    ("generate.py", ["--model", "{llava}", "--max-tokens", "0"], {}, "sampling.max_tokens = 0"),
    ("generate.py", ["--model", "{llava}", "--top-k", "x"], {}, "argument --top-k: invalid int value: 'x'"),
    ("generate.py", ["--model", "{llava}", "--max-tokens", "5000"], {}, "> the context length 1024"),
    ("serve.py", ["--model", "{llava}", "--api", "rpc"], {"EPD_AUTHKEY": None}, "EPD_AUTHKEY is not set"),
    ("serve.py", ["--model", "{llava}", "--api", "openai", "--socket", "{tmp}/s"], {}, "--socket serves the RPC api"),
    ("serve.py", ["--model", "{llava}", "--max-waiting", "0"], {}, "--max-waiting = 0; must be >= 1"),
    ("serve.py", ["--model", "{llava}", "--max-request-bytes", "10"], {}, "--max-request-bytes = 10; must be >= 1024"),
    ("serve.py", ["--model", MISSING], {}, "model directory not found"),
    ("serve.py", ["--model", "{llava}", "--backend", "bogus"], {}, "argument --backend: invalid choice"),
    ("serve.py", ["--model", "{llava}", "--dtype", "int8"], {}, "dtype 'int8' is not supported"),
    ("serve.py", ["--model", "{llava}", "--mode", "epd", "--placement", "X:1"], {},
     "--placement: placement 'X:1': expected items like E:0,1 P:2 D:3"),
    ("serve.py", ["--model", "{llava}", "--mode", "pd", "--placement", "E:cpu P:cpu D:cpu"], {},
     "mode 'pd' needs exactly the stages P/D"),
    ("serve.py", ["--model", "{llava}", "--placement", "P:cpu D:cpu"], {}, "--placement applies to --mode epd or pd"),
    ("serve.py", ["--model", "{llava}", "--device", "cpu", "--backend", "cuda"], {}, "--backend cuda runs on a GPU"),
    ("serve.py", ["--model", "{llava}", "--multi-step", "0"], {}, "--multi-step = 0; must be in [1, 64]"),
    ("serve.py", ["--model", "{llava}", "--mm-pixel-cache-mb", "-1"], {}, "--mm-pixel-cache-mb = -1; must be >= 0"),
    ("serve.py", ["--model", "{llava}", "--mode", "epd", "--background-capture"], {},
     "--background-capture: aggregated mode only"),
    ("serve.py", ["--model", "{llava}", "--max-num-seqs", "0"], {}, "--max-num-seqs = 0; must be >= 1"),
    ("serve.py", ["--model", "{llava}", "--port", "0"], {}, "--port = 0; must be in [1, 65535]"),
    ("serve.py", ["--model", "{llava}", "--gpu-memory-utilization", "1.5"], {}, "must be in (0, 1]"),
    ("serve.py", ["--model", "{llava}", "--allowed-local-media-path", "{tmp}/no-dir"], {}, "no-dir': not a directory"),
    ("serve.py", ["--model", "{llama}", "--mode", "epd"], {}, "--mode epd needs a vision tower"),
    ("serve.py", ["--model", "{llava}", "--log-level", "loud"], {}, "argument --log-level: invalid choice"),
    ("make_tiny_model.py", ["--kind", "gpt"], {}, "argument --kind: invalid choice: 'gpt'"),
    ("make_tiny_model.py", ["--kind", "llava"], {}, "the following arguments are required: --out"),
    ("make_random_model.py", ["--shape", "gpt-9b", "--out", "{tmp}/m"], {}, "argument --shape: invalid choice"),
    ("bench_decode.py", ["--model", "{llava}", "--batches", "1,x"], {}, "--batches '1,x': expected comma-separated"),
    ("bench_decode.py", ["--model", "{llava}", "--context", "0"], {}, "--context = 0; must be >= 1"),
    ("bench_offline.py", ["--model", "{llava}", "--multi-step", "65"], {}, "--multi-step = 65; must be in [1, 64]"),
    ("profile_decode.py", ["--model", "{llava}", "--calls", "0"], {}, "--calls = 0; must be >= 1"),
    ("bench_epd.py", ["--model", "{llava}", "--requests", "0"], {}, "--requests = 0; must be >= 1"),
    ("bench_epd.py", ["--model", "{llava}", "--placement", "E:cpu"], {}, "needs exactly the stages"),
]
NO_GPU_CASES: list[tuple[str, list[str], dict, str]] = [
    ("generate.py", ["--model", "{llava}", "--device", "cuda"], {}, "--device 'cuda' needs a CUDA GPU"),
    ("generate.py", ["--model", "{llava}", "--backend", "cuda"], {}, "--backend cuda needs a CUDA GPU"),
    ("serve.py", ["--model", "{llava}", "--device", "cuda:1"], {}, "--device 'cuda:1' needs a CUDA GPU"),
    ("serve.py", ["--model", "{llava}", "--mode", "epd", "--placement", "E:0 P:0 D:1"], {},
     "--placement: placement 'E:0 P:0 D:1' names GPU 0, but this machine has no CUDA device; use 'cpu'"),
    ("make_random_model.py", ["--shape", "llava-7b", "--out", "{tmp}/m"], {}, "--device 'cuda' needs a CUDA GPU"),
    ("bench_decode.py", ["--model", "{llava}"], {}, "the decode benchmark: runs on a CUDA GPU only"),
    ("bench_offline.py", ["--model", "{llava}"], {}, "the offline benchmark: runs on a CUDA GPU only"),
    ("profile_decode.py", ["--model", "{llava}"], {}, "the decode profile: runs on a CUDA GPU only"),
    ("bench_kernels.py", [], {}, "the kernel benchmarks: runs on a CUDA GPU only"),
    ("bench_epd.py", ["--model", "{llava}"], {}, "--placement: placement 'E:0,0 P:0 D:0' names GPU 0, but this"),
    ("bench_epd.py", ["--model", "{llava}", "--placement", "E:cpu P:cpu D:cpu"], {}, "--backend cuda needs a CUDA GPU"),
]
# as real subprocesses: each kind of error (argparse, run_main's mapping, the device checks) in
# the drivers and a benchmark, and epd_kernels.build
SUBPROCESS_CASES = [CASES[0], CASES[10], CASES[14], CASES[26]] + ([NO_GPU_CASES[3], NO_GPU_CASES[8]] if NO_GPU else [])


def _fill(argv: list[str], paths: dict[str, str]) -> list[str]:
    return [a.format(**paths) for a in argv]


@pytest.fixture
def paths(tiny_llava: Path, tiny_llama: Path, tmp_path: Path) -> dict[str, str]:
    return {"llava": str(tiny_llava), "llama": str(tiny_llama), "tmp": str(tmp_path)}


@pytest.fixture(autouse=True)
def _restore_logger_levels():
    levels = {name: logging.getLogger(name).level for name in PROJECT_LOGGERS}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def _run_in_process(script: str, argv: list[str], env: dict, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setenv("EPD_AUTHKEY", "k")
    for key, value in env.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(ROOT / "scripts" / script), run_name="__main__")
    return info.value.code


def _check(rc: int, stderr: str, expected: str, what: object) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert rc == 2, (what, rc, stderr)
    assert "Traceback" not in stderr, (what, stderr)
    assert lines and lines[-1].startswith("error: ") and expected in lines[-1], (what, stderr)


TABLE = CASES + (NO_GPU_CASES if NO_GPU else [])


@pytest.mark.parametrize(("script", "argv", "env", "expected"), TABLE,
                         ids=[f"{script}:{' '.join(argv[2:] or argv)}" for script, argv, _, _ in TABLE])
def test_bad_input_in_process(script: str, argv: list[str], env: dict, expected: str, paths: dict,
                              monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    rc = _run_in_process(script, _fill(argv, paths), env, monkeypatch)
    _check(rc, capsys.readouterr().err, expected, (script, argv))


def test_bad_input_as_subprocesses(paths: dict) -> None:
    def run(case: tuple) -> tuple:
        script, argv, env, expected = case
        full = {**os.environ, "EPD_AUTHKEY": "k", **{k: v for k, v in env.items() if v is not None}}
        for key in [k for k, v in env.items() if v is None]:
            full.pop(key, None)
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *_fill(argv, paths)], env=full,
                              capture_output=True, text=True, timeout=300)
        return proc.returncode, proc.stderr, expected, (script, argv)

    cases = list(SUBPROCESS_CASES)
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(run, cases))
        build = subprocess.run([sys.executable, "-m", "epd_kernels.build", "--jobs", "0"], cwd=ROOT,
                               capture_output=True, text=True, timeout=300)
    for rc, stderr, expected, what in results:
        _check(rc, stderr, expected, what)
    _check(build.returncode, build.stderr, "--jobs = 0; must be >= 1", "epd_kernels.build")


def test_installed_driver_needs_model(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    # the entry points have no tiny-model default: that is the checkout's scripts/ only
    from engine.cli import run_main
    from engine.generate_cli import main as generate_main
    from ipc.serve_cli import main as serve_main

    monkeypatch.setenv("EPD_AUTHKEY", "k")
    for main in (generate_main, serve_main):
        rc = run_main(lambda main=main: main([]))
        _check(rc, capsys.readouterr().err, "--model is required", main)


def test_ctrl_c_exits_130(tiny_llava: Path) -> None:
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "generate.py"), "--model", str(tiny_llava),
                             "--prompt", "Describe the picture in detail.", "--max-tokens", "900", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        assert proc.stdout.read(1), "no output"  # streaming has started (the tiny model goes to 900 tokens)
        assert time.monotonic() < deadline
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted", err


def _parser_of(script: str, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    """The parser a script builds, caught at its parse_args call."""
    caught = []

    def catch(self: argparse.ArgumentParser, *args, **kwargs):
        caught.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    monkeypatch.setattr(sys, "argv", [script])
    with pytest.raises(SystemExit):
        runpy.run_path(str(ROOT / "scripts" / script), run_name="__main__")
    assert caught, f"{script} built no parser"
    return caught[0]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_has_defaults_and_text(script: str, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture) -> None:
    parser = _parser_of(script, monkeypatch)
    assert issubclass(parser.formatter_class, HelpFormatter), parser.formatter_class
    undocumented = [a.option_strings for a in parser._actions if a.option_strings and not a.help]
    assert not undocumented, f"{script}: flags without help text: {undocumented}"
    text = parser.format_help()
    for action in parser._actions:
        d = action.default
        unset = d is None or d is False or d == [] or d is argparse.SUPPRESS
        if action.option_strings and not unset and "default" not in (action.help or ""):
            assert f"(default: {action.default})" in " ".join(text.split()), (script, action.option_strings)
    if script == "serve.py":  # the CPU placement syntax is documented
        assert 'on the CPU, "E:cpu,cpu P:cpu D:cpu"' in " ".join(text.split())


def test_core_imports_without_the_http_extra(tiny_llava: Path) -> None:
    """The engine, the RPC server and the CLI import without fastapi / uvicorn / prometheus-client;
    `--api openai` then names the missing extra (exit 2, one line)."""
    import subprocess

    code = ("import sys\n"
            "for name in ('fastapi', 'uvicorn', 'prometheus_client', 'starlette'): sys.modules[name] = None\n"
            "import engine, ipc.server, ipc.media, ipc.serve_cli\n"
            "from engine import LLM\n"
            "from engine.cli import run_main\n"
            "from ipc.serve_cli import main\n"
            "sys.exit(run_main(lambda: main(['--model', sys.argv[1], '--port', '8123'])))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tiny_llava)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    _check(proc.returncode, proc.stderr, "--api openai needs the http extra", "no http extra")
