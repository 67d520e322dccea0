"""Prompt building and tokenization match HF's LlavaProcessor; detokenization streams exactly."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import ModelConfig
from engine.sampling import RequestError
from engine.tokenizer import IncrementalDetokenizer, Tokenizer


@pytest.fixture(scope="module")
def tok(tiny_llava: Path) -> Tokenizer:
    return Tokenizer(tiny_llava, ModelConfig.from_dir(tiny_llava))


def test_matches_hf_llava_processor(tok: Tokenizer, tiny_llava: Path) -> None:
    from transformers import AutoTokenizer, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    hf_tok = AutoTokenizer.from_pretrained(tiny_llava)
    proc = LlavaProcessor(image_processor=CLIPImageProcessorPil.from_pretrained(tiny_llava), tokenizer=hf_tok,
                          patch_size=14, vision_feature_select_strategy="default", image_token="<image>",
                          num_additional_image_tokens=1)
    for prompt, n in [("What is this?", 1), ("Compare <image> and <image> please", 2), ("Just text", 0)]:
        text = tok.build_prompt(prompt, n)
        ours = tok.encode(text, n)
        import numpy as np

        images = [np.zeros((84, 84, 3), dtype=np.uint8) + 7] * n or None
        theirs = proc(text=text, images=images, return_tensors="pt")["input_ids"][0].tolist()
        assert ours == theirs, prompt


def test_template_and_fallback(tok: Tokenizer, tiny_llama: Path) -> None:
    assert tok.build_prompt("Hi", 1) == "USER: <image>\nHi ASSISTANT:"
    assert tok.build_prompt("raw <image> text", 1, raw=True) == "raw <image> text"
    llama = Tokenizer(tiny_llama, ModelConfig.from_dir(tiny_llama))
    assert llama.chat_template is None
    assert llama.build_prompt("Hello", 0) == "USER: Hello ASSISTANT:"


def test_image_expansion_and_single_bos(tok: Tokenizer) -> None:
    ids = tok.encode(tok.build_prompt("a <image> b <image>", 2), 2)
    assert ids.count(tok.image_token_id) == 2 * 36
    assert ids[0] == tok.bos_id and ids[1] != tok.bos_id


@pytest.mark.parametrize(("prompt", "n", "found"), [("<image> <image> two", 1, 2), ("<image> one", 2, 1)])
def test_image_count_mismatch(tok: Tokenizer, prompt: str, n: int, found: int) -> None:
    with pytest.raises(RequestError, match=f"prompt has {found} <image> tag\\(s\\) but {n} image\\(s\\)"):
        tok.encode(tok.build_prompt(prompt, n), n)


def test_incremental_detokenizer_equals_full_decode(tok: Tokenizer) -> None:
    import random

    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(4, 511) for _ in range(rng.randrange(1, 60))]
        detok = IncrementalDetokenizer(tok)
        text = "".join(detok.add(t) for t in ids) + detok.flush()
        assert text == tok.decode(ids)
