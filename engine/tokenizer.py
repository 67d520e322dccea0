"""Prompt building, tokenization, `<image>` expansion and incremental detokenization."""

from __future__ import annotations

import json
import re
from pathlib import Path

from engine.config import ConfigError, ModelConfig
from engine.sampling import RequestError

IMAGE_TAG = "<image>"
LLAVA_FALLBACK = "USER: {prompt} ASSISTANT:"
CHAT_ROLES = ("system", "user", "assistant")


class Tokenizer:
    """The checkpoint's HF tokenizer plus the prompt conventions of LLaVA."""

    def __init__(self, model_dir: str | Path, cfg: ModelConfig) -> None:
        from transformers import AutoTokenizer

        model_dir = Path(model_dir)
        try:
            self.hf = AutoTokenizer.from_pretrained(str(model_dir))
        except Exception as e:  # transformers raises many types for a bad/missing tokenizer
            raise ConfigError(f"cannot load the tokenizer from {model_dir}: {e}") from e
        self.cfg = cfg
        self.chat_template = self.hf.chat_template or _template_file(model_dir)
        self.image_token_id = cfg.image_token_id
        self.bos_id = self.hf.bos_token_id
        eos = set(cfg.text.eos_token_ids)
        if self.hf.eos_token_id is not None:
            eos.add(self.hf.eos_token_id)
        gen_cfg = model_dir / "generation_config.json"
        if gen_cfg.is_file():
            gen_eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
            eos.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        self.eos_token_ids = tuple(sorted(eos))

    def build_prompt(self, prompt: str, num_images: int, raw: bool = False) -> str:
        """Render the text the model sees. Without `<image>` tags, one per image is put first."""
        if raw:
            return prompt
        auto = num_images and IMAGE_TAG not in prompt
        if self.chat_template is None:
            prompt = (IMAGE_TAG + "\n") * num_images + prompt if auto else prompt
            return LLAVA_FALLBACK.format(prompt=prompt)
        prompt = IMAGE_TAG * num_images + prompt if auto else prompt  # the template lays images out
        return self.hf.apply_chat_template(
            [{"role": "user", "content": _parts(prompt)}],
            chat_template=self.chat_template,
            add_generation_prompt=True,
            tokenize=False,
        )

    def render_chat(self, messages: list[dict]) -> str:
        """A conversation as the model sees it, the generation prompt added: messages are
        {"role": "system" | "user" | "assistant", "content": text with `<image>` where each image
        goes}, rendered with the checkpoint's chat template (each content as text / image parts,
        as build_prompt renders one user message); without a template, LLaVA-1.5's
        `USER: ... ASSISTANT: ...</s>` turns. Use the result with raw_prompt=True."""
        for i, m in enumerate(messages):
            if m.get("role") not in CHAT_ROLES or not isinstance(m.get("content"), str):
                raise RequestError(f"messages[{i}]: needs a role in {CHAT_ROLES} and a string content")
        if self.chat_template is None:
            eos = self.hf.eos_token or ""
            turns = {"system": "{} ", "user": "USER: {} ", "assistant": "ASSISTANT: {}" + eos}
            text = "".join(turns[m["role"]].format(m["content"].replace(IMAGE_TAG, IMAGE_TAG + "\n"))
                           for m in messages)
            return text + "ASSISTANT:"
        conversation = [{"role": m["role"], "content": _parts(m["content"])} for m in messages]
        try:
            return self.hf.apply_chat_template(conversation, chat_template=self.chat_template,
                                               add_generation_prompt=True, tokenize=False)
        except Exception as e:  # jinja's TemplateError (e.g. "roles must alternate") and the like
            raise RequestError(f"messages: the checkpoint's chat template cannot render them: {e}") from e

    def encode(self, text: str, images: int | list[tuple[int, int]]) -> list[int]:
        """Token ids with a single BOS and each image token expanded to the image's token count.
        images: each image's (height, width), or only their number where the count does not
        depend on the size (LLaVA-1.5; LLaVA-NeXT needs the sizes)."""
        num_images = images if isinstance(images, int) else len(images)
        ids = self.hf.encode(text, add_special_tokens=True)
        if self.bos_id is not None and ids[:2] == [self.bos_id, self.bos_id]:
            ids = ids[1:]  # the template already wrote BOS
        image_id = self.image_token_id
        found = ids.count(image_id) if image_id is not None else 0
        if found != num_images:
            raise RequestError(
                f"prompt has {found} {IMAGE_TAG} tag(s) but {num_images} image(s) were given; "
                "they must match"
            )
        if not found:
            return ids
        sizes = [(None, None)] * num_images if isinstance(images, int) else images
        if isinstance(images, int) and self.cfg.is_anyres:
            raise RequestError(f"{self.cfg.architecture}: an image's token count depends on its size; "
                               "give each image's (height, width)")
        counts = iter([self.cfg.image_layout(h, w).num_tokens for h, w in sizes])
        out: list[int] = []
        for t in ids:
            out.extend([t] * next(counts) if t == image_id else [t])
        return out

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)


def _parts(text: str) -> list[dict]:
    """Chat-template content: text pieces and an image part where each `<image>` is."""
    return [{"type": "image"} if piece == IMAGE_TAG else {"type": "text", "text": piece}
            for piece in re.split(f"({re.escape(IMAGE_TAG)})", text) if piece]


def _template_file(model_dir: Path) -> str | None:
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    js = model_dir / "chat_template.json"
    if js.is_file():
        return json.loads(js.read_text()).get("chat_template")
    return None


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, holding back incomplete UTF-8.

    With a fast (Rust) tokenizer whose decode does no Python-side space clean-up, each token is one
    step of `tokenizers`' DecodeStream (~1 us); otherwise two decodes of a short window (~15 us a
    token on a 2-core host: most of the frontend's cost per token at large batches)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""
        hf = getattr(tokenizer, "hf", None)  # an engine Tokenizer's transformers tokenizer
        self._backend = getattr(hf, "backend_tokenizer", None)
        self._stream = None
        if self._backend is not None and not getattr(hf, "clean_up_tokenization_spaces", False):
            from tokenizers.decoders import DecodeStream  # tokenizers >= 0.23 (transformers 5.17's pin)

            self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token; return the newly complete text (possibly empty)."""
        self.ids.append(token_id)
        if self._stream is not None:
            delta = self._stream.step(self._backend, token_id) or ""
            self.text += delta
            return delta
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset], self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset :], self.skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """Text still held back at the end of generation."""
        full = self.tok.decode(self.ids, self.skip)
        delta = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text += delta
        return delta
