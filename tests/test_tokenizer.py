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


@pytest.mark.parametrize("skip", [True, False])
def test_decode_stream_gives_the_window_decoders_deltas(tok: Tokenizer, skip: bool) -> None:
    """The fast path (tokenizers' DecodeStream) emits the same delta at every token as the
    two-decode window it replaces, special tokens (ids 0-3) included, kept or skipped."""
    import random

    rng = random.Random(5)
    for _ in range(50):
        ids = [rng.randrange(0, tok.hf.vocab_size) for _ in range(rng.randrange(1, 80))]
        fast, window = IncrementalDetokenizer(tok, skip), IncrementalDetokenizer(tok, skip)
        assert fast._stream is not None, "a fast tokenizer without clean-up takes the DecodeStream path"
        window._stream = None
        assert [fast.add(t) for t in ids] == [window.add(t) for t in ids]
        assert fast.flush() == window.flush()
        assert fast.text == tok.decode(ids, skip)


def test_a_tokenizer_that_cleans_up_spaces_keeps_the_window_decoder(tok: Tokenizer, monkeypatch) -> None:
    """DecodeStream does not do transformers' Python-side clean-up of spaces: such tokenizers
    decode through the window, whose text is decode()'s."""
    monkeypatch.setattr(tok.hf, "clean_up_tokenization_spaces", True)
    assert IncrementalDetokenizer(tok)._stream is None
