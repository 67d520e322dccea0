"""Config parsing and the checkpoint loader: layouts, shards, dtypes, and errors that name the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.config import ConfigError, ModelConfig, RopeConfig
from engine.loader import LoadError, load_model
from scripts.make_tiny_model import make_tiny_llava

CPU = torch.device("cpu")


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_llava_config(tiny_llava: Path) -> None:
    cfg = ModelConfig.from_dir(tiny_llava)
    assert cfg.is_multimodal and cfg.architecture == "LlavaForConditionalGeneration"
    assert cfg.tokens_per_item == 36
    assert cfg.vision_layers_used == cfg.vision.num_layers - 1  # feature layer -2


def test_llama_config_rope_llama3_matches_hf(tiny_llama: Path) -> None:
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = ModelConfig.from_dir(tiny_llama)
    assert cfg.text.rope.kind == "llama3" and cfg.text.tie_word_embeddings
    assert cfg.text.num_kv_heads < cfg.text.num_heads
    hf_cfg = AutoConfig.from_pretrained(tiny_llama)
    hf_inv, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    assert torch.equal(cfg.text.rope.inv_freq(cfg.text.head_dim), hf_inv)


@pytest.mark.parametrize("kind", ["linear", "default"])
def test_rope_linear_and_default_match_hf(kind: str) -> None:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    scaling = {"rope_type": "linear", "factor": 4.0} if kind == "linear" else None
    hf_cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, rope_scaling=scaling, rope_theta=50000.0)
    ours = ModelConfig.from_dict({**hf_cfg.to_dict(), "architectures": ["LlamaForCausalLM"]}).text.rope
    assert isinstance(ours, RopeConfig) and ours.kind == kind
    assert torch.equal(ours.inv_freq(64), LlamaRotaryEmbedding(hf_cfg).inv_freq)


def test_old_style_rope_scaling_keys() -> None:
    raw = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
           "num_hidden_layers": 1, "intermediate_size": 128, "vocab_size": 100, "rope_theta": 500000.0,
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}}
    rope = ModelConfig.from_dict(raw).text.rope
    assert rope.kind == "llama3" and rope.theta == 500000.0 and rope.original_max_position_embeddings == 8192


def test_mistral_sliding_window_caps_context() -> None:
    raw = {"architectures": ["MistralForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
           "num_hidden_layers": 1, "intermediate_size": 128, "vocab_size": 100, "max_position_embeddings": 32768,
           "sliding_window": 4096}
    assert ModelConfig.from_dict(raw).text.max_position_embeddings == 4096


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "architecture 'GPT2LMHeadModel' is not supported"),
        ({"architectures": ["LlamaForCausalLM"], "hidden_size": 64}, "missing 'num_attention_heads'"),
        ({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1,
          "intermediate_size": 8, "vocab_size": 10, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}},
         "rope type 'yarn' is not supported"),
        ({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1,
          "intermediate_size": 8, "vocab_size": 10, "num_key_value_heads": 3}, "not a multiple"),
    ],
)
def test_config_errors(raw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_dict(raw)


def test_missing_model_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model directory not found"):
        ModelConfig.from_dir(tmp_path / "nope")
    with pytest.raises(ConfigError, match="has no config.json"):
        ModelConfig.from_dir(tmp_path)


@pytest.mark.parametrize(("layout", "sharded"), [("model_prefixed", False), ("legacy", True), ("hf", True)])
def test_layouts_and_shards_load_identically(tiny_llava: Path, tmp_path: Path, layout: str, sharded: bool) -> None:
    other = make_tiny_llava(tmp_path / "other", key_layout=layout, sharded=sharded)
    if sharded:
        assert (other / "model.safetensors.index.json").is_file()
    cfg = ModelConfig.from_dir(tiny_llava)
    a = _state(load_model(cfg, tiny_llava, torch.float32, CPU))
    b = _state(load_model(cfg, other, torch.float32, CPU))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dtype_cast(tiny_llava: Path) -> None:
    model = load_model(ModelConfig.from_dir(tiny_llava), tiny_llava, torch.bfloat16, CPU)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def _copy_with(tiny: Path, tmp: Path, edit) -> Path:
    out = tmp / "edited"
    shutil.copytree(tiny, out)
    tensors = load_file(str(out / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(out / "model.safetensors"))
    return out


def test_missing_tensor_is_named(tiny_llava: Path, tmp_path: Path) -> None:
    name = next(k for k in load_file(str(tiny_llava / "model.safetensors")) if "layers.1.self_attn.k_proj" in k)
    bad = _copy_with(tiny_llava, tmp_path, lambda t: t.pop(name))
    with pytest.raises(LoadError, match=r"missing tensors: .*lm\.layers\.1\.qkv_proj \(have parts \[0, 2\]"):
        load_model(ModelConfig.from_dir(bad), bad, torch.float32, CPU)


def test_unexpected_and_misshapen_tensors_are_named(tiny_llava: Path, tmp_path: Path) -> None:
    def edit(t: dict) -> None:
        t["language_model.model.layers.0.mlp.extra.weight"] = torch.zeros(2)
        key = next(k for k in t if k.endswith("norm.weight") and "layers" not in k)
        t[key] = torch.zeros(3)

    bad = _copy_with(tiny_llava, tmp_path, edit)
    with pytest.raises(LoadError) as err:
        load_model(ModelConfig.from_dir(bad), bad, torch.float32, CPU)
    msg = str(err.value)
    assert "unexpected tensors: language_model.model.layers.0.mlp.extra.weight" in msg
    assert "wrong shapes: lm.norm: checkpoint (3,)" in msg


def test_no_weights(tiny_llava: Path, tmp_path: Path) -> None:
    out = tmp_path / "noweights"
    out.mkdir()
    shutil.copy(tiny_llava / "config.json", out)
    with pytest.raises(LoadError, match="no safetensors weights"):
        load_model(ModelConfig.from_dir(out), out, torch.float32, CPU)


def test_unsupported_architecture_dir(tiny_llava: Path, tmp_path: Path) -> None:
    out = tmp_path / "gpt"
    shutil.copytree(tiny_llava, out)
    raw = json.loads((out / "config.json").read_text())
    raw["architectures"] = ["Qwen2VLForConditionalGeneration"]
    (out / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="Qwen2VLForConditionalGeneration"):
        ModelConfig.from_dir(out)


def test_stage_parts_load_only_their_half(tiny_llava: Path, tiny_llama: Path) -> None:
    cfg = ModelConfig.from_dir(tiny_llava)
    full = _state(load_model(cfg, tiny_llava, torch.float32, CPU))
    vision = _state(load_model(cfg, tiny_llava, torch.float32, CPU, parts="vision"))
    lm = _state(load_model(cfg, tiny_llava, torch.float32, CPU, parts="lm"))
    assert vision and all(k.startswith("vision.") for k in vision)
    assert lm and all(k.startswith("lm.") for k in lm)
    assert sorted([*vision, *lm]) == sorted(full)  # the halves partition the model
    for k, v in {**vision, **lm}.items():
        assert torch.equal(v, full[k]), k
    with pytest.raises(ValueError, match="parts = 'vision'.*no vision tower"):
        load_model(ModelConfig.from_dir(tiny_llama), tiny_llama, torch.float32, CPU, parts="vision")
    with pytest.raises(ValueError, match="parts = 'half'"):
        load_model(cfg, tiny_llava, torch.float32, CPU, parts="half")
