"""The served model: a Llama LM, plus a CLIP tower and projector for LLaVA checkpoints."""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from engine.config import ModelConfig
from engine.models.clip import VisionTower
from engine.models.llama import AttentionMetadata, LlamaModel


class MultimodalModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.lm = LlamaModel(cfg.text)
        self.vision = VisionTower(cfg) if cfg.is_multimodal else None

    def encode_images(self, ops: ModuleType, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, 3, S, S] -> [N, tokens_per_image, hidden]."""
        if self.vision is None:
            raise ValueError(f"{self.cfg.architecture} has no vision tower; images are not accepted")
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
    ) -> torch.Tensor:
        embeds = ops.embed_tokens(input_ids, self.lm.embed_tokens, image_index, image_embeds)
        return self.lm(ops, embeds, positions, meta, kv_arena)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm.compute_logits(hidden)
