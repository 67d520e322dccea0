"""kernels/jpeg: the hardware JPEG decoder. GPU tests (device machine): the same pixels as torchvision's
nvjpeg decode, None for what the hardware does not take, errors by image, and no wait for other
streams' work (what it was made for). The CPU test checks the build's rules for finding nvjpeg."""

from __future__ import annotations

import io
import time

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


@pytest.mark.gpu
@needs_decoder
def test_decode_does_not_wait_for_other_streams() -> None:
    """~150 ms of GEMMs queued on another stream; a decode on this one must not wait for them (the
    default nvjpeg allocators' cudaFree did). Generous margins: only a device-wide wait fails it."""
    batch = [jpeg(1080, 1920, s) for s in range(8)]
    dec, other = torch.cuda.Stream(), torch.cuda.Stream()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    with torch.cuda.stream(dec):
        for _ in range(3):
            _decoder().decode(batch)
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(other):
        start.record()
        for _ in range(200):
            a @ a
        end.record()
    end.synchronize()
    gemm_ms = start.elapsed_time(end)
    assert gemm_ms > 60, f"the GEMMs took {gemm_ms:.1f} ms: too short to tell a wait"
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
    assert decode_ms < gemm_ms / 2, f"decode took {decode_ms:.1f} ms with {gemm_ms:.1f} ms of GEMMs on another stream"
