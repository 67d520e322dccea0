"""Model and engine configuration.

`ModelConfig.from_dir` reads a HF checkpoint's `config.json` for the architectures
we run (LLaVA-1.5 and LLaVA-NeXT with a CLIP tower, Llama, Mistral); anything else is an
error that names the architecture or field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from engine.image_layout import ImageLayout, Pinpoints, anyres_layout, single_item_layout

LLAVA_ARCHITECTURES = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")
SUPPORTED_ARCHITECTURES = (*LLAVA_ARCHITECTURES, "LlamaForCausalLM", "MistralForCausalLM")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConfigError(ValueError):
    """A checkpoint or engine setting we cannot serve; the message names the field."""


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name not in _DTYPES.values():
            raise ConfigError(f"dtype {name} is not supported; use one of {sorted(_DTYPES)}")
        return name
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}
    key = aliases.get(name, name)
    if key not in _DTYPES:
        raise ConfigError(f"dtype {name!r} is not supported; use one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[key]


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    kind: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def inv_freq(self, head_dim: int) -> torch.Tensor:
        """[head_dim // 2] fp32 inverse frequencies, computed exactly as HF does."""
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float) / head_dim
        inv_freq = 1.0 / (self.theta**exponent)
        if self.kind == "linear":
            return inv_freq / self.factor
        if self.kind == "llama3":
            low_wavelen = self.original_max_position_embeddings / self.low_freq_factor
            high_wavelen = self.original_max_position_embeddings / self.high_freq_factor
            wavelen = 2 * math.pi / inv_freq
            scaled = torch.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
            smooth = (self.original_max_position_embeddings / wavelen - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor
            )
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
            return torch.where(medium, smoothed, scaled)
        return inv_freq


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    layer_norm_eps: float
    hidden_act: str  # quick_gelu | gelu

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    text: TextConfig
    vision: VisionConfig | None = None
    image_token_id: int | None = None
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"  # default drops CLS; full keeps it
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    # LLaVA-NeXT (anyres): the (height, width) tile grids an image may be cut into; None: LLaVA-1.5
    image_grid_pinpoints: Pinpoints | None = None
    checkpoint_dtype: torch.dtype = torch.float32
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_multimodal(self) -> bool:
        return self.vision is not None

    @property
    def is_anyres(self) -> bool:
        """LLaVA-NeXT: images are tiled (their token count depends on their size) and the
        model has an image_newline vector."""
        return self.image_grid_pinpoints is not None

    @property
    def tokens_per_item(self) -> int:
        """Embedding rows the tower makes per input (a CLIP image or a NeXT tile): one MM block."""
        assert self.vision is not None
        return self.vision.num_patches + (1 if self.vision_feature_select_strategy == "full" else 0)

    def image_layout(self, height: int | None, width: int | None) -> ImageLayout:
        """The items and row layout of an image of height x width (engine/image_layout.py);
        the size may be None when the model's layout does not depend on it (LLaVA-1.5)."""
        assert self.vision is not None
        if not self.is_anyres:
            return single_item_layout(self.tokens_per_item)
        if height is None or width is None:
            raise ValueError(f"{self.architecture}: an image's token count depends on its size; "
                             "the size is needed")
        v = self.vision
        return anyres_layout(height, width, v.image_size, v.image_size // v.patch_size, self.image_grid_pinpoints)

    @property
    def vision_layers_used(self) -> int:
        """How many encoder layers run: hidden_states[k] is the output of the first k layers."""
        assert self.vision is not None
        n = self.vision.num_layers
        return self.vision_feature_layer if self.vision_feature_layer >= 0 else n + 1 + self.vision_feature_layer

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir)
        if not path.is_dir():
            raise ConfigError(f"model directory not found: {path}")
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise ConfigError(f"{path} has no config.json; expected a HF checkpoint directory")
        try:
            raw = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cfg_path}: invalid JSON ({e})") from e
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict) -> ModelConfig:
        archs = raw.get("architectures") or []
        arch = archs[0] if archs else {"llava": "LlavaForConditionalGeneration",
                                       "llava_next": "LlavaNextForConditionalGeneration", "llama": "LlamaForCausalLM",
                                       "mistral": "MistralForCausalLM"}.get(raw.get("model_type", ""), "")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"architecture {arch or raw.get('model_type')!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        dtype = _checkpoint_dtype(raw)
        if arch not in LLAVA_ARCHITECTURES:
            return cls(architecture=arch, text=_text_config(raw, arch), checkpoint_dtype=dtype, raw=raw)

        text_raw = dict(raw.get("text_config") or {})
        text_arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}.get(
            text_raw.get("model_type", "llama")
        )
        if text_arch is None:
            raise ConfigError(f"text_config.model_type {text_raw.get('model_type')!r} is not supported; use llama")
        vision_raw = raw.get("vision_config") or {}
        if vision_raw.get("model_type", "clip_vision_model") != "clip_vision_model":
            raise ConfigError(f"vision_config.model_type {vision_raw.get('model_type')!r} is not supported; "
                              "use clip_vision_model")
        feature_layer = raw.get("vision_feature_layer", -2)
        if not isinstance(feature_layer, int):
            raise ConfigError(f"vision_feature_layer {feature_layer!r}: only a single layer index is supported")
        strategy = raw.get("vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise ConfigError(f"vision_feature_select_strategy {strategy!r} is not supported; use default or full")
        act = raw.get("projector_hidden_act", "gelu")
        if act not in ("gelu", "quick_gelu"):
            raise ConfigError(f"projector_hidden_act {act!r} is not supported; use gelu or quick_gelu")
        vision = VisionConfig(
            hidden_size=vision_raw.get("hidden_size", 1024),
            intermediate_size=vision_raw.get("intermediate_size", 4096),
            num_layers=vision_raw.get("num_hidden_layers", 24),
            num_heads=vision_raw.get("num_attention_heads", 16),
            image_size=vision_raw.get("image_size", 336),
            patch_size=vision_raw.get("patch_size", 14),
            layer_norm_eps=vision_raw.get("layer_norm_eps", 1e-5),
            hidden_act=vision_raw.get("hidden_act", "quick_gelu"),
        )
        if vision.hidden_act not in ("gelu", "quick_gelu"):
            raise ConfigError(f"vision_config.hidden_act {vision.hidden_act!r} is not supported")
        if not -vision.num_layers - 1 <= feature_layer <= vision.num_layers:
            raise ConfigError(f"vision_feature_layer {feature_layer} is outside the tower's "
                              f"{vision.num_layers} layers")
        image_token = raw.get("image_token_index", raw.get("image_token_id"))
        if image_token is None:
            raise ConfigError("LLaVA config has no image_token_index")
        pinpoints = _pinpoints(raw, vision, strategy) if arch == "LlavaNextForConditionalGeneration" else None
        if "tie_word_embeddings" in raw and "tie_word_embeddings" not in text_raw:
            text_raw["tie_word_embeddings"] = raw["tie_word_embeddings"]
        return cls(
            architecture=arch,
            text=_text_config(text_raw, text_arch),
            vision=vision,
            image_token_id=int(image_token),
            vision_feature_layer=feature_layer,
            vision_feature_select_strategy=strategy,
            projector_hidden_act=act,
            projector_bias=raw.get("multimodal_projector_bias", True),
            image_grid_pinpoints=pinpoints,
            checkpoint_dtype=dtype,
            raw=raw,
        )


# HF LlavaNextConfig's default (llava-v1.6 checkpoints: CLIP-L/336 tiles)
DEFAULT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


def _pinpoints(raw: dict, vision: VisionConfig, strategy: str) -> Pinpoints:
    """LLaVA-NeXT's image_grid_pinpoints, checked: (height, width) pairs, multiples of the tile."""
    if raw.get("mm_patch_merge_type", "spatial_unpad") != "spatial_unpad":
        raise ConfigError(f"mm_patch_merge_type {raw['mm_patch_merge_type']!r} is not supported; "
                          "LLaVA-NeXT here is spatial_unpad")
    if strategy != "default":
        raise ConfigError(f"vision_feature_select_strategy {strategy!r}: LLaVA-NeXT's tile grid needs "
                          "'default' (the CLS token dropped)")
    value = raw.get("image_grid_pinpoints") or DEFAULT_PINPOINTS
    try:
        pinpoints = tuple((int(h), int(w)) for h, w in value)
    except (TypeError, ValueError):
        raise ConfigError(f"image_grid_pinpoints {value!r}: expected a list of [height, width] pairs") from None
    tile = vision.image_size
    bad = [p for p in pinpoints if p[0] <= 0 or p[1] <= 0 or p[0] % tile or p[1] % tile]
    if bad:
        raise ConfigError(f"image_grid_pinpoints {list(bad[0])}: each side must be a positive multiple of the "
                          f"vision tower's image_size {tile}")
    return pinpoints


def _checkpoint_dtype(raw: dict) -> torch.dtype:
    name = raw.get("dtype") or raw.get("torch_dtype") or (raw.get("text_config") or {}).get("torch_dtype")
    return _DTYPES.get(str(name), torch.float32)


def _rope_config(raw: dict) -> RopeConfig:
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise ConfigError(f"rope type {kind!r} is not supported; supported: default, linear, llama3")
    if kind == "default":
        return RopeConfig(theta=theta)
    if "factor" not in params:
        raise ConfigError(f"rope_scaling of type {kind} needs a 'factor'")
    if kind == "linear":
        return RopeConfig(theta=theta, kind=kind, factor=float(params["factor"]))
    for key in ("low_freq_factor", "high_freq_factor"):
        if key not in params:
            raise ConfigError(f"rope_scaling of type llama3 needs {key!r}")
    return RopeConfig(
        theta=theta,
        kind=kind,
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", raw.get("max_position_embeddings", 8192))
        ),
    )


def _text_config(raw: dict, arch: str) -> TextConfig:
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size"):
        if key not in raw:
            raise ConfigError(f"{arch} config is missing {key!r}")
    if raw.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {raw['hidden_act']!r} is not supported; Llama uses silu")
    if raw.get("attention_bias") or raw.get("mlp_bias"):
        raise ConfigError("attention_bias/mlp_bias = true is not supported")
    num_heads = raw["num_attention_heads"]
    num_kv = raw.get("num_key_value_heads") or num_heads
    if num_heads % num_kv:
        raise ConfigError(f"num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv}")
    max_pos = raw.get("max_position_embeddings", 4096)
    window = raw.get("sliding_window") if arch == "MistralForCausalLM" else None
    if window is not None:
        # Without sliding-window attention we serve exactly the context in which it is a no-op.
        max_pos = min(max_pos, int(window))
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    return TextConfig(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=num_kv,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // num_heads,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        max_position_embeddings=max_pos,
        rope=_rope_config(raw),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos_ids,
    )


BACKENDS = ("auto", "torch", "cuda")
BLOCK_SIZES = (8, 16, 32, 64, 128)
MAX_MULTI_STEP = 64  # decode steps one call may run back to back (the decode graphs' token history)


@dataclass(frozen=True)
class EngineConfig:
    """Every engine setting in one value, validated in one place and passed whole to the
    runner, the engines, the input processor and the stage roles.

    __post_init__ checks each setting on its own (types and ranges; errors name the field and
    the limit); `for_model` checks what needs the checkpoint (the context length) and resolves
    "auto" and None to what will run, so a resolved config says exactly what a process uses.

    backend: "torch" (reference ops, any device), "cuda" (our kernels), "auto" (cuda where
    available). dtype: "auto" (the checkpoint's), "float32", "bfloat16" or "float16".
    cuda_graphs: capture vision graphs per image-batch bucket and decode graphs per batch bucket
    (cuda backend); background_capture: serving starts at once while the decode buckets are
    captured on a side stream. multi_step: decode steps run back to back on the device between
    host checks (1-64). kv_cache_tokens: KV arena capacity in tokens (None: on a GPU, what
    gpu_memory_utilization leaves after weights and activations; on the CPU, 4 x max_model_len).
    torch_threads: torch CPU threads of the process (0: leave torch's default).
    image_workers: threads that decode and preprocess images off the engine thread (the
    aggregated engine's front end, an encoder's PIL decodes; PIL releases the GIL while it decodes
    and resizes). image_preprocess: "auto" (a stage that encodes on a GPU with the cuda backend
    decodes and preprocesses LLaVA-1.5 images there: nvjpeg + PIL-exact kernels,
    engine/preprocess.py) or "cpu" (PIL everywhere). mm_cache_items: MM-arena blocks beyond two
    encode batches, for cached image embeddings and for items encoded ahead of a busy prefill
    (None: 256 on a GPU, 0 on the CPU).
    max_images_per_batch: vision-tower inputs ("items") per encode batch: a LLaVA-1.5 image is one
    item, a LLaVA-NeXT image is 1 + its tiles; the MM arena holds two such batches.
    mm_cache: keep image embeddings (MM blocks, evicted least recently used) and preprocessed
    pixels (up to mm_pixel_cache_mb per process) by image content, so a repeated image is not
    preprocessed or encoded again (engine/mm_cache.py); False: every image is encoded.
    encode_first (EPD): a prefill waits (0.25 s at most per batch) while an encoder on its device
    has work in hand (ipc/busy_board.py): without MPS a GPU time-slices between processes, and
    the encoders' batches of a few ms would wait behind a long prefill's slices.
    deterministic: batch-invariant ops (epd_kernels/invariant.py): a request's output is bit-identical
    whatever shares its batches, the graph bucket, the number of encoders or the E/P/D split.
    """

    model: str
    backend: str = "auto"
    dtype: str = "auto"
    device: str | None = None
    max_model_len: int | None = None
    block_size: int = 16
    kv_cache_tokens: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    max_images_per_batch: int = 8
    gpu_memory_utilization: float = 0.9
    cuda_graphs: bool = True
    background_capture: bool = False
    multi_step: int = 1
    seed: int = 0
    progress: bool | None = None
    torch_threads: int = 0
    image_workers: int = 4
    image_preprocess: str = "auto"
    mm_cache_items: int | None = None
    mm_cache: bool = True
    mm_pixel_cache_mb: int = 256
    encode_first: bool = True
    deterministic: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", str(self.model))
        if isinstance(self.dtype, torch.dtype):
            object.__setattr__(self, "dtype", str(parse_dtype(self.dtype)).removeprefix("torch."))
        elif self.dtype != "auto":
            object.__setattr__(self, "dtype", str(parse_dtype(self.dtype)).removeprefix("torch."))
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend = {self.backend!r}; use one of {', '.join(BACKENDS)}")
        if self.device is not None:
            try:
                object.__setattr__(self, "device", str(torch.device(self.device)))
            except (RuntimeError, TypeError):
                raise ConfigError(f"device = {self.device!r} is not a device; use cpu, cuda or cuda:N") from None
        for name, low in (("max_num_seqs", 1), ("max_num_batched_tokens", 1), ("max_images_per_batch", 0),
                          ("seed", 0), ("torch_threads", 0), ("image_workers", 1), ("mm_pixel_cache_mb", 0)):
            _check_int(name, getattr(self, name), low)
        _check_int("multi_step", self.multi_step, 1, MAX_MULTI_STEP)
        for name in ("max_model_len", "kv_cache_tokens"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        if self.mm_cache_items is not None:
            _check_int("mm_cache_items", self.mm_cache_items, 0)
        if self.block_size not in BLOCK_SIZES:
            raise ConfigError(f"block_size = {self.block_size}; use one of {', '.join(map(str, BLOCK_SIZES))}")
        util = self.gpu_memory_utilization
        if isinstance(util, bool) or not isinstance(util, (int, float)) or not 0.0 < util <= 1.0:
            raise ConfigError(f"gpu_memory_utilization = {util!r}; must be a number in (0, 1]")
        if self.image_preprocess not in ("auto", "cpu"):
            raise ConfigError(f"image_preprocess = {self.image_preprocess!r}; use 'auto' or 'cpu'")
        for name in ("cuda_graphs", "background_capture", "mm_cache", "encode_first", "deterministic"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} = {getattr(self, name)!r}; must be True or False")

    @classmethod
    def of(cls, model: str | Path | EngineConfig, **settings) -> EngineConfig:
        """A config from a model directory and settings (EngineConfig's fields), or a config
        with some settings replaced: what LLM(...) and EPDEngine(...) take."""
        unknown = sorted(set(settings) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"unknown setting {unknown[0]!r}; the settings are EngineConfig's fields")
        if isinstance(model, EngineConfig):
            return replace(model, **settings) if settings else model
        return cls(model=str(model), **settings)

    def for_model(self, cfg: ModelConfig) -> EngineConfig:
        """This config checked against the checkpoint and resolved: max_model_len (the model's
        context unless smaller), dtype (the checkpoint's for "auto"), device (cuda when present)."""
        limit = cfg.text.max_position_embeddings
        if self.max_model_len is not None and self.max_model_len > limit:
            raise ConfigError(f"max_model_len = {self.max_model_len}; the model's context is {limit} tokens")
        dtype = str(cfg.checkpoint_dtype).removeprefix("torch.") if self.dtype == "auto" else self.dtype
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        return replace(self, max_model_len=self.max_model_len or limit, dtype=dtype, device=device)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            raise ConfigError("dtype is still 'auto': resolve the config with for_model first")
        return parse_dtype(self.dtype)

    def num_mm_blocks(self, cfg: ModelConfig) -> int:
        """MM-arena blocks (one item each: a CLIP image or a LLaVA-NeXT tile), 0 without a tower:
        two encode batches in flight plus mm_cache_items (None: 256 on a GPU, 0 on the CPU) for
        the encoder cache and for items encoded ahead of a busy prefill (a 7B item is 4.7 MB)."""
        if not cfg.is_multimodal:
            return 0
        extra = self.mm_cache_items
        if extra is None:
            extra = 256 if torch.device(self.device or "cpu").type == "cuda" else 0
        return 2 * self.max_images_per_batch + extra

    def num_kv_blocks(self) -> int | None:
        """KV blocks of block_size for kv_cache_tokens; on the CPU 4 x max_model_len by default;
        None: size from GPU memory (a resolved config on a GPU without kv_cache_tokens)."""
        tokens = self.kv_cache_tokens
        if tokens is None and torch.device(self.device or "cpu").type != "cuda":
            if self.max_model_len is None:
                raise ConfigError("max_model_len is unresolved: resolve the config with for_model first")
            tokens = 4 * self.max_model_len
        return None if tokens is None else -(-tokens // self.block_size)

    @property
    def pixel_cache_bytes(self) -> int:
        """Bytes of preprocessed pixels a process keeps (0 with the cache off)."""
        return self.mm_pixel_cache_mb * 2**20 if self.mm_cache else 0


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} = {value!r}; must be an integer")
    if value < low or (high is not None and value > high):
        limit = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(f"{name} = {value}; must be {limit}")
