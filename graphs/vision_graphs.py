"""Vision tower + projector under CUDA graphs, one graph per item-batch bucket.

An item is one tower input (a CLIP image, or a LLaVA-NeXT base or tile: tiles are independent
batch rows); every item has the same number of tokens, so a bucket fixes every shape. Images are copied
into a static pixel buffer; padded rows hold stale pixels whose embeddings are never read.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from graphs.capture import capture_graph


def image_buckets(max_images: int) -> list[int]:
    return sorted({b for b in (1, 2, 4, 8, 16, 32, 64) if b < max_images} | {max_images})


class VisionGraphs:
    """forward: pixels [N, 3, S, S] -> embeddings [N, tokens_per_image, hidden] (the model's
    encode_images with its ops bound); image_size S, dtype and device of the pixel buffer;
    max_images: the largest bucket."""

    def __init__(
        self, *, forward: Callable[[torch.Tensor], torch.Tensor], image_size: int, dtype: torch.dtype,
        device: torch.device, max_images: int,
    ) -> None:
        self.forward = forward
        self.buckets = image_buckets(max_images)
        self.pixels = torch.zeros(max_images, 3, image_size, image_size, dtype=dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # bucket -> [bucket, tokens_per_image, hidden]
        self.pool = None
        self.capture_log: list[tuple[int, float, int]] = []  # (bucket, seconds, bytes)

    def _forward(self, n: int) -> torch.Tensor:
        return self.forward(self.pixels[:n])

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Warm up once at the largest bucket, then capture largest first into one pool."""
        self._forward(self.buckets[-1])
        torch.cuda.synchronize()
        for n in sorted(self.buckets, reverse=True):
            graph, output, self.pool, seconds, grown = capture_graph(partial(self._forward, n), self.pool)
            self.outputs[n] = output
            self.graphs[n] = graph  # published last: run() may pick it from now on
            self.capture_log.append((n, seconds, grown))

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
