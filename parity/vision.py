"""Vision tower + projector parity: our image embeddings vs HF `get_image_features` (LLaVA-NeXT:
per item, HF's tower + projector on the same base and tile pixels, before HF packs them).

fp32: max |diff| / max |ref| <= 1e-4. Lower precision: <= 1.5x HF's own error at that
precision against HF fp32.
"""

from __future__ import annotations

import torch
from common import Report, free_gpu, load_hf, make_llm, parser, rel_err, resolve_model, test_images

from engine.config import parse_dtype


def hf_features(hf: torch.nn.Module, pixels: torch.Tensor, device: str, dtype: torch.dtype) -> torch.Tensor:
    pixels = pixels.to(device=device, dtype=dtype)
    if hf.config.model_type == "llava_next":  # per item: get_image_features would pack them
        with torch.inference_mode():
            hidden = hf.model.vision_tower(pixels, output_hidden_states=True).hidden_states
            return hf.model.multi_modal_projector(hidden[hf.config.vision_feature_layer][:, 1:]).float().cpu()
    with torch.inference_mode():
        feats = hf.model.get_image_features(pixel_values=pixels)
    feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    return torch.stack(list(feats)).float().cpu()


def main() -> None:
    args = parser(__doc__).parse_args()
    model_dir = resolve_model(args)
    dtype = parse_dtype(args.dtype)
    llm = make_llm(args, model_dir)
    pixels, _ = llm.image_processor.preprocess_items(test_images(5, args.seed))
    ours = llm.runner.encode_images(pixels).float().cpu()
    del llm
    free_gpu()
    ref = hf_features(load_hf(model_dir, torch.float32, args.device), pixels, args.device, torch.float32)
    free_gpu()
    report = Report(f"vision parity ({pixels.shape[0]} items): {model_dir.name}, {args.dtype}, "
                    f"backend={args.backend}, device={args.device}")
    report.check("shape matches HF", float(tuple(ours.shape) == tuple(ref.shape)), 1.0, ".0f", True)
    if dtype == torch.float32:
        report.check("rel err vs HF fp32", rel_err(ours, ref), 1e-4)
    else:
        base = rel_err(hf_features(load_hf(model_dir, dtype, args.device), pixels, args.device, dtype), ref)
        report.check(f"ours/HF-{args.dtype} error vs HF fp32", rel_err(ours, ref) / base, 1.5, ".3f")
    report.finish()


if __name__ == "__main__":
    main()
