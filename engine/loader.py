"""Load a HF safetensors checkpoint into `MultimodalModel`.

Handles a single file or shards (`model.safetensors.index.json`), both LLaVA key layouts
found in the wild (`language_model.model.*` / `vision_tower.vision_model.*` and
`model.language_model.*` / `model.vision_tower.*`; LLaVA-NeXT's `image_newline` /
`model.image_newline` with them), fuses Q/K/V and gate/up, and casts to
the requested dtype. Missing, unexpected or misshapen tensors raise `LoadError` listing them.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from engine.config import ModelConfig
from engine.models.llava import MultimodalModel


class LoadError(ValueError):
    """The checkpoint's tensors do not match the model config."""


# HF name prefixes -> our canonical prefixes (first match wins).
_PREFIXES = [
    ("model.language_model.", "lm."),
    ("language_model.model.", "lm."),
    ("language_model.lm_head.", "lm.lm_head."),
    ("model.vision_tower.vision_model.", "vision."),
    ("model.vision_tower.", "vision."),
    ("vision_tower.vision_model.", "vision."),
    ("vision_tower.", "vision."),
    ("model.multi_modal_projector.", "projector."),
    ("multi_modal_projector.", "projector."),
    ("lm_head.", "lm.lm_head."),
    ("model.", "lm."),
]

_QKV = {"q": 0, "k": 1, "v": 2}
_Rule = tuple[str, str, Callable[[re.Match], int | None]]
# (pattern on the canonical name, target parameter template, slot in a fused tensor or None)
_RULES: list[_Rule] = [
    (r"lm\.embed_tokens\.weight", "lm.embed_tokens", lambda m: None),
    (r"lm\.norm\.weight", "lm.norm", lambda m: None),
    (r"lm\.lm_head\.weight", "lm.lm_head", lambda m: None),
    (r"lm\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight", "lm.layers.{1}.{2}", lambda m: None),
    (r"lm\.layers\.(\d+)\.self_attn\.([qkv])_proj\.weight", "lm.layers.{1}.qkv_proj", lambda m: _QKV[m[2]]),
    (r"lm\.layers\.(\d+)\.self_attn\.o_proj\.weight", "lm.layers.{1}.o_proj", lambda m: None),
    (r"lm\.layers\.(\d+)\.mlp\.(gate|up)_proj\.weight", "lm.layers.{1}.gate_up_proj",
     lambda m: 0 if m[2] == "gate" else 1),
    (r"lm\.layers\.(\d+)\.mlp\.down_proj\.weight", "lm.layers.{1}.down_proj", lambda m: None),
    (r"vision\.embeddings\.class_embedding", "vision.class_embedding", lambda m: None),
    (r"vision\.embeddings\.patch_embedding\.weight", "vision.patch_embedding", lambda m: None),
    (r"vision\.embeddings\.position_embedding\.weight", "vision.position_embedding", lambda m: None),
    (r"vision\.pre_layrnorm\.(weight|bias)", "vision.pre_layrnorm_{1}", lambda m: None),
    (r"vision\.encoder\.layers\.(\d+)\.(layer_norm1|layer_norm2)\.(weight|bias)", "vision.layers.{1}.{2}_{3}",
     lambda m: None),
    (r"vision\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", "vision.layers.{1}.qkv_proj_{3}",
     lambda m: _QKV[m[2]]),
    (r"vision\.encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", "vision.layers.{1}.out_proj_{2}",
     lambda m: None),
    (r"vision\.encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", "vision.layers.{1}.{2}_{3}", lambda m: None),
    (r"projector\.(linear_1|linear_2)\.(weight|bias)", "vision.{1}_{2}", lambda m: None),
    (r"(?:lm\.)?image_newline", "image_newline", lambda m: None),  # LLaVA-NeXT: model.image_newline or image_newline
]
_COMPILED = [(re.compile(p), t, s) for p, t, s in _RULES]
# Present in real checkpoints, unused by the served model.
_IGNORED = re.compile(r".*(rotary_emb\.inv_freq|embeddings\.position_ids)$|vision\.post_layernorm\..*")


def canonical_name(hf_name: str) -> str:
    for old, new in _PREFIXES:
        if hf_name.startswith(old):
            return new + hf_name[len(old) :]
    return hf_name


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise LoadError(f"{index.name} names shard(s) that do not exist: {', '.join(missing)}")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise LoadError(f"no safetensors weights in {model_dir} (expected model.safetensors or an index)")
    return files


class _Progress:
    """A one-line progress bar on stderr, shown for checkpoints over 1 GiB."""

    def __init__(self, total_bytes: int, enabled: bool | None) -> None:
        self.total, self.done, self.start = total_bytes, 0, time.perf_counter()
        self.enabled = total_bytes > (1 << 30) if enabled is None else enabled
        self.shown = -1

    def update(self, nbytes: int) -> None:
        self.done += nbytes
        pct_int = 100 * self.done // max(self.total, 1)
        if self.enabled and (pct_int > self.shown or self.done >= self.total):
            self.shown = pct_int
            pct = 100 * self.done / max(self.total, 1)
            sys.stderr.write(f"\rloading weights {pct:5.1f}% ({self.done / 2**30:.2f}/{self.total / 2**30:.2f} GiB)")
            if self.done >= self.total:
                sys.stderr.write(f" in {time.perf_counter() - self.start:.1f}s\n")
            sys.stderr.flush()


def load_model(
    cfg: ModelConfig,
    model_dir: str | Path,
    dtype: torch.dtype,
    device: torch.device,
    progress: bool | None = None,
    parts: str = "all",
) -> MultimodalModel:
    """Build the model for `cfg` on `device` and fill it from the checkpoint in `model_dir`
    (only the vision tower + projector, or only the LM, when `parts` says so)."""
    model_dir = Path(model_dir)
    with torch.device("meta"):
        model = MultimodalModel(cfg, parts)
    params = dict(model.named_parameters())  # tied lm_head appears once, as lm.embed_tokens
    tied = cfg.text.tie_word_embeddings
    files = checkpoint_files(model_dir)
    tensors: dict[str, dict[int | None, torch.Tensor]] = defaultdict(dict)
    unexpected: list[str] = []
    bar = _Progress(sum(f.stat().st_size for f in files), progress)
    vision_layers = cfg.vision_layers_used if cfg.vision else 0
    skipped: tuple[str, ...] = () if parts == "all" else ("lm.", "image_newline") if parts == "vision" else ("vision.",)
    for path in files:
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise LoadError(f"cannot read {path}: {e}") from e
        with handle as f:
            for hf_name in f.keys():
                name = canonical_name(hf_name)
                if _IGNORED.match(name) or (tied and name == "lm.lm_head.weight"):
                    continue
                target, slot = _match(name)
                if target is None:
                    unexpected.append(hf_name)
                    continue
                layer = re.match(r"vision\.layers\.(\d+)\.", target)
                if (layer and int(layer[1]) >= vision_layers) or target.startswith(skipped):
                    continue  # past the feature layer (never run), or the half this stage lacks
                tensor = f.get_tensor(hf_name)
                bar.update(tensor.numel() * tensor.element_size())
                tensors[target][slot] = tensor.to(device=device, dtype=dtype)
    if bar.enabled and bar.done < bar.total:
        bar.update(bar.total - bar.done)
    _assemble(model, params, tensors, unexpected)
    if model.lm is not None:
        model.lm.init_rope(cfg.text.max_position_embeddings)
    return model.eval()


def _match(name: str) -> tuple[str | None, int | None]:
    for pattern, template, slot in _COMPILED:
        m = pattern.fullmatch(name)
        if m:
            return template.format(*[m[0], *m.groups()]), slot(m)
    return None, None


def _assemble(
    model: MultimodalModel,
    params: dict[str, torch.nn.Parameter],
    parts: dict[str, dict[int | None, torch.Tensor]],
    unexpected: list[str],
) -> None:
    missing, bad_shape, values = [], [], {}
    for name, param in params.items():
        got = parts.pop(name, None)
        fused = 3 if name.rsplit(".", 1)[-1].startswith("qkv_proj") else 2 if name.endswith("gate_up_proj") else 1
        if got is None or (fused > 1 and len(got) < fused):
            have = sorted(k for k in (got or {}) if k is not None)
            missing.append(name + (f" (have parts {have} of {fused})" if have else ""))
            continue
        tensor = torch.cat([got[i] for i in range(fused)]) if fused > 1 else got[None]
        if name == "vision.patch_embedding":
            tensor = tensor.reshape(tensor.shape[0], -1)
        if tuple(tensor.shape) != tuple(param.shape):
            bad_shape.append(f"{name}: checkpoint {tuple(tensor.shape)}, config expects {tuple(param.shape)}")
            continue
        values[name] = tensor
    unexpected += sorted(parts)  # targets that no parameter wants
    problems = []
    if missing:
        problems.append("missing tensors: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected tensors: " + ", ".join(sorted(unexpected)))
    if bad_shape:
        problems.append("wrong shapes: " + "; ".join(bad_shape))
    if problems:
        raise LoadError("checkpoint does not match its config.json:\n  " + "\n  ".join(problems))
    for name, tensor in values.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        setattr(module, attr, torch.nn.Parameter(tensor, requires_grad=False))
    if model.lm is not None and model.cfg.text.tie_word_embeddings:
        model.lm.lm_head = model.lm.embed_tokens
