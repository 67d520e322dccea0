"""Image preprocessing off the single-threaded PIL path: a CPU thread pool, or the GPU.

    make_preprocessor(cfg, device, workers).preprocess(images) -> [N, 3, S, S]

Both equal `engine.images.ImageProcessor(cfg).preprocess(images)` (LLaVA-NeXT's tiles on the GPU:
engine/preprocess_anyres.py, built on GpuImagePreprocessor):
- CPU (`CpuImagePreprocessor`): the same per-image function on `workers` threads (PIL releases the
  GIL in decode and resize), so the output is identical by construction.
- GPU (`GpuImagePreprocessor`): decode (below), then resize with our CUDA kernels, which reproduce
  PIL's 8-bit resample bit for bit (epd_kernels/image/reference.py, tested against PIL), then one batched
  launch of HF center crop (zero pad) + rescale + normalize + HWC -> CHW through a [3, 256] table made
  by ImageProcessor's own numpy operations. Given the same decoded uint8 pixels the float32 output is
  ImageProcessor's bit for bit; bfloat16/float16 output is that rounded to nearest even.

JPEG decode on the GPU uses nvjpeg through torchvision (`torchvision.io.decode_jpeg(list, device=)`,
one batched call; the hardware JPEG engine where the GPU has one) when torchvision imports. The
worker runs with 32 CUDA hardware queues (ipc/worker.py): under CUDA's default of 8, nvjpeg's
internal streams shared a queue with the tower's and every decode waited for the tower (measured,
docs/benchmarks.md, session 11). nvjpeg also grows its buffers (cudaMalloc / cudaHostAlloc, which
synchronize the device) whenever a batch's bitstreams need more than any before, and such a decode
waits for all the GPU's work (a 1080p burst's decodes waited for the tower most of the time; a new
batch after warm-up on another waited for ~400 ms of GEMMs queued on another stream: session 13), so
`warm_up` makes them at a large JPEG's size (`WARM_JPEG_HW`) before the first request. nvjpeg's IDCT
and chroma upsampling differ from libjpeg's (PIL): decoded pixels differ by a few uint8 levels, so
for JPEGs the GPU output is within that tolerance of ImageProcessor's, not equal
(scripts/bench_preprocess.py measures it). An image goes to nvjpeg only when nvjpeg decodes what PIL
would (`nvjpeg_decodable`): JPEG data (bytes, a path or a base64 data URL) with PIL mode RGB (3
components; not grayscale, not CMYK), no Adobe marker, not progressive, no EXIF rotation
(orientation 2-8, which load_image applies), ending with the EOI marker (truncated data goes to PIL,
which rejects it), within the pixel limit. Everything else (PNG, WebP, PIL images, the excluded
JPEGs) is decoded by `load_image` on the CPU (on `workers` threads) and uploaded;
a batch that nvjpeg rejects is decoded that way too, so errors are ImageProcessor's.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from engine.images import (
    MAX_IMAGE_PIXELS,
    ImageError,
    ImageProcessor,
    ImageProcessorConfig,
    _shortest_edge_hw,
    hf_composites_alpha,
    load_image,
)
from epd_kernels.image import reference as image_ref

if TYPE_CHECKING:
    from engine.config import EngineConfig, ModelConfig

JPEG_SOI, JPEG_EOI = b"\xff\xd8\xff", b"\xff\xd9"
WARM_JPEG_HW = (3024, 4032)  # (height, width) of the JPEG whose decode buffers warm_up makes: a 12 MP photo
EXIF_ORIENTATION = 0x0112


def source_bytes(src: Any) -> bytes | None:
    """The encoded bytes of bytes / a path / a base64 data URL; None for PIL images and for sources
    that load_image should report on (missing file, bad base64)."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src)
    if isinstance(src, str) and src.startswith("data:"):
        header, sep, payload = src.partition(",")
        if not sep or not header.endswith(";base64"):
            return None
        try:
            return base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError):
            return None
    if isinstance(src, (str, Path)):
        try:
            return Path(src).read_bytes()
        except OSError:
            return None
    return None


def nvjpeg_decodable(data: bytes) -> bool:
    """True when nvjpeg decodes `data` to the image PIL would (up to IDCT rounding); the rules are in
    the module docstring. Reads the header only."""
    if not data.startswith(JPEG_SOI) or not data.rstrip(b"\x00").endswith(JPEG_EOI):
        return False
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            return (image.format == "JPEG" and image.mode == "RGB" and width * height <= MAX_IMAGE_PIXELS
                    and not image.info.get("progressive") and not image.info.get("progression")
                    and "adobe" not in image.info and image.getexif().get(EXIF_ORIENTATION, 1) not in range(2, 9))
    except Exception:
        return False


@functools.cache
@functools.cache
def _warm_jpeg() -> bytes:
    """A WARM_JPEG_HW JPEG of gradients and heavy noise (4:2:0, quality 90): bigger than a photo of
    that size, as nvjpeg's hardware path takes it."""
    h, w = WARM_JPEG_HW
    tile = np.random.default_rng(0).normal(0, 40, (504, 504, 3)).astype(np.float32)  # JPEG codes 8x8 blocks alone
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] + np.tile(tile, (h // 504, w // 504, 1))
    buf = io.BytesIO()
    Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def nvjpeg_available() -> bool:
    """torchvision imports (with its CUDA decode); it is optional: CI and CPU torch do without."""
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except Exception:
        return False
    return True


def on_stream(stream: torch.cuda.Stream | None):
    """torch.cuda.stream(stream), or nothing on the CPU path (None)."""
    return torch.cuda.stream(stream) if stream is not None else nullcontext()


@contextmanager
def on_side_stream(stream: torch.cuda.Stream | None) -> Iterator[None]:
    """Run the block's GPU work on `stream` (a preprocessing thread's own), then synchronize it:
    what the block made is ready for another stream (whose reader calls record_stream). None:
    the block runs as it is (the CPU path)."""
    if stream is None:
        yield
        return
    with torch.cuda.stream(stream):
        yield
    stream.synchronize()


def _pool(workers: int) -> ThreadPoolExecutor | None:
    if workers < 1:
        raise ImageError(f"image preprocessor: workers = {workers}; must be >= 1")
    return ThreadPoolExecutor(workers, thread_name_prefix="preprocess") if workers > 1 else None


class CpuImagePreprocessor:
    """ImageProcessor on `workers` threads: `preprocess(images) -> [N, 3, S, S]` float32 (CPU), equal to
    ImageProcessor.preprocess; the first failing image (in input order) raises, as there."""

    def __init__(self, cfg: ImageProcessorConfig, workers: int = 1) -> None:
        self.cfg = cfg
        self.processor = ImageProcessor(cfg)
        self._pool = _pool(workers)

    def preprocess_items(self, images: list[Any]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """ImageProcessor.preprocess_items on the pool: (pixels, each image's decoded (height, width))."""
        if self._pool is None or len(images) < 2:
            return self.processor.preprocess_items(images)
        loaded = list(self._pool.map(self.processor.load, images, range(len(images))))
        out = list(self._pool.map(self.processor.pixels, loaded))
        return torch.from_numpy(np.stack(out)), [(image.height, image.width) for image in loaded]

    def preprocess(self, images: list[Any]) -> torch.Tensor:
        if self._pool is None or len(images) < 2:
            return self.processor.preprocess(images)
        out = list(self._pool.map(self.processor.preprocess_one, images, range(len(images))))
        return torch.from_numpy(np.stack(out))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


class GpuImagePreprocessor:
    """`preprocess(images) -> [N, 3, S, S]` of `dtype` on a CUDA device; see the module docstring for
    what equals ImageProcessor bit for bit and what is within JPEG decode tolerance."""

    # when a dict: decode() and resize_normalize() stamp their host return times there
    # ("decode_end", "resize_end"; perf_counter), for the encoder's batch timeline
    marks: dict[str, float] | None = None

    def __init__(self, cfg: ImageProcessorConfig, device: str | torch.device = "cuda",
                 dtype: torch.dtype = torch.float32, workers: int = 1, nvjpeg: bool = True) -> None:
        from epd_kernels.image import cuda as image_ops  # needs the built extension

        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ImageError(f"GpuImagePreprocessor needs a CUDA device, got {self.device}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if cfg.do_resize and cfg.resample not in image_ref.FILTERS:
            raise ImageError(f"image processor: resample {cfg.resample} has no GPU path; supported: "
                             + ", ".join(f"{k} ({v})" for k, v in image_ref.FILTER_NAMES.items()))
        self.cfg, self.dtype, self._ops = cfg, dtype, image_ops
        self.composite_alpha = hf_composites_alpha() if cfg.composite_alpha is None else cfg.composite_alpha
        lut = image_ref.normalize_lut(cfg.rescale_factor if cfg.do_rescale else None,
                                      cfg.image_mean if cfg.do_normalize else None,
                                      cfg.image_std if cfg.do_normalize else None)
        self._lut = torch.from_numpy(lut).to(self.device)  # [3, 256] float32
        self._pool = _pool(workers)
        self.nvjpeg = nvjpeg and nvjpeg_available()

    def preprocess(self, images: list[Any]) -> torch.Tensor:
        """Images (anything load_image accepts) -> [N, 3, S, S] of dtype on the device."""
        return self.resize_normalize(self.decode(images))

    def preprocess_items(self, images: list[Any]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """(pixels [N, 3, S, S] on the device, each image's decoded (height, width)): the
        interface the engine's image processors share (engine/images_anyres.select_items)."""
        decoded = self.decode(images)
        return self.resize_normalize(decoded), [(int(x.shape[0]), int(x.shape[1])) for x in decoded]

    def decode(self, images: list[Any]) -> list[torch.Tensor]:
        """Each image as [H, W, 3] uint8 on the device (nvjpeg results are permuted [3, H, W] views)."""
        out: list[torch.Tensor | None] = [None] * len(images)
        jpegs, on_cpu = [], []
        for i, src in enumerate(images):
            data = source_bytes(src) if self.nvjpeg else None
            (jpegs if data is not None and nvjpeg_decodable(data) else on_cpu).append((i, data))
        if jpegs:
            raw = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for _, data in jpegs]
            try:
                decoded = self._nvjpeg(raw)
            except RuntimeError:  # nvjpeg rejected one: PIL decodes them all and reports errors
                on_cpu = sorted(on_cpu + jpegs)
            else:
                for (i, _), chw in zip(jpegs, decoded):
                    out[i] = chw.permute(1, 2, 0)
        indices = [i for i, _ in on_cpu]
        load = lambda i: np.array(load_image(images[i], i, self.composite_alpha))  # [H, W, 3], writable
        pixels = self._pool.map(load, indices) if self._pool is not None else map(load, indices)
        for i, x in zip(indices, pixels):
            out[i] = torch.from_numpy(x).to(self.device)
        if self.marks is not None:
            self.marks["decode_end"] = time.perf_counter()
        return out

    def _nvjpeg(self, raw: list[torch.Tensor]) -> list[torch.Tensor]:
        """[3, H, W] uint8 on the device per JPEG, decoded by nvjpeg (torchvision). Raises
        RuntimeError if nvjpeg rejects one."""
        from torchvision.io import ImageReadMode, decode_jpeg

        # nvjpeg's hardware decode writes its output when it is called, not in stream order
        # (torchcodec PR #1634 measured it on the H100): nothing queued on this stream may still
        # use memory the allocator hands out for it. Idle here (each call ends synchronized): cheap.
        torch.cuda.current_stream(self.device).synchronize()
        return decode_jpeg(raw, mode=ImageReadMode.RGB, device=self.device)

    def warm_up(self, count: int) -> None:
        """Decode `count` copies of a large, high-entropy JPEG (WARM_JPEG_HW, ~8 MB) once, so that
        nvjpeg's buffers are that large before the first request and a batch of up to `count` such
        images never grows them (growing synchronizes the device: see the module docstring). A
        no-op without nvjpeg."""
        if not self.nvjpeg or count <= 0:
            return
        raw = torch.frombuffer(bytearray(_warm_jpeg()), dtype=torch.uint8)
        stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(stream):
            self._nvjpeg([raw] * count)
        stream.synchronize()

    def target_hw(self, height: int, width: int) -> tuple[int, int]:
        """The resized (height, width), as ImageProcessor computes it."""
        cfg = self.cfg
        if not cfg.do_resize:
            return height, width
        return cfg.resize_hw or _shortest_edge_hw(height, width, cfg.shortest_edge or cfg.image_size)

    def resize_normalize(self, pixels: list[torch.Tensor | np.ndarray]) -> torch.Tensor:
        """Decoded images ([H, W, 3] uint8, CPU or device, any strides) -> [N, 3, S, S] of dtype: PIL-exact
        resize per image into one flat buffer, then one batched crop + normalize launch."""
        size = self.cfg.image_size
        if not pixels:
            return torch.empty((0, 3, size, size), dtype=self.dtype, device=self.device)
        images = [x.to(self.device) if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x)).to(self.device)
                  for x in pixels]
        for i, x in enumerate(images):
            if x.dtype != torch.uint8 or x.dim() != 3 or x.shape[2] != 3:
                raise ImageError(f"image {i}: decoded pixels must be [H, W, 3] uint8, got {x.dtype} {tuple(x.shape)}")
        hws = [self.target_hw(x.shape[0], x.shape[1]) for x in images]
        offsets = np.cumsum([0] + [h * w * 3 for h, w in hws])
        flat = torch.empty(int(offsets[-1]), dtype=torch.uint8, device=self.device)
        for x, (h, w), start in zip(images, hws, offsets):
            dst = flat[int(start): int(start) + h * w * 3].view(h, w, 3)
            if self.cfg.do_resize:
                self._ops.resize(x, (h, w), self.cfg.resample, out=dst)  # a copy when the size is unchanged
            else:
                dst.copy_(x)
        meta = torch.tensor([[int(o), h, w] for o, (h, w) in zip(offsets, hws)], dtype=torch.int64)
        out = self._ops.crop_normalize(flat, meta.to(self.device), self._lut, size, self.dtype)
        if self.marks is not None:
            self.marks["resize_end"] = time.perf_counter()
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


def make_preprocessor(cfg: ImageProcessorConfig, device: str | torch.device = "cpu", workers: int = 1,
                      dtype: torch.dtype = torch.float32) -> CpuImagePreprocessor | GpuImagePreprocessor:
    """The preprocessor for `device`: GPU kernels on a CUDA device (workers decode non-nvjpeg images),
    else ImageProcessor on `workers` threads (float32 only)."""
    if torch.device(device).type == "cuda":
        return GpuImagePreprocessor(cfg, device, dtype, workers)
    if dtype != torch.float32:
        raise ImageError(f"image preprocessor: the CPU path makes float32, got dtype {dtype}")
    return CpuImagePreprocessor(cfg, workers)


def stage_image_processor(config: EngineConfig, cfg: ModelConfig):
    """The image processor of whatever encodes (an EPD encoder, a pd prefill, the LLM's image
    workers): on a GPU with the cuda backend and config.image_preprocess "auto", images are
    decoded (nvjpeg) and preprocessed on that GPU, batched (LLaVA-NeXT's tiles by
    engine/preprocess_anyres.py); otherwise (the CPU, the torch backend, "cpu") the checkpoint's
    PIL processor, on config.image_workers threads for LLaVA-1.5. Each has
    preprocess_items(images) -> (pixels, decoded sizes)."""
    from engine.images_anyres import AnyresImageProcessor, image_processor_for

    processor = image_processor_for(config.model, cfg)
    device = torch.device(config.device)
    on_gpu = config.image_preprocess == "auto" and device.type == "cuda" and config.backend == "cuda"
    if isinstance(processor, AnyresImageProcessor):
        if not on_gpu:
            return processor
        from engine.preprocess_anyres import GpuAnyresPreprocessor

        gpu = GpuImagePreprocessor(processor.cfg, device, config.torch_dtype, config.image_workers)
        gpu.warm_up(config.max_images_per_batch)
        return GpuAnyresPreprocessor(gpu, processor.pinpoints)
    if on_gpu:
        gpu = GpuImagePreprocessor(processor.cfg, device, config.torch_dtype, config.image_workers)
        gpu.warm_up(config.max_images_per_batch)
        return gpu
    return CpuImagePreprocessor(processor.cfg, config.image_workers)

