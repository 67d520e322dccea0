"""CLIP vision tower (up to the LLaVA feature layer) and the LLaVA projector."""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from engine.config import ModelConfig, VisionConfig
from engine.models.llama import _weight


class CLIPLayer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.layer_norm1_weight, self.layer_norm1_bias = _weight(h), _weight(h)
        self.qkv_proj_weight, self.qkv_proj_bias = _weight(3 * h, h), _weight(3 * h)
        self.out_proj_weight, self.out_proj_bias = _weight(h, h), _weight(h)
        self.layer_norm2_weight, self.layer_norm2_bias = _weight(h), _weight(h)
        self.fc1_weight, self.fc1_bias = _weight(i, h), _weight(i)
        self.fc2_weight, self.fc2_bias = _weight(h, i), _weight(h)

    def forward(
        self, ops: ModuleType, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the previous layer's MLP output, the residual stream) [N, L, C] -> this layer's; the
        first layer takes (its input, None). The layer's output is their sum: each residual add
        happens in the LayerNorm after it (ops.add_layer_norm: the same bits as the add and then
        the norm, in one pass)."""
        cfg = self.cfg
        n, length, c = hidden.shape
        eps = cfg.layer_norm_eps
        if residual is None:
            residual, x = hidden, ops.layer_norm(hidden, self.layer_norm1_weight, self.layer_norm1_bias, eps)
        else:
            x, residual = ops.add_layer_norm(hidden, residual, self.layer_norm1_weight, self.layer_norm1_bias, eps)
        qkv = ops.linear(x, self.qkv_proj_weight, self.qkv_proj_bias).view(n, length, 3, cfg.num_heads, cfg.head_dim)
        attn = ops.attention_dense(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], cfg.head_dim**-0.5)
        out = ops.linear(attn.reshape(n, length, c), self.out_proj_weight, self.out_proj_bias)
        x, residual = ops.add_layer_norm(out, residual, self.layer_norm2_weight, self.layer_norm2_bias, eps)
        act = ops.quick_gelu if cfg.hidden_act == "quick_gelu" else ops.gelu
        x = act(ops.linear(x, self.fc1_weight, self.fc1_bias))
        return ops.linear(x, self.fc2_weight, self.fc2_bias), residual


class VisionTower(nn.Module):
    """CLIP ViT embeddings + the first `vision_layers_used` encoder layers + projector."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        assert cfg.vision is not None
        v = cfg.vision
        self.cfg = cfg
        self.class_embedding = _weight(v.hidden_size)
        self.patch_embedding = _weight(v.hidden_size, 3 * v.patch_size * v.patch_size)  # conv as a GEMM
        self.position_embedding = _weight(v.num_patches + 1, v.hidden_size)
        self.pre_layrnorm_weight, self.pre_layrnorm_bias = _weight(v.hidden_size), _weight(v.hidden_size)
        self.layers = nn.ModuleList(CLIPLayer(v) for _ in range(cfg.vision_layers_used))
        lm = cfg.text.hidden_size
        bias = (lambda n: _weight(n)) if cfg.projector_bias else (lambda n: None)
        self.linear_1_weight, self.linear_1_bias = _weight(lm, v.hidden_size), bias(lm)
        self.linear_2_weight, self.linear_2_bias = _weight(lm, lm), bias(lm)

    def forward(self, ops: ModuleType, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, 3, S, S] -> image embeddings [N, tokens_per_image, lm_hidden]."""
        v = self.cfg.vision
        n, p = pixel_values.shape[0], v.patch_size
        g = v.image_size // p
        pixels = pixel_values.to(self.patch_embedding.dtype)
        patches = pixels.reshape(n, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, 3 * p * p)
        embeds = ops.linear(patches, self.patch_embedding)  # [N, P, C]
        cls = self.class_embedding.expand(n, 1, -1)
        hidden = torch.cat([cls, embeds], dim=1) + self.position_embedding
        hidden = ops.layer_norm(hidden, self.pre_layrnorm_weight, self.pre_layrnorm_bias, v.layer_norm_eps)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(ops, hidden, residual)
        if residual is not None:
            hidden = residual + hidden  # the last layer's output (HF's order: residual first)
        if self.cfg.vision_feature_select_strategy == "default":
            hidden = hidden[:, 1:]
        act = ops.gelu if self.cfg.projector_hidden_act == "gelu" else ops.quick_gelu
        x = act(ops.linear(hidden, self.linear_1_weight, self.linear_1_bias))
        return ops.linear(x, self.linear_2_weight, self.linear_2_bias)
