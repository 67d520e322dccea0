"""The request front end: validation, prompt building, tokenization and image checks, shared
by the in-process LLM and the EPD orchestrator. Errors name the field and the limit. (Its
tokenizer also detokenizes the outputs: engine/output_processor.py.)"""

from __future__ import annotations

import random
import threading
from typing import Any

import torch

from engine.config import EngineConfig, ModelConfig
from engine.images import check_image, data_url_bytes
from engine.images_anyres import checked_sizes, image_processor_for
from engine.mm_cache import PixelCache, cached_pixels, image_key, item_keys
from engine.preprocess import on_side_stream, stage_image_processor
from engine.request import Request, Sequence
from engine.sampling import RequestError, SamplingParams
from engine.schedulers import blocks_for
from engine.tokenizer import Tokenizer


class InputProcessor:
    """kv_blocks, mm_blocks: what one request may use of the KV cache and the MM arena (EPD:
    the smallest stage's; the orchestrator sets them once the stages have sized their arenas).
    config must be resolved (EngineConfig.for_model)."""

    def __init__(self, config: EngineConfig, cfg: ModelConfig, kv_blocks: int, mm_blocks: int) -> None:
        self.config, self.cfg = config, cfg
        self.kv_blocks, self.mm_blocks = kv_blocks, mm_blocks
        self.tokenizer = Tokenizer(config.model, cfg)
        self.image_processor = image_processor_for(config.model, cfg) if cfg.vision else None
        self._preprocessor = None  # stage_processor(): on a GPU where it can (stage_image_processor)
        self._lock, self._local = threading.Lock(), threading.local()
        self.pixel_cache = PixelCache(config.pixel_cache_bytes) if config.pixel_cache_bytes else None
        self._rng = random.Random(config.seed)
        self._next_id = 0

    def make_sequence(
        self, request: Request | str, sampling: SamplingParams | None = None, preprocess: bool = True
    ) -> tuple[Sequence, list[Any]]:
        """Validate and tokenize one request. Returns the sequence and its images: with
        `preprocess`, seq.pixel_values holds their items ready for the tower; otherwise only their
        headers are checked (engine.images.check_image), and the caller ships the sources
        elsewhere. Either way seq.image_sizes holds each image's (height, width) from its header,
        from which its token count and row layout follow."""
        if not isinstance(request, (Request, str)):
            raise RequestError(f"request must be a Request or a prompt string, got {type(request).__name__}")
        req = Request(prompt=request) if isinstance(request, str) else request
        req.validate()  # again: fields may have been assigned after construction
        if sampling is not None and not isinstance(sampling, SamplingParams):
            raise RequestError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        sp = req.sampling or sampling or SamplingParams()
        # a data URL's base64 decoded once, here: the header check, the key and the encoder read the bytes
        images = [data_url_bytes(x, i) if isinstance(x, str) and x.startswith("data:") else x
                  for i, x in enumerate(req.images or [])]
        if images and self.image_processor is None:
            raise RequestError(f"{self.cfg.architecture} takes no images; got {len(images)}")
        sizes = [check_image(image, i) for i, image in enumerate(images)]  # (height, width) from the headers
        text = self.tokenizer.build_prompt(req.prompt, len(images), raw=req.raw_prompt)
        ids = self.tokenizer.encode(text, sizes)
        vocab, config = self.cfg.text.vocab_size, self.config
        if any(t >= vocab for t in sp.stop_token_ids):
            raise RequestError(f"sampling.stop_token_ids {sp.stop_token_ids}: ids must be < vocab size {vocab}")
        total = len(ids) + sp.max_tokens
        if total > config.max_model_len:
            layouts = [self.cfg.image_layout(h, w) for h, w in sizes]
            of_images = (f" ({sum(x.num_tokens for x in layouts)} of them for {len(sizes)} image(s))"
                         if sizes else "")
            raise RequestError(f"prompt has {len(ids)} tokens{of_images} and max_tokens is {sp.max_tokens}: "
                               f"{total} > the context length {config.max_model_len}")
        # n samples share the prompt's full blocks; each needs the rest (its copy of the last
        # partial prompt block, then its answer)
        shared = len(ids) // config.block_size
        blocks_needed = shared + sp.n * (blocks_for(total, config.block_size) - shared)
        if blocks_needed > self.kv_blocks:
            samples = f", {sp.n} samples" if sp.n > 1 else ""
            raise RequestError(f"request needs {blocks_needed} KV blocks ({total} tokens{samples}); the cache has "
                               f"{self.kv_blocks}; raise kv_cache_tokens")
        if sp.n > config.max_num_seqs:
            raise RequestError(f"sampling.n = {sp.n}; each sample is a decode row and max_num_seqs is "
                               f"{config.max_num_seqs}")
        counts = [self.cfg.image_layout(h, w).num_items for h, w in sizes]  # items (MM blocks) per image
        items = sum(counts)
        if items > self.mm_blocks:
            what = f"{len(images)} images" + (f" of {items} vision-tower items (bases + tiles)" if self.cfg.is_anyres
                                              else "")
            raise RequestError(f"request has {what}; at most {self.mm_blocks} fit the MM arena "
                               "(raise max_images_per_batch)")
        # a key per item (image key:item), read without decoding: the encoder cache's unit
        keys = item_keys([image_key(image, i) for i, image in enumerate(images)], counts) if config.mm_cache else []
        pixels = self.preprocess(images, sizes, keys) if preprocess and images else None
        stops = set(sp.stop_token_ids) | (set() if sp.ignore_eos else set(self.tokenizer.eos_token_ids))
        seq = Sequence(
            seq_id=self._next_id,
            prompt_ids=ids,
            sampling=sp,
            seed=sp.seed if sp.seed is not None else self._rng.getrandbits(63),
            stop_token_ids=frozenset(stops),
            pixel_values=pixels,
            image_sizes=sizes,
            mm_keys=keys,
        )
        self._next_id += 1
        return seq, images

    def preprocess(self, images: list[Any], sizes: list[tuple[int, int]], keys: list[str] = ()) -> torch.Tensor:
        """The tower's inputs (items) for a sequence's images, decoded and checked against the
        sizes its tokens were counted for (seq.image_sizes); with keys (seq.mm_keys, one per
        item), images seen before come from the pixel cache. On a GPU with the cuda backend (and
        image_preprocess "auto") on the device, made on this thread's own CUDA stream and
        synchronized: the caller reads them on its stream (record_stream). Thread-safe: the
        image workers run it."""
        processor = self.stage_processor()

        def make(which: list[int]) -> torch.Tensor:
            pixels, decoded = processor.preprocess_items([images[i] for i in which])
            checked_sizes(decoded, [sizes[i] for i in which], self.cfg)  # tokens were counted for these sizes
            return pixels

        counts = [self.cfg.image_layout(h, w).num_items for h, w in sizes]
        stream = self._thread_stream()
        with on_side_stream(stream):  # no pixel cache on the GPU (engine/roles/base._pixel_cache says why)
            pixels = cached_pixels(make, counts, keys, self.pixel_cache if stream is None else None)
        return pixels

    def stage_processor(self):
        """The image preprocessor (made once, thread-safe): on a GPU it warms nvjpeg when made,
        which the aggregated engine does at start rather than in its first request."""
        with self._lock:
            if self._preprocessor is None:
                self._preprocessor = stage_image_processor(self.config, self.cfg)
            return self._preprocessor

    def _thread_stream(self) -> torch.cuda.Stream | None:
        """This thread's CUDA stream for preprocessing on the device (None: not on a GPU)."""
        if not hasattr(self._local, "stream"):
            device = torch.device(self.config.device)
            on_gpu = getattr(self._preprocessor, "device", torch.device("cpu")).type == "cuda"
            self._local.stream = torch.cuda.Stream(device) if on_gpu else None
        return self._local.stream

    def tokenize(self, prompt: str, num_images: int = 0, raw_prompt: bool = False,
                 image_sizes: list[tuple[int, int]] | None = None) -> tuple[str, list[int]]:
        """The text after the chat template and its token ids, exactly as make_sequence builds
        them for a request with this prompt and num_images images (each image's tokens expanded;
        LLaVA-NeXT needs each image's (height, width) in image_sizes)."""
        req = Request(prompt=prompt, raw_prompt=raw_prompt)  # validates the prompt as generate does
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 0:
            raise RequestError(f"images = {num_images!r}; must be a count >= 0")
        if num_images and self.image_processor is None:
            raise RequestError(f"{self.cfg.architecture} takes no images; got {num_images}")
        if image_sizes is not None and len(image_sizes) != num_images:
            raise RequestError(f"image_sizes has {len(image_sizes)} entries for {num_images} image(s)")
        text = self.tokenizer.build_prompt(req.prompt, num_images, raw=req.raw_prompt)
        return text, self.tokenizer.encode(text, num_images if image_sizes is None else list(image_sizes))
