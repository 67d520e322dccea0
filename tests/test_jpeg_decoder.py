"""kernels/jpeg: the hardware JPEG decoder. GPU tests (device machine): the same pixels as torchvision's
nvjpeg decode, None for what the hardware does not take, errors by image, and no wait for other
streams' work (what it was made for). The CPU test checks the build's rules for finding nvjpeg."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


def jpeg(h: int, w: int, seed: int, **save: object) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), (xx * yy) % 256], -1)
    x = np.clip(base + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format="JPEG", quality=save.pop("quality", 90), **save)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def test_nvjpeg_paths_need_header_and_library(tmp_path, monkeypatch) -> None:
    from kernels import build

    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    monkeypatch.setitem(__import__("sys").modules, "nvidia", None)  # no wheel either
    assert build.nvjpeg_paths() is None
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "nvjpeg.h").write_text("")
    assert build.nvjpeg_paths() is None, "a header without the library is not enough"
    (tmp_path / "lib64").mkdir()
    (tmp_path / "lib64" / "libnvjpeg.so.13").write_text("")
    (tmp_path / "lib64" / "libnvjpeg.so.13.3.2").write_text("")
    assert build.nvjpeg_paths() == (tmp_path / "include", tmp_path / "lib64", "libnvjpeg.so.13")
    assert "kernels/jpeg/decoder.cpp" not in build.sources(), "_epd_C must not need nvjpeg"


def _decoder():
    if not torch.cuda.is_available():
        return None
    from kernels.jpeg import decoder

    return decoder(torch.device("cuda", torch.cuda.current_device()))


needs_decoder = pytest.mark.skipif(_decoder() is None,
                                   reason="needs CUDA, kernels._epd_jpeg and a GPU with a hardware JPEG engine")


@pytest.mark.gpu
@needs_decoder
def test_hardware_decode_equals_torchvision() -> None:
    from torchvision.io import ImageReadMode, decode_jpeg

    cases = [jpeg(1080, 1920, 0), jpeg(37, 53, 1), jpeg(1, 1, 2), jpeg(3024, 4032, 3),
             jpeg(333, 500, 4, subsampling=0), jpeg(335, 337, 5, subsampling=1), jpeg(17, 2000, 6, quality=40)]
    got = _decoder().decode(cases)
    torch.cuda.synchronize()
    assert all(x is not None for x in got), "baseline RGB JPEGs all go to the hardware"
    expected = decode_jpeg(cases, mode=ImageReadMode.RGB, device="cuda")
    for i, (a, b) in enumerate(zip(got, expected)):
        assert a.shape == b.shape and a.dtype == torch.uint8, f"image {i}: {a.shape} vs {b.shape}"
        assert torch.equal(a, b), f"image {i}: max diff {(a.int() - b.int()).abs().max().item()}"
    again = _decoder().decode(cases[:3])  # another batch size: re-initialized
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(again, expected[:3]))


@pytest.mark.gpu
@needs_decoder
def test_what_the_hardware_does_not_take_is_none() -> None:
    gray = io.BytesIO()
    Image.fromarray(np.full((40, 30), 7, np.uint8)).save(gray, format="JPEG")
    progressive = jpeg(64, 48, 7, progressive=True)
    png = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png, format="PNG")
    inputs = [jpeg(64, 48, 8), torch.frombuffer(bytearray(gray.getvalue()), dtype=torch.uint8), progressive,
              torch.frombuffer(bytearray(png.getvalue()), dtype=torch.uint8), jpeg(20, 30, 9)]
    got = _decoder().decode(inputs)
    torch.cuda.synchronize()
    assert [x is not None for x in got] == [True, False, False, False, True]
    assert got[0].shape == (3, 64, 48) and got[4].shape == (3, 20, 30)
    with pytest.raises(RuntimeError, match="image 1: expected a non-empty 1-D uint8 CPU tensor"):
        _decoder().decode([jpeg(8, 8, 0), torch.zeros(0, dtype=torch.uint8)])


def no_wait_check() -> str:
    """~280 ms of GEMMs queued on another stream, then a decode of 8 1080p JPEGs: its time to done.
    Run in a fresh process (CUDA_DEVICE_MAX_CONNECTIONS is read when the context is made)."""
    batch = [jpeg(1080, 1920, s) for s in range(8)]
    dec, other = torch.cuda.Stream(), torch.cuda.Stream()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    with torch.cuda.stream(dec):
        for _ in range(3):
            _decoder().decode(batch)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(other):
        start.record()
        for _ in range(200):
            a @ a
        end.record()
    end.synchronize()
    gemm_ms = start.elapsed_time(end)
    with torch.cuda.stream(other):
        for _ in range(200):
            a @ a
    t0 = time.perf_counter()
    with torch.cuda.stream(dec):
        out = _decoder().decode(batch)
    dec.synchronize()
    decode_ms = 1e3 * (time.perf_counter() - t0)
    torch.cuda.synchronize()
    assert all(x is not None for x in out)
    return f"{decode_ms:.1f} {gemm_ms:.1f}"


@pytest.mark.gpu
@needs_decoder
@pytest.mark.parametrize("connections", ["8", "32"])
def test_decode_does_not_wait_for_other_streams(connections: str) -> None:
    """A decode must not wait for another stream's work. Session 10 measured it waiting (317 ms with
    410 ms of GEMMs queued) at CUDA's default of 8 hardware queues: the suspect is a false
    dependency, nvjpeg's eight internal streams sharing queues with the busy stream. The workers
    run with 32 (ipc/worker.py); with 8 this test records what happens (xfail, not a pass)."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "CUDA_DEVICE_MAX_CONNECTIONS": connections, "PYTHONPATH": str(root)}
    code = "import sys; sys.path.insert(0, 'tests'); import test_jpeg_decoder as t; print(t.no_wait_check())"
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    decode_ms, gemm_ms = map(float, proc.stdout.split()[-2:])
    print(f"CUDA_DEVICE_MAX_CONNECTIONS={connections}: decode {decode_ms:.1f} ms with {gemm_ms:.1f} ms of GEMMs")
    assert gemm_ms > 60, f"the GEMMs took {gemm_ms:.1f} ms: too short to tell a wait"
    waited = decode_ms >= gemm_ms / 2
    if connections == "8" and waited:
        pytest.xfail(f"8 queues: decode {decode_ms:.1f} ms with {gemm_ms:.1f} ms of GEMMs on another stream")
    assert not waited, f"decode took {decode_ms:.1f} ms with {gemm_ms:.1f} ms of GEMMs on another stream"
