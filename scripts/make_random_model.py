"""Write a full-size random checkpoint (LLaVA-1.5-7B, LLaVA-v1.6-Vicuna-7B or Llama-2-7B shapes) for
GPU parity and benchmarks.

    python scripts/make_random_model.py --shape llava-7b --out /tmp/llava-7b --device cuda
    python scripts/make_random_model.py --shape llava-next-7b --out /tmp/llava-next-7b --device cuda

Weights are drawn on the device with the tiny models' non-flat init (so greedy top-1 is
well defined); the tokenizer is the tiny one (prompts use ids < 512; shapes are what matter),
with one plain added token per id above its own vocabulary ("<t512>" ...), so that every id a
random model samples decodes to text: servers stream a chunk per token, as with a real checkpoint.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.make_tiny_model import LLAVA_CHAT_TEMPLATE, _init_non_flat, _start_dir  # noqa: E402

SHAPES = ("llava-7b", "llava-next-7b", "llama2-7b")
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-v1.6-vicuna-7b


def cover_vocab(tok, out: Path, vocab: int) -> None:
    """Give every id in [len(tok), vocab) a plain added token "<tN>" and save the tokenizer."""
    if len(tok) < vocab:
        tok.add_tokens([f"<t{i}>" for i in range(len(tok), vocab)])
        tok.save_pretrained(str(out))


def make_random_model(shape: str, out_dir: str | Path, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
                      seed: int = 0) -> Path:
    import transformers as hf

    multimodal = shape in ("llava-7b", "llava-next-7b")
    out, tok = _start_dir(out_dir, LLAVA_CHAT_TEMPLATE if multimodal else None)
    vocab = 32064 if multimodal else 32000
    cover_vocab(tok, out, vocab)
    text = hf.LlamaConfig(
        vocab_size=vocab, hidden_size=4096, intermediate_size=11008,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
        rms_norm_eps=1e-5, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    if multimodal:
        vision = hf.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                     num_attention_heads=16, image_size=336, patch_size=14, hidden_act="quick_gelu")
        common = {"vision_config": vision, "text_config": text,
                  "image_token_index": tok.convert_tokens_to_ids("<image>"), "projector_hidden_act": "gelu",
                  "vision_feature_layer": -2,
                  "vision_feature_select_strategy": "default"}
        if shape == "llava-7b":
            config, cls = hf.LlavaConfig(**common), hf.LlavaForConditionalGeneration
        else:
            config = hf.LlavaNextConfig(**common, image_grid_pinpoints=NEXT_PINPOINTS)
            cls = hf.LlavaNextForConditionalGeneration
    else:
        config, cls = text, hf.LlamaForCausalLM
    start = time.perf_counter()
    with torch.device(device):
        model = cls(config).to(dtype).eval()
    with torch.no_grad():
        _init_non_flat(model, seed, embed_std=1.0, head_gain=3.0, residual_gain=1.0, device=device)
    model.save_pretrained(str(out), safe_serialization=True, max_shard_size="5GB")
    if multimodal:
        import json

        preprocessor = {
            "image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 336},
            "crop_size": {"height": 336, "width": 336}, "resample": 3, "do_center_crop": True,
            "do_normalize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_convert_rgb": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
        if shape == "llava-next-7b":
            preprocessor.update(image_processor_type="LlavaNextImageProcessor", do_pad=True,
                                image_grid_pinpoints=NEXT_PINPOINTS)
        (out / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    print(f"{shape} -> {out} in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    from engine.cli import ArgumentParser, check_device

    p = ArgumentParser(description=__doc__)
    p.add_argument("--shape", choices=SHAPES, required=True, help="which model's shapes")
    p.add_argument("--out", required=True, help="output checkpoint dir")
    p.add_argument("--device", default="cuda", help="where the weights are drawn (cpu works, slowly)")
    p.add_argument("--seed", type=int, default=0, help="weight seed")
    args = p.parse_args(argv)
    check_device(args.device, "torch")
    print(make_random_model(args.shape, args.out, args.device, seed=args.seed))
    return 0


if __name__ == "__main__":
    from engine.cli import run_main

    sys.exit(run_main(main))
