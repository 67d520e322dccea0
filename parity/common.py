"""Shared pieces of the parity scripts: arguments, the HF reference model, test inputs,
a teacher-forcing driver over our runner, and error reporting."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine import LLM, Request, SamplingParams  # noqa: E402
from engine.config import parse_dtype  # noqa: E402
from engine.request import Sequence  # noqa: E402


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", help="checkpoint dir (default: the tiny LLaVA, made on first use)")
    p.add_argument("--kind", choices=["llava", "llava-next", "llama"], default="llava",
                   help="tiny model when --model is absent")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="torch")
    p.add_argument("--steps", type=int, default=32, help="decode steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deterministic", action="store_true", help="our engine in batch-invariant mode")
    return p


def resolve_model(args: argparse.Namespace) -> Path:
    if args.model:
        return Path(args.model)
    from scripts.make_tiny_model import ensure_tiny_llama, ensure_tiny_llava, ensure_tiny_llava_next

    return {"llava": ensure_tiny_llava, "llava-next": ensure_tiny_llava_next, "llama": ensure_tiny_llama}[args.kind]()


def load_hf(model_dir: Path, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """The HF reference model (the only place a HF forward runs)."""
    import json

    import transformers as hf

    arch = json.loads((model_dir / "config.json").read_text())["architectures"][0]
    cls = {"LlavaForConditionalGeneration": hf.LlavaForConditionalGeneration,
           "LlavaNextForConditionalGeneration": hf.LlavaNextForConditionalGeneration,
           "LlamaForCausalLM": hf.LlamaForCausalLM, "MistralForCausalLM": hf.MistralForCausalLM}[arch]
    return cls.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()


def make_llm(args: argparse.Namespace, model_dir: Path, **kw) -> LLM:
    """Our engine with a modest KV arena, so the HF reference models fit beside it on a GPU, and
    an MM arena for every item of the test requests at once (LLaVA-NeXT: up to 5 per image)."""
    kw.setdefault("kv_cache_tokens", 16384)
    kw.setdefault("max_images_per_batch", 16)
    return LLM(model_dir, backend=args.backend, dtype=parse_dtype(args.dtype), device=args.device,
               deterministic=getattr(args, "deterministic", False), **kw)


def free_gpu() -> None:
    """Return memory of models dropped by the caller (`del` them first)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def test_images(n: int, seed: int) -> list[Image.Image]:
    """Random RGB images of assorted sizes (not square, not the tower's size)."""
    rng = np.random.default_rng(seed)
    sizes = [(97, 131), (400, 300), (64, 80), (333, 333)]
    return [Image.fromarray(rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8)) for i in range(n)]


def test_requests(llm: LLM, seed: int) -> list[Request]:
    """Requests of different lengths; with 0, 1 and 2 images on a multimodal model."""
    texts = [
        "What is shown in this picture?",
        "Describe the colours you can see, and count the animals in the scene one by one.",
        "Hi",
        "Compare the two images and tell me which one is brighter and why.",
    ]
    if not llm.cfg.is_multimodal:
        return [Request(prompt=t) for t in texts]
    images = test_images(3, seed)
    return [
        Request(prompt=texts[0], images=[images[0]]),
        Request(prompt=texts[1], images=[images[1]]),
        Request(prompt=texts[2]),
        Request(prompt=texts[3], images=[images[1], images[2]]),
    ]


@dataclass
class Prepared:
    seq: Sequence
    input_ids: torch.Tensor  # [1, L]
    pixel_values: torch.Tensor | None  # [N items, 3, S, S] fp32 (LLaVA-NeXT: each image's base and tiles)
    image_sizes: torch.Tensor | None = None  # [images, 2] (height, width): LLaVA-NeXT's

    def hf_image_kwargs(self, device: str, dtype: torch.dtype | None = None) -> dict:
        """The images as HF's forward takes them (a 4-D item stack + image_sizes for NeXT)."""
        if self.pixel_values is None:
            return {}
        kw = {"pixel_values": self.pixel_values.to(device=device, dtype=dtype)}
        if self.image_sizes is not None:
            kw["image_sizes"] = self.image_sizes.to(device)
        return kw


def prepare(llm: LLM, requests: list[Request], max_tokens: int) -> list[Prepared]:
    out = []
    for r in requests:
        seq = llm.make_sequence(r, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        sizes = torch.tensor(seq.image_sizes) if llm.cfg.is_anyres and seq.image_sizes else None
        out.append(Prepared(seq, torch.tensor([seq.prompt_ids]), seq.pixel_values, sizes))
    return out


class TeacherForcing:
    """Drives our runner directly: prefill a batch, then decode with tokens we are given."""

    def __init__(self, llm: LLM, seqs: list[Sequence]) -> None:
        self.llm, self.seqs = llm, seqs
        engine, bs = llm.engine, llm.runner.block_size
        for s in seqs:
            need = -(-(len(s.prompt_ids) + s.sampling.max_tokens) // bs)
            s.block_table = engine.kv_blocks.allocate(need)
            assert s.block_table is not None, "KV cache too small for the parity batch"
            if s.num_items:
                s.mm_blocks = engine.encode.cache.allocate(s.num_items)  # evicts cached images if it must
                assert s.mm_blocks is not None, "MM arena too small for the parity batch"
        with_images = [s for s in seqs if s.num_items]
        if with_images:
            llm.runner.encode(with_images)

    def prefill(self) -> torch.Tensor:
        """All-position logits [T, V] of the packed prompts."""
        return self.llm.runner.prefill(self.seqs, all_logits=True).logits

    def decode(self, tokens: list[int]) -> torch.Tensor:
        """Append one given token per sequence and return the next logits [B, V]."""
        for s, t in zip(self.seqs, tokens):
            s.output_ids.append(t)
        return self.llm.runner.decode(self.seqs)[1]

    def close(self) -> None:
        for s in self.seqs:
            self.llm.engine.finish(s)


def hf_logits(hf: torch.nn.Module, p: Prepared, device: str, dtype: torch.dtype) -> torch.Tensor:
    with torch.inference_mode():
        return hf(input_ids=p.input_ids.to(device), **p.hf_image_kwargs(device, dtype)).logits[0].float()


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|."""
    ours, ref = ours.float().cpu(), ref.float().cpu()
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


class Report:
    """Collects named checks, prints a table, exits non-zero on any failure."""

    def __init__(self, title: str) -> None:
        self.title, self.rows, self.failed = title, [], False

    def check(self, name: str, value: float, limit: float, fmt: str = ".2e", higher_is_better: bool = False) -> None:
        ok = value >= limit if higher_is_better else value <= limit
        self.failed |= not ok
        op = ">=" if higher_is_better else "<="
        self.rows.append(f"  {'PASS' if ok else 'FAIL'}  {name:<48} {value:{fmt}}  (need {op} {limit:{fmt}})")

    def finish(self) -> None:
        print(self.title)
        print("\n".join(self.rows))
        print("RESULT:", "FAIL" if self.failed else "PASS")
        sys.exit(1 if self.failed else 0)
