"""Vision tower + projector under CUDA graphs, one graph per image-batch bucket.

Every image has the same number of tokens, so a bucket fixes every shape. Images are copied
into a static pixel buffer; padded rows hold stale pixels whose embeddings are never read.
"""

from __future__ import annotations

import time

import torch


def image_buckets(max_images: int) -> list[int]:
    return sorted({b for b in (1, 2, 4, 8, 16, 32, 64) if b < max_images} | {max_images})


class VisionGraphs:
    def __init__(self, runner, max_images: int) -> None:
        self.runner = runner
        self.buckets = image_buckets(max_images)
        size = runner.cfg.vision.image_size
        self.pixels = torch.zeros(max_images, 3, size, size, dtype=runner.dtype, device=runner.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # bucket -> [bucket, tokens_per_image, hidden]
        self.pool = None
        self.capture_log: list[tuple[int, float, int]] = []  # (bucket, seconds, bytes)

    def _forward(self, n: int) -> torch.Tensor:
        return self.runner.model.encode_images(self.runner.ops, self.pixels[:n])

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Warm up once at the largest bucket, then capture largest first into one pool."""
        self._forward(self.buckets[-1])
        torch.cuda.synchronize()
        for n in sorted(self.buckets, reverse=True):
            start, mem = time.perf_counter(), torch.cuda.memory_allocated()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                self.outputs[n] = self._forward(n)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[n] = graph
            self.capture_log.append((n, time.perf_counter() - start, torch.cuda.memory_allocated() - mem))

    @torch.inference_mode()
    def run(self, pixel_values: torch.Tensor) -> torch.Tensor | None:
        """[N, 3, S, S] -> [N, tokens_per_image, hidden] by graph replay; None if no bucket fits.
        The result is a view of a static buffer: copy it out before the next call."""
        n = pixel_values.shape[0]
        bucket = next((b for b in self.buckets if b >= n and b in self.graphs), None)
        if bucket is None:
            return None
        self.pixels[:n].copy_(pixel_values, non_blocking=True)
        self.graphs[bucket].replay()
        return self.outputs[bucket][:n]
