"""Small-batch GEMV CUDA ops for decode (linear, gate_up_silu). Same names and signatures as
epd_kernels/reference.py; outputs are allocated here and filled by epd_kernels._epd_C.

The kernels take x with at most MAX_ROWS rows (leading dims flattened), K % 8 == 0, fp16 or bf16,
contiguous 16-byte-aligned x and w on one CUDA device. Any other call runs torch (cuBLAS) instead,
so callers may use these for every shape.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from epd_kernels import _epd_C, reference
from epd_kernels import elementwise as ew

MAX_ROWS = 8  # rows of x the kernels take (kGemvMaxRows in params.h)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def _kernel_rows(x: torch.Tensor, w: torch.Tensor) -> int:
    """Rows of x the kernel would take as [M, K], or -1 where the call must go to torch."""
    if not (x.is_cuda and w.device == x.device and x.dtype in _KERNEL_DTYPES and w.dtype == x.dtype):
        return -1
    if x.dim() < 1 or w.dim() != 2:
        return -1
    k = x.shape[-1]
    rows = math.prod(x.shape[:-1])
    if k == 0 or k % 8 or w.shape[1] != k or w.shape[0] == 0 or not 0 < rows <= MAX_ROWS:
        return -1
    if not (x.is_contiguous() and w.is_contiguous()) or x.data_ptr() % 16 or w.data_ptr() % 16:
        return -1
    return rows


def _silu_and_mul(y: torch.Tensor) -> torch.Tensor:
    """silu_and_mul over the last dim of y [..., 2I]: our elementwise kernel where it runs, else torch."""
    if y.is_cuda and y.dtype in (torch.float16, torch.bfloat16, torch.float32):
        return ew.silu_and_mul(y.reshape(-1, y.shape[-1])).view(*y.shape[:-1], y.shape[-1] // 2)
    return reference.silu_and_mul(y)


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ w [N, K]^T (+ bias) -> [..., N] of x.dtype, fp32 accumulation.

    At most 8 rows of x (fp16 / bf16, K % 8 == 0, contiguous), no bias: the weight-streaming kernel;
    anything else: F.linear. No host sync; graph-capturable."""
    if bias is not None:
        return F.linear(x, w, bias)
    rows = _kernel_rows(x, w)
    if rows < 0:
        return F.linear(x, w)
    out = torch.empty((rows, w.shape[0]), dtype=x.dtype, device=x.device)
    _epd_C.linear(out, x.view(rows, x.shape[-1]), w)
    return out.view(*x.shape[:-1], w.shape[0])


def gate_up_silu(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """silu_and_mul(linear(x, w)) for the fused gate | up weight w [2I, K]: x [..., K] -> [..., I] of x.dtype.

    gate = round(x @ w[:I]^T), up = round(x @ w[I:]^T), out = round(round(silu(gate)) * up), as
    reference.silu_and_mul rounds. The kernel computes gate row i and up row I + i together, so the
    [..., 2I] intermediate is never written; it takes the same shapes as linear, other calls run
    F.linear followed by the silu_and_mul kernel."""
    rows = _kernel_rows(x, w)
    if rows < 0 or w.shape[0] % 2:
        return _silu_and_mul(F.linear(x, w))
    inter = w.shape[0] // 2
    out = torch.empty((rows, inter), dtype=x.dtype, device=x.device)
    _epd_C.gate_up_silu(out, x.view(rows, x.shape[-1]), w)
    return out.view(*x.shape[:-1], inter)
