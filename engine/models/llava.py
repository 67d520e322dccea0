"""The served model: a Llama LM, plus a CLIP tower and projector for LLaVA checkpoints (and, for
LLaVA-NeXT, the image_newline vector that ends each row of a tiled image's features)."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch
from torch import nn

from engine.config import ModelConfig
from engine.models.clip import VisionTower
from engine.models.llama import AttentionMetadata, LlamaModel, _weight

PARTS = ("all", "vision", "lm")


class MultimodalModel(nn.Module):
    """parts: "all", or one half for a disaggregated stage: "vision" (tower + projector: an
    encoder) or "lm" (the language model: prefill and decode)."""

    def __init__(self, cfg: ModelConfig, parts: str = "all") -> None:
        super().__init__()
        if parts not in PARTS:
            raise ValueError(f"parts = {parts!r}; use one of {PARTS}")
        if parts == "vision" and not cfg.is_multimodal:
            raise ValueError(f"parts = 'vision': {cfg.architecture} has no vision tower")
        self.cfg = cfg
        self.lm = LlamaModel(cfg.text) if parts != "vision" else None
        self.vision = VisionTower(cfg) if cfg.is_multimodal and parts != "lm" else None
        # read by prefill where the image layout says NEWLINE (engine/image_layout.py)
        self.image_newline = _weight(cfg.text.hidden_size) if cfg.is_anyres and parts != "vision" else None

    def encode_images(self, ops: ModuleType, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, 3, S, S] -> [N, tokens_per_item, hidden]: N items (CLIP images or
        LLaVA-NeXT tiles), each on its own."""
        if self.vision is None:
            raise ValueError(f"{self.cfg.architecture} has no vision tower here; images are not accepted")
        return self.vision(ops, pixel_values)

    def forward(
        self,
        ops: ModuleType,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        meta: AttentionMetadata,
        kv_arena: torch.Tensor,
        image_index: torch.Tensor | None = None,  # [T] int64: row of image_embeds, -1 for text
        image_embeds: torch.Tensor | None = None,  # [N, hidden]
        image_rows_from: tuple = (),  # (positions [M], rows [M], embeds [N', hidden]) from further arenas
        newline_at: torch.Tensor | None = None,  # [K] int64: positions that take image_newline (NeXT)
        after_layer: Callable[[int], None] | None = None,  # LlamaModel.forward's
    ) -> torch.Tensor:
        embeds = ops.embed_tokens(input_ids, self.lm.embed_tokens, image_index, image_embeds)
        for at, rows, source in image_rows_from:  # read in place (an encoder's arena on this device)
            embeds.index_copy_(0, at, source.index_select(0, rows).to(embeds.dtype))
        if newline_at is not None:
            newline = self.image_newline.to(embeds.dtype)
            embeds.index_copy_(0, newline_at, newline.expand(newline_at.shape[0], -1))
        return self.lm(ops, embeds, positions, meta, kv_arena, after_layer)

    def compute_logits(self, ops: ModuleType, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm.compute_logits(ops, hidden)
