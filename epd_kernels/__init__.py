"""Ops and their backends.

Every op the model calls lives in a backend module with the same function names:
`epd_kernels.reference` (torch, runs anywhere; the oracle) and, where the CUDA extension
is built, `epd_kernels.cuda_ops` (our kernels + cuBLAS). `get_backend` picks one.
"""

from __future__ import annotations

import types

import torch

BACKENDS = ("torch", "cuda", "auto")


def cuda_available() -> bool:
    """True when a GPU is present and the compiled extension imports."""
    if not torch.cuda.is_available():
        return False
    try:
        from epd_kernels import cuda_ops  # noqa: F401
    except ImportError:
        return False
    return True


def get_backend(name: str, device: torch.device, dtype: torch.dtype) -> types.ModuleType:
    """Return the ops module for `name` ("torch" | "cuda" | "auto") on `device`.

    auto = cuda for bf16/fp16 on a GPU with the extension built, torch otherwise."""
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r} is not one of {', '.join(BACKENDS)}")
    half = dtype in (torch.bfloat16, torch.float16)
    if name == "auto":
        name = "cuda" if device.type == "cuda" and half and cuda_available() else "torch"
    if name == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend 'cuda' needs a CUDA device, got device {device}")
        if not half:
            raise ValueError(f"backend 'cuda' runs bfloat16 or float16, got {dtype}; use backend 'torch' for fp32")
        try:
            from epd_kernels import cuda_ops
        except ImportError as e:
            raise ValueError(f"backend 'cuda' is not available: the CUDA extension did not import ({e})") from e
        return cuda_ops
    from epd_kernels import reference

    return reference
