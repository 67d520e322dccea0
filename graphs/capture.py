"""The one CUDA-graph capture step that decode and vision graphs share."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch


class Captured(NamedTuple):
    graph: torch.cuda.CUDAGraph
    output: Any  # what fn returned: static tensors that each replay rewrites
    pool: Any  # the memory pool to hand to the next capture (the one given, else this graph's)
    seconds: float  # wall time of the capture
    bytes: int  # growth of torch.cuda.memory_allocated() during the capture


def capture_graph(fn: Callable[[], Any], pool: Any = None, stream: torch.cuda.Stream | None = None) -> Captured:
    """Capture fn() into a new CUDA graph in `pool` (None: a new pool, returned in Captured.pool),
    on `stream` (None: torch's side stream for capture), with capture_error_mode="thread_local"
    so that other threads may keep running eager work meanwhile. The caller warms fn up first
    (cuBLAS handles and lazy state are made outside capture)."""
    start, mem = time.perf_counter(), torch.cuda.memory_allocated()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
        output = fn()
    seconds, grown = time.perf_counter() - start, torch.cuda.memory_allocated() - mem
    return Captured(graph, output, pool if pool is not None else graph.pool(), seconds, grown)
