"""Make tiny, deterministic HF-format checkpoints (LLaVA, LLaVA-NeXT and Llama) locally, no network.

Weights are random but not flat (clear top-1 logits), the tokenizer is a byte-level
BPE trained on the spot on the corpus below. Used by CPU tests and parity scripts.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

CORPUS = """\
A chat between a curious human and an artificial intelligence assistant.
USER: What is shown in this image? ASSISTANT: The image shows a cat sitting on a red chair.
USER: What color is the car? ASSISTANT: The car is blue, and there is a white dog next to it.
USER: How many birds are in the picture? ASSISTANT: There are three birds on the green tree.
USER: Describe the image in detail. ASSISTANT: A small brown dog is running on the grass in a park.
USER: What is this? ASSISTANT: This is a photo of a yellow banana on a wooden table.
The sky is blue and the sun is bright. White clouds float above the green hills.
One, two, three, four, five, six, seven, eight, nine, ten. Count the apples in the basket.
There are two cats and one dog in the room. The cats are black and the dog is brown.
A red apple, a green pear and an orange are on the plate. The plate is white.
The image is a picture of a city street at night, with lights, cars and people.
A horse stands in a field. Behind the horse there is a large barn and a tall tree.
The bird has blue wings and a yellow head. It is sitting on a branch of the tree.
In this picture, a man is holding an umbrella in the rain. The street is wet.
What animals can you see? I can see a cat, a dog, a horse, a cow and two sheep.
The colors in the image are red, orange, yellow, green, blue, purple, black and white.
She has a red hat and a blue coat. He has a green shirt and black shoes.
Is there a person in the image? Yes, there is a woman walking with her dog.
The number of people in the photo is five. Three are standing and two are sitting.
A large elephant is drinking water from the river. The water is brown and calm.
The table has four legs. On the table there is a cup of coffee and a book.
Please answer the question about the image. Answer with a single word or phrase.
The train is long and it has many cars. It is moving fast across the bridge.
A boat is on the lake. The lake is blue and the mountains behind it are white with snow.
The children are playing with a ball in the garden. The ball is red and white.
This is an image of a kitchen with a white fridge, a stove and a window.
Question: What is the man doing? Answer: The man is riding a bicycle on the road.
Question: What is the weather like? Answer: It is sunny and warm, with a few clouds.
The zebra has black and white stripes. The giraffe has a long neck and brown spots.
There is a clock on the wall. The time is ten o'clock in the morning.
A plate of food with rice, chicken and vegetables. The food looks hot and fresh.
The image contains text that says: Welcome to the park. Please keep the park clean.
Two small birds are flying over the water near the beach at sunset.
The photo was taken inside a room with a bed, a lamp and a large window.
Is the cat sleeping? Yes, the cat is sleeping on the sofa next to a pillow.
How many wheels does the truck have? The truck has six wheels and a green door.
The first image shows a dog and the second image shows a cat.
Look at the picture and tell me what you see. I see a tree, a house and a road.
What is in the image? What is the color of the sky? What is the man holding?
Where is the chair? Which animal is bigger, the dog or the horse?
"""

BOS, EOS, UNK, PAD, IMAGE = "<s>", "</s>", "<unk>", "<pad>", "<image>"
VOCAB_SIZE = 512  # total, including <image> (the last id, like llava-hf's 32000)
IMAGE_SEQ_LENGTH = 36  # (84 / 14) ** 2 patches, CLS dropped by the "default" strategy
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
FORMAT_VERSION = "1"  # bump to invalidate the ensure_* caches

# llava-hf style: content is a string or a list of {"type": "image"} / {"type": "text"} items
# rendered in list order. "USER: <image>\nWhat is this? ASSISTANT:"; assistant: " text</s>".
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set body = message['content'] %}"
    "{% else %}{% set ns = namespace(body='', prev='') %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}"
    "{% set ns.body = ns.body + (' ' if ns.prev == 'text' else '') + '<image>\\n' %}"
    "{% elif item['type'] == 'text' %}"
    "{% if ns.prev == 'text' %}{% set ns.body = ns.body + ' ' %}{% endif %}"
    "{% set ns.body = ns.body + item['text'] %}{% endif %}"
    "{% set ns.prev = item['type'] %}{% endfor %}{% set body = ns.body %}{% endif %}"
    "{% if message['role'] == 'system' %}{{ body + ' ' }}"
    "{% elif message['role'] == 'user' %}{{ 'USER: ' + body + ' ' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' + body + '</s>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def train_tokenizer(out_dir: str | Path, chat_template: str | None) -> None:
    """Train a byte-level BPE tokenizer on CORPUS and save it HF-style into out_dir."""
    import tokenizers as tk
    from transformers import PreTrainedTokenizerFast

    tok = tk.Tokenizer(tk.models.BPE(unk_token=UNK))
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - 1, special_tokens=[UNK, BOS, EOS, PAD],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    # Added after training so that it takes the last id, like llava-hf's <image> = 32000.
    tok.add_special_tokens([tk.AddedToken(IMAGE, special=True, normalized=False)])
    assert tok.get_vocab_size() == VOCAB_SIZE, f"vocab {tok.get_vocab_size()} != {VOCAB_SIZE}"
    tok.post_processor = tk.processors.TemplateProcessing(  # prepend <s> like Llama
        single=f"{BOS}:0 $A:0",
        pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
        special_tokens=[(BOS, tok.token_to_id(BOS))],
    )
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        model_max_length=1024, extra_special_tokens={"image_token": IMAGE},
    )
    if chat_template is not None:
        hf_tok.chat_template = chat_template
    hf_tok.save_pretrained(str(out_dir))


@torch.no_grad()
def _init_non_flat(
    model: torch.nn.Module, seed: int, embed_std: float, head_gain: float, residual_gain: float,
    device: str = "cpu",
) -> None:
    """Re-initialise every parameter from a seeded generator so logits have a clear top-1.

    residual_gain > 1 on the LM's o_proj/down_proj lets the layers, not the token's own
    embedding, dominate the residual stream: random LMs then loop less under greedy decoding.
    """
    gen = torch.Generator(device).manual_seed(seed)

    def randn(shape: torch.Size) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=device)

    for name, p in model.named_parameters():  # tied weights appear once
        leaf = name.rsplit(".", 1)[-1]
        if "norm" in name and leaf == "weight":  # LayerNorm / RMSNorm gains
            new = 1.0 + 0.1 * randn(p.shape)
        elif leaf == "bias":
            new = 0.05 * randn(p.shape)
        elif "embed_tokens" in name:
            new = embed_std * randn(p.shape)
        elif "position_embedding" in name or "class_embedding" in name:
            new = 0.5 * randn(p.shape)
        elif p.dim() >= 2:  # Linear / Conv2d: fan_in = product of all but the output dim
            gain = head_gain if "lm_head" in name else 1.0
            gain = residual_gain if name.endswith(("o_proj.weight", "down_proj.weight")) else gain
            new = gain * randn(p.shape) / p[0].numel() ** 0.5
        else:
            new = 0.1 * randn(p.shape)
        p.copy_(new.to(p.dtype))


def _rewrite_keys(out_dir: Path, rename: dict[str, str]) -> None:
    """Rename tensor-name prefixes in every safetensors file (and the index) in out_dir."""
    from safetensors.torch import load_file, save_file

    if not rename:
        return

    def new_name(key: str) -> str:
        for old, new in rename.items():
            if key.startswith(old):
                return new + key[len(old):]
        raise KeyError(f"no rename rule for tensor {key!r}")

    for path in sorted(out_dir.glob("*.safetensors")):
        tensors = load_file(str(path))
        renamed = {new_name(k): v for k, v in tensors.items()}
        save_file(renamed, str(path), metadata={"format": "pt"})
    index_path = out_dir / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
        index["weight_map"] = {new_name(k): v for k, v in sorted(index["weight_map"].items())}
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


# Prefix renames of what save_pretrained writes. transformers 5 writes "language_model.model.*",
# "language_model.lm_head.weight", "vision_tower.*" (no "vision_model.") and
# "multi_modal_projector.*".
KEY_LAYOUTS: dict[str, dict[str, str]] = {
    "hf": {},
    # Found in the wild: the module paths of transformers >= 4.52 written as they are.
    "model_prefixed": {
        "language_model.model.": "model.language_model.",
        "language_model.lm_head.": "lm_head.",
        "vision_tower.": "model.vision_tower.vision_model.",
        "multi_modal_projector.": "model.multi_modal_projector.",
    },
    # The llava-hf hub layout (e.g. llava-hf/llava-1.5-7b-hf).
    "legacy": {
        "language_model.": "language_model.",
        "vision_tower.": "vision_tower.vision_model.",
        "multi_modal_projector.": "multi_modal_projector.",
    },
}


def _start_dir(out_dir: str | Path, chat_template: str | None) -> tuple[Path, Any]:
    """Create out_dir, drop weights left by an earlier run, write and reload the tokenizer."""
    from transformers import AutoTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.safetensors"), *out.glob("*.safetensors.index.json")]:
        stale.unlink()
    train_tokenizer(out, chat_template)
    return out, AutoTokenizer.from_pretrained(str(out))


def _save(model: torch.nn.Module, out: Path, dtype: torch.dtype, sharded: bool) -> None:
    shard = "500KB" if sharded else "10GB"  # 500KB: ~9 shards for tiny LLaVA in fp32
    model.to(dtype).save_pretrained(str(out), safe_serialization=True, max_shard_size=shard)


def _tiny_vision_text(tok: Any, vision_sizes: dict | None, text_sizes: dict | None) -> tuple[Any, Any]:
    import transformers as hf

    vision = hf.CLIPVisionConfig(**{
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
        "image_size": 84, "patch_size": 14, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, **(vision_sizes or {}),
    })
    text = hf.LlamaConfig(**{
        "vocab_size": len(tok), "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-5, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
        **(text_sizes or {}),
    })
    return vision, text


def _clip_preprocessor(tile: int) -> dict:
    return {
        "image_processor_type": "CLIPImageProcessor", "processor_class": "LlavaProcessor",
        "do_resize": True, "size": {"shortest_edge": tile}, "resample": 3,
        "do_center_crop": True, "crop_size": {"height": tile, "width": tile},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "do_convert_rgb": True,
    }


def make_tiny_llava(
    out_dir: str | Path,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    sharded: bool = False,
    key_layout: str = "hf",
    vision_sizes: dict | None = None,
    text_sizes: dict | None = None,
) -> Path:
    """Write a tiny LLaVA-1.5-style checkpoint (CLIP ViT + MLP projector + Llama) to out_dir.
    vision_sizes / text_sizes override the CLIP / Llama config fields (e.g. a head_dim the
    CUDA kernels take, for GPU tests)."""
    import transformers as hf

    if key_layout not in KEY_LAYOUTS:
        raise ValueError(f"key_layout={key_layout!r}; expected one of {sorted(KEY_LAYOUTS)}")
    out, tok = _start_dir(out_dir, LLAVA_CHAT_TEMPLATE)
    vision, text = _tiny_vision_text(tok, vision_sizes, text_sizes)
    config = hf.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids(IMAGE),
        projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=IMAGE_SEQ_LENGTH,
    )
    torch.manual_seed(seed)
    model = hf.LlavaForConditionalGeneration(config).eval()
    _init_non_flat(model, seed, embed_std=1.0, head_gain=3.0, residual_gain=1.0)
    _save(model, out, dtype, sharded)
    _rewrite_keys(out, KEY_LAYOUTS[key_layout])
    (out / "preprocessor_config.json").write_text(json.dumps(_clip_preprocessor(vision.image_size), indent=2) + "\n")
    return out


# LLaVA-NeXT tile grids (height, width) for the tiny tower's 84 x 84 tiles: 1x2, 2x1, 2x2, 1x3, 3x1
TINY_PINPOINTS = [[84, 168], [168, 84], [168, 168], [252, 84], [84, 252]]
# The llava-hf hub layout of LLaVA-NeXT (e.g. llava-hf/llava-v1.6-vicuna-7b-hf): legacy + image_newline.
NEXT_KEY_LAYOUTS: dict[str, dict[str, str]] = {
    **KEY_LAYOUTS,
    "model_prefixed": {**KEY_LAYOUTS["model_prefixed"], "image_newline": "model.image_newline"},
    "legacy": {**KEY_LAYOUTS["legacy"], "image_newline": "image_newline"},
}


def make_tiny_llava_next(
    out_dir: str | Path,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    sharded: bool = False,
    key_layout: str = "hf",
    vision_sizes: dict | None = None,
    text_sizes: dict | None = None,
    pinpoints: list[list[int]] | None = None,
) -> Path:
    """Write a tiny LLaVA-NeXT checkpoint (anyres tiles of the tiny CLIP tower, image_newline,
    MLP projector, Llama) to out_dir; the tokenizer and chat template are tiny LLaVA's.
    pinpoints: the (height, width) tile grids, multiples of the tower's image_size (84 unless
    vision_sizes says otherwise; then give pinpoints that fit it)."""
    import transformers as hf

    if key_layout not in NEXT_KEY_LAYOUTS:
        raise ValueError(f"key_layout={key_layout!r}; expected one of {sorted(NEXT_KEY_LAYOUTS)}")
    out, tok = _start_dir(out_dir, LLAVA_CHAT_TEMPLATE)
    vision, text = _tiny_vision_text(tok, vision_sizes, text_sizes)
    pinpoints = pinpoints or TINY_PINPOINTS
    config = hf.LlavaNextConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids(IMAGE),
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_grid_pinpoints=pinpoints, image_seq_length=IMAGE_SEQ_LENGTH,
    )
    torch.manual_seed(seed)
    model = hf.LlavaNextForConditionalGeneration(config).eval()
    _init_non_flat(model, seed, embed_std=1.0, head_gain=3.0, residual_gain=1.0)
    with torch.no_grad():  # as large as a token embedding (std 1): the newline rows matter to the logits
        model.model.image_newline.copy_(torch.randn(text.hidden_size, generator=torch.Generator().manual_seed(seed)))
    _save(model, out, dtype, sharded)
    _rewrite_keys(out, NEXT_KEY_LAYOUTS[key_layout])
    tile = vision.image_size
    preprocessor = {**_clip_preprocessor(tile), "image_processor_type": "LlavaNextImageProcessor",
                    "processor_class": "LlavaNextProcessor", "do_pad": True, "image_grid_pinpoints": pinpoints}
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    processor = {"processor_class": "LlavaNextProcessor", "patch_size": vision.patch_size,
                 "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    return out


def make_tiny_llama(
    out_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32, sharded: bool = False
) -> Path:
    """Write a tiny Llama-3-style checkpoint: GQA, llama3 RoPE, tied embeddings, no template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out, tok = _start_dir(out_dir, None)
    rope = {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
    }
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, head_dim=16, intermediate_size=288,
        num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
        max_position_embeddings=1024, rms_norm_eps=1e-5,
        rope_parameters=rope, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    # Tied: lm_head is embed_tokens, so its std sets the logit scale (~0.3 * sqrt(128) ≈ 3.4).
    _init_non_flat(model, seed, embed_std=0.3, head_gain=1.0, residual_gain=3.0)
    _save(model, out, dtype, sharded)
    return out


def _cache_root() -> Path:
    return Path(os.environ.get("EPD_CACHE_DIR") or Path.home() / ".cache" / "epd-engine")


def default_tiny_llava_dir() -> Path:
    """Cache directory of the default tiny LLaVA checkpoint."""
    return _cache_root() / "tiny-llava"


def default_tiny_llava_next_dir() -> Path:
    """Cache directory of the default tiny LLaVA-NeXT checkpoint."""
    return _cache_root() / "tiny-llava-next"


def default_tiny_llama_dir() -> Path:
    """Cache directory of the default tiny Llama checkpoint."""
    return _cache_root() / "tiny-llama"


def _is_current(target: Path) -> bool:
    stamp = target / "tiny_model_version.txt"
    return stamp.exists() and stamp.read_text().strip() == FORMAT_VERSION


def _ensure(target: Path, make: Callable[[Path], Path]) -> Path:
    """Build target once: write into a temp dir beside it, then rename it into place."""
    if _is_current(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        make(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        (tmp / "tiny_model_version.txt").write_text(FORMAT_VERSION + "\n")
        if target.exists() and not _is_current(target):  # older FORMAT_VERSION: move aside
            trash = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
            with contextlib.suppress(OSError):
                target.rename(trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        with contextlib.suppress(OSError):  # fails if another process won the race: same files
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_tiny_llava() -> Path:
    """Return the cached tiny LLaVA checkpoint, making it on first use."""
    return _ensure(default_tiny_llava_dir(), make_tiny_llava)


def ensure_tiny_llava_next() -> Path:
    """Return the cached tiny LLaVA-NeXT checkpoint, making it on first use."""
    return _ensure(default_tiny_llava_next_dir(), make_tiny_llava_next)


def ensure_tiny_llama() -> Path:
    """Return the cached tiny Llama checkpoint, making it on first use."""
    return _ensure(default_tiny_llama_dir(), make_tiny_llama)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    from engine.cli import ArgumentParser

    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--kind", choices=["llava", "llava-next", "llama"], required=True, help="which tiny model")
    parser.add_argument("--out", type=Path, required=True, help="output checkpoint dir")
    parser.add_argument("--seed", type=int, default=0, help="weight seed")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weight dtype on disk")
    parser.add_argument("--sharded", action="store_true", help="write several safetensors shards and an index")
    parser.add_argument("--key-layout", choices=sorted(KEY_LAYOUTS), default="hf",
                        help="LLaVA(-NeXT) weight names: hf as transformers saves them; others as found in the wild")
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype]
    if args.kind == "llava":
        out = make_tiny_llava(
            args.out, args.seed, dtype, sharded=args.sharded, key_layout=args.key_layout
        )
    elif args.kind == "llava-next":
        out = make_tiny_llava_next(args.out, args.seed, dtype, sharded=args.sharded, key_layout=args.key_layout)
    else:
        if args.key_layout != "hf":
            parser.error("--key-layout applies to --kind llava and llava-next only")
        out = make_tiny_llama(args.out, args.seed, dtype, sharded=args.sharded)
    print(out)
    return 0


if __name__ == "__main__":
    import sys

    if str(Path(__file__).resolve().parents[1]) not in sys.path:  # engine.cli, when run as a file
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from engine.cli import run_main

    sys.exit(run_main(main))
