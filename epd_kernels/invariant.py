"""Batch-invariant ops: `batch_invariant(ops)` is a backend (epd_kernels/reference.py or
epd_kernels/cuda_ops.py) whose every output row is a function of that row's own inputs (and, for
attention, of its own sequence's cache) -- never of how many rows or sequences share the call, of
the decode graph's batch bucket, or of which process runs it. With it (EngineConfig.deterministic)
a request's tokens and logits are bit-identical alone or in any batch, with one encoder or two, in
the aggregated engine or split E/P/D.

What varies with the batch in the plain backends, and what is done instead:
- GEMMs: cuBLAS and MKL pick a kernel (tiling, split-K, a GEMV path for a few rows) by shape, so a
  row's reduction order depends on M. Here every linear runs on fixed [ROWS, K] blocks, each copied
  into a fresh zero-padded buffer (same shape and alignment every call: the same kernel), and a
  row's result does not depend on the other rows of its block. The decode GEMV kernels are not used.
- Paged decode attention (cuda): the split count follows B and the block table's width. Here
  splits have a fixed size and the reduce pass always runs (`invariant=True`).
- Paged prefill attention (cuda): 64 or 128 query rows per CTA by grid size; here always 64.
- Vision attention: one image per call, so the tile choice never sees the batch.
RMSNorm, LayerNorm, RoPE, activations, embedding and sampling work row by row with a plan that
depends only on the hidden size: they are batch-invariant as they are.

The cost is the padding and the lost small-batch kernels: measured in docs/benchmarks.md.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

ROWS = 128  # rows of every GEMM call here; cuBLAS at 128 rows costs what 64 cost (docs/benchmarks.md)


def batch_invariant(ops: types.ModuleType) -> types.ModuleType:
    """A copy of the ops module `ops` with the batch-dependent functions replaced (see above); its
    name ends with ops' own, so callers that tell backends apart by name still can."""
    mod = types.ModuleType(f"batch_invariant.{ops.__name__}", __doc__)
    mod.__dict__.update({k: v for k, v in vars(ops).items() if not k.startswith("__")})
    mod.base = ops

    def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., K] @ w [N, K]^T (+ bias): F.linear on [ROWS, K] blocks of x's rows."""
        k = x.shape[-1]
        rows = x.reshape(-1, k)
        out = torch.empty((rows.shape[0], w.shape[0]), dtype=x.dtype, device=x.device)
        for start in range(0, rows.shape[0], ROWS):
            part = rows[start: start + ROWS]
            block = torch.zeros((ROWS, k), dtype=x.dtype, device=x.device)
            block[: part.shape[0]] = part
            out[start: start + part.shape[0]] = F.linear(block, w, bias)[: part.shape[0]]
        return out.view(*x.shape[:-1], w.shape[0])

    def gate_up_silu(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """silu_and_mul(linear(x, w)) for w [2I, K] = gate | up, through the blocked linear."""
        y = linear(x, w)
        return ops.silu_and_mul(y.reshape(-1, y.shape[-1])).view(*y.shape[:-1], y.shape[-1] // 2)

    def attention_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """ops.attention_dense one image at a time."""
        return torch.cat([ops.attention_dense(q[i: i + 1], k[i: i + 1], v[i: i + 1], scale)
                          for i in range(q.shape[0])]) if q.shape[0] else ops.attention_dense(q, k, v, scale)

    def paged_attention_prefill(*args, **kwargs) -> torch.Tensor:
        return ops.paged_attention_prefill(*args, **kwargs, invariant=True)

    def paged_attention_decode(*args, **kwargs) -> torch.Tensor:
        return ops.paged_attention_decode(*args, **kwargs, invariant=True)

    for fn in (linear, gate_up_silu, attention_dense, paged_attention_prefill, paged_attention_decode):
        setattr(mod, fn.__name__, fn)
    return mod
