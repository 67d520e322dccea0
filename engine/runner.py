"""Model runner: owns the weights, the KV arena and the ops backend; turns a batch of
sequences into tensors, runs one forward step and samples."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import ModelConfig
from engine.loader import load_model
from engine.models.llama import AttentionMetadata
from engine.request import Sequence
from kernels import get_backend


@dataclass
class StepOutput:
    token_ids: list[int]  # one per sequence
    logits: torch.Tensor  # [B, V] fp32 at each sequence's last token, or [T, V] with all_logits


class ModelRunner:
    def __init__(
        self,
        cfg: ModelConfig,
        model_dir: str,
        dtype: torch.dtype,
        device: torch.device,
        backend: str,
        block_size: int,
        num_blocks: int,
        progress: bool | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = device
        self.dtype = dtype
        self.ops = get_backend(backend, device, dtype)
        self.backend = "cuda" if self.ops.__name__.endswith("cuda_ops") else "torch"
        self.model = load_model(cfg, model_dir, dtype, device, progress=progress)
        t = cfg.text
        self.block_size = block_size
        # [num_blocks, num_layers, 2, block_size, kv_heads, head_dim]
        self.kv_arena = torch.zeros(
            num_blocks, t.num_layers, 2, block_size, t.num_kv_heads, t.head_dim, dtype=dtype, device=device
        )

    # ------------------------------------------------------------------ images

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] -> [N, tokens_per_image, hidden]."""
        return self.model.encode_images(self.ops, pixel_values.to(self.device))

    # ------------------------------------------------------------------ steps

    def _tensor(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(len(s.block_table) for s in seqs)
        return self._tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], torch.int32)

    def _slot(self, seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    @torch.inference_mode()
    def step(self, seqs: list[Sequence], is_prefill: bool, all_logits: bool = False) -> StepOutput:
        """Run one forward over `seqs` (prefill: each sequence's uncached tokens; decode: its
        last token) and sample one token per sequence. Updates num_cached."""
        image_id = self.cfg.image_token_id
        ids, positions, slots, cu, image_index, embeds = [], [], [], [0], [], []
        for seq in seqs:
            start = seq.num_cached if is_prefill else seq.num_tokens - 1
            tokens = seq.all_ids[start:]
            image_rows = self._image_rows(seq, start, image_id, sum(e.shape[0] for e in embeds))
            if image_rows is not None:
                index, seq_embeds = image_rows
                image_index += index
                embeds.append(seq_embeds)
            else:
                image_index += [-1] * len(tokens)
            ids += tokens
            positions += range(start, seq.num_tokens)
            slots += [self._slot(seq, p) for p in range(start, seq.num_tokens)]
            cu.append(cu[-1] + len(tokens))
        meta = AttentionMetadata(
            is_prefill=is_prefill,
            slot_mapping=self._tensor(slots, torch.int64),
            seq_lens=self._tensor([s.num_tokens for s in seqs], torch.int32),
            block_tables=self._block_tables(seqs),
            cu_seqlens_q=self._tensor(cu, torch.int32) if is_prefill else None,
            max_seqlen_q=max(b - a for a, b in zip(cu, cu[1:])),
        )
        hidden = self.model(
            self.ops,
            self._tensor(ids, torch.int64),
            self._tensor(positions, torch.int64),
            meta,
            self.kv_arena,
            image_index=self._tensor(image_index, torch.int64) if embeds else None,
            image_embeds=torch.cat(embeds) if embeds else None,
        )
        last = self._tensor([c - 1 for c in cu[1:]], torch.int64)
        logits = self.model.compute_logits(hidden if all_logits else hidden[last])
        tokens = self.sample(logits[last] if all_logits else logits, seqs)
        for seq in seqs:
            seq.num_cached = seq.num_tokens
        return StepOutput(tokens, logits)

    def _image_rows(
        self, seq: Sequence, start: int, image_id: int | None, offset: int
    ) -> tuple[list[int], torch.Tensor] | None:
        """Image-embedding rows for seq's tokens from `start` on, or None if it has none there."""
        if seq.pixel_values is None or image_id is None or start >= len(seq.prompt_ids):
            return None
        seq_embeds = self.encode_images(seq.pixel_values).flatten(0, 1)  # [images * tokens, H]
        image_positions = [p for p, t in enumerate(seq.prompt_ids) if t == image_id]
        assert len(image_positions) == seq_embeds.shape[0], "image tokens and embeddings disagree"
        row_of = {p: i for i, p in enumerate(image_positions)}
        index = [offset + row_of[p] if p in row_of else -1 for p in range(start, seq.num_tokens)]
        return index, seq_embeds

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        sp = [s.sampling for s in seqs]
        tokens = self.ops.sample(
            logits,
            self._tensor([p.temperature for p in sp], torch.float32),
            self._tensor([p.top_k for p in sp], torch.int64),
            self._tensor([p.top_p for p in sp], torch.float32),
            self._tensor([s.seed for s in seqs], torch.int64),
            self._tensor([len(s.output_ids) for s in seqs], torch.int64),
        )
        return tokens.tolist()
