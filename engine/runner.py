"""Model runner: owns the weights, the KV arena and the ops backend; turns a batch of
sequences into tensors, runs one forward step and samples."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine.config import ModelConfig
from engine.loader import load_model
from engine.logprobs import LogprobBatch, append_records, logprob_rows, token_logprobs
from engine.models.llama import AttentionMetadata
from engine.penalties import PenaltyState
from engine.request import Sequence
from engine.sampling import SamplingParams
from graphs.decode_graphs import DecodeGraphs
from graphs.vision_graphs import VisionGraphs
from kernels import get_backend

log = logging.getLogger(__name__)


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
        num_kv_blocks: int | None,
        max_images_per_batch: int = 8,
        gpu_memory_utilization: float = 0.9,
        max_num_batched_tokens: int = 8192,
        max_num_seqs: int = 64,
        progress: bool | None = None,
        parts: str = "all",
    ) -> None:
        """num_kv_blocks None: size the KV arena from the GPU memory left after weights and a
        profiled forward at max_num_batched_tokens (gpu_memory_utilization of the card).
        parts "vision" or "lm": load only that half of the model (a disaggregated stage); a
        vision-only runner has no KV arena and no decode graphs."""
        self.cfg = cfg
        self.device = device
        self.dtype = dtype
        self.ops = get_backend(backend, device, dtype)
        self.backend = "cuda" if self.ops.__name__.endswith("cuda_ops") else "torch"
        self.model = load_model(cfg, model_dir, dtype, device, progress=progress, parts=parts)
        self.parts = parts
        self.vision_graphs: VisionGraphs | None = None  # captured by capture_graphs
        self.block_size = block_size
        # MM arena [num_mm_blocks, tokens_per_image, hidden]: one block per image in flight.
        self.num_mm_blocks = 2 * max_images_per_batch if cfg.is_multimodal else 0
        self.mm_arena = torch.empty(
            self.num_mm_blocks, cfg.image_tokens_per_image if cfg.is_multimodal else 0, cfg.text.hidden_size,
            dtype=dtype, device=device,
        )
        # Penalty state (engine/penalties.py): one slot per running sequence plus headroom for
        # preempted ones; allocated before the KV arena is sized from what is left.
        penalty_slots = max_num_seqs + max(16, max_num_seqs // 4) if self.model.lm is not None else 0
        self.penalties = PenaltyState(penalty_slots, cfg.text.vocab_size, device)
        if self.model.lm is None:
            num_kv_blocks = 0
        elif num_kv_blocks is None:
            num_kv_blocks = self._kv_blocks_from_memory(gpu_memory_utilization, max_num_batched_tokens)
        self.num_kv_blocks = num_kv_blocks
        self.kv_arena = self._alloc_kv(num_kv_blocks)
        max_blocks = -(-cfg.text.max_position_embeddings // block_size)
        self.decode_graphs = DecodeGraphs(self, max_num_seqs, max_blocks) if self.model.lm is not None else None
        self.max_images_per_batch = max_images_per_batch

    def capture_graphs(self, background: bool = False) -> None:
        """Capture vision graphs per image-batch bucket (multimodal models), then decode graphs
        per batch bucket (cuda backend only; decode in the background if asked)."""
        if self.backend != "cuda":
            raise ValueError("CUDA graphs need the cuda backend")
        if not self.has_attention_kernel:
            log.warning("head_dim %d has no attention kernel: decode runs eagerly", self.cfg.text.head_dim)
            return
        if self.model.vision is not None:
            self.vision_graphs = VisionGraphs(self, self.max_images_per_batch)
            self.vision_graphs.capture_all()
        if self.decode_graphs is not None:
            self.decode_graphs.capture_all(background)

    @property
    def has_attention_kernel(self) -> bool:
        """The model's head_dim has a CUDA attention kernel; the torch fallback for other head
        dims syncs with the host, so such a model cannot run under CUDA graphs."""
        from kernels.attn_varlen import KERNEL_HEAD_DIMS

        return self.cfg.text.head_dim in KERNEL_HEAD_DIMS

    def _alloc_kv(self, num_blocks: int) -> torch.Tensor:
        t = self.cfg.text
        # [num_blocks, num_layers, 2, block_size, kv_heads, head_dim]
        return torch.zeros(num_blocks, t.num_layers, 2, self.block_size, t.num_kv_heads, t.head_dim,
                           dtype=self.dtype, device=self.device)

    @torch.inference_mode()
    def copy_kv_blocks(self, src: list[int], dst: list[int]) -> None:
        """KV block dst[i] := block src[i], all layers (copy-on-write of a shared block: the n
        samples of a prompt each get their own copy of its last, partially filled block). The
        arena is block-major, so each is one contiguous copy on the arena's stream."""
        if len(src) != len(dst):
            raise ValueError(f"copy_kv_blocks: {len(src)} sources for {len(dst)} destinations")
        for s, d in zip(src, dst):
            self.kv_arena[d].copy_(self.kv_arena[s])

    @property
    def kv_block_bytes(self) -> int:
        t = self.cfg.text
        return t.num_layers * 2 * self.block_size * t.num_kv_heads * t.head_dim * self.dtype.itemsize

    def _kv_blocks_from_memory(self, utilization: float, max_tokens: int) -> int:
        if self.device.type != "cuda":
            raise ValueError("num_kv_blocks must be given on the CPU (LLM sets it from kv_cache_tokens)")
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)  # weights + MM arena
        tokens = min(max_tokens, self.cfg.text.max_position_embeddings)
        self.kv_arena = self._alloc_kv(-(-tokens // self.block_size))
        probe = Sequence(seq_id=-1, prompt_ids=[0] * tokens, sampling=SamplingParams(), seed=0,
                         stop_token_ids=frozenset(), block_table=list(range(self.kv_arena.shape[0])))
        self.prefill([probe])
        if self.model.vision is not None:
            pixels = torch.randn(self.num_mm_blocks // 2, 3, self.cfg.vision.image_size, self.cfg.vision.image_size)
            self.encode_images(pixels)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base - self.kv_arena.numel() * self.dtype.itemsize
        del self.kv_arena
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        others = total - free - torch.cuda.memory_reserved(self.device)  # CUDA context, other processes
        reserve = 1 << 30  # CUDA graphs, cuBLAS workspaces, fragmentation
        budget = int(total * utilization) - others - base - peak - reserve
        if budget < self.kv_block_bytes:
            raise ValueError(
                f"no GPU memory left for the KV cache: {total / 2**30:.1f} GiB x gpu_memory_utilization "
                f"{utilization} minus weights {base / 2**30:.1f} GiB and activations {peak / 2**30:.1f} GiB")
        return budget // self.kv_block_bytes

    # ------------------------------------------------------------------ images

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] -> [N, tokens_per_image, hidden]; a graph replay when one fits (the
        result may then be a view of a static buffer: consume it before the next call)."""
        pixel_values = pixel_values.to(self.device, self.dtype)
        if self.vision_graphs is not None:
            out = self.vision_graphs.run(pixel_values)
            if out is not None:
                return out
        return self.model.encode_images(self.ops, pixel_values)

    @torch.inference_mode()
    def encode(self, seqs: list[Sequence]) -> None:
        """Encode every image of `seqs` in one batch into their MM-arena blocks."""
        pixels = torch.cat([s.pixel_values for s in seqs])
        blocks = self._tensor([b for s in seqs for b in s.mm_blocks], torch.int64)
        self.mm_arena[blocks] = self.encode_images(pixels)

    # ------------------------------------------------------------------ steps

    def _tensor(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(len(s.block_table) for s in seqs)
        return self._tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], torch.int32)

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence], all_logits: bool = False) -> StepOutput:
        """One forward over each sequence's uncached tokens (packed varlen); samples one token
        per sequence from its last position. Updates num_cached."""
        ids, positions, slots, cu, image_index = [], [], [], [0], []
        has_images = False
        for seq in seqs:
            start = seq.num_cached
            tokens = seq.all_ids[start:]
            if seq.mm_blocks and start < len(seq.prompt_ids):  # its images are in the MM arena
                image_index += self._image_rows(seq, start)
                has_images = True
            else:
                image_index += [-1] * len(tokens)
            ids += tokens
            positions += range(start, seq.num_tokens)
            slots += [seq.slot(p, self.block_size) for p in range(start, seq.num_tokens)]
            cu.append(cu[-1] + len(tokens))
        meta = AttentionMetadata(
            is_prefill=True,
            slot_mapping=self._tensor(slots, torch.int64),
            seq_lens=self._tensor([s.num_tokens for s in seqs], torch.int32),
            block_tables=self._block_tables(seqs),
            cu_seqlens_q=self._tensor(cu, torch.int32),
            max_seqlen_q=max(b - a for a, b in zip(cu, cu[1:])),
        )
        hidden = self.model(
            self.ops,
            self._tensor(ids, torch.int64),
            self._tensor(positions, torch.int64),
            meta,
            self.kv_arena,
            image_index=self._tensor(image_index, torch.int64) if has_images else None,
            image_embeds=self.mm_arena.view(-1, self.mm_arena.shape[-1]) if has_images else None,
        )
        last = self._tensor([c - 1 for c in cu[1:]], torch.int64)
        logits = self.model.compute_logits(self.ops, hidden if all_logits else hidden[last])
        tokens = self.sample(logits[last] if all_logits else logits, seqs)
        for seq in seqs:
            seq.num_cached = seq.num_tokens
        return StepOutput(tokens, logits)

    def decode(self, seqs: list[Sequence], num_steps: int = 1) -> tuple[list[list[int]], torch.Tensor]:
        """num_steps decode steps back to back (block tables must cover them): the tokens of each
        step (a list over seqs) and the last step's raw logits [B, V]. A CUDA graph is replayed
        when one fits the batch. The caller appends the tokens; logprob records (sequences that
        asked) are appended to seq.logprobs here, one per step."""
        self.penalties.slots_for(seqs)  # state for sequences that have none yet (EPD decode, rebuilt)
        rows = logprob_rows(seqs)
        pending: list[LogprobBatch] = []
        on_step = None
        if rows:
            index = self._tensor(rows, torch.int64)
            k = max(seqs[i].sampling.top_logprobs for i in rows)

            def on_step(logits: torch.Tensor, tokens: torch.Tensor) -> None:
                pending.append(token_logprobs(logits[index], tokens[index], k))

        tokens, logits = self.decode_graphs.run(seqs, num_steps, on_step)
        for step_tokens, batch in zip(tokens, pending):
            append_records([seqs[i] for i in rows], [step_tokens[i] for i in rows], batch)
        for seq in seqs:
            seq.num_cached = seq.num_tokens + num_steps - 1  # every token but the last sampled
        return tokens, logits

    # ------------------------------------------------------------------ penalty state

    def init_penalty_state(self, seq: Sequence) -> None:
        """Give seq a penalty slot (keeping the one it holds) built from its prompt_ids and
        output_ids; a no-op for sequences without penalties. sample and decode call it for any
        sequence with penalties that holds no slot, so calling it is never required."""
        self.penalties.init(seq)

    def release(self, seq: Sequence) -> None:
        """Free seq's penalty slot (call where the engine frees a finished or aborted sequence's
        blocks); a no-op without one. A preempted sequence keeps its slot."""
        self.penalties.release(seq)

    def _image_rows(self, seq: Sequence, start: int) -> list[int]:
        """Per token from `start` on: its row in the flattened MM arena, or -1 for text."""
        per_image = self.mm_arena.shape[1]
        rows, k = [], 0
        for p, t in enumerate(seq.prompt_ids[: seq.num_tokens]):
            if t == self.cfg.image_token_id:
                if p >= start:
                    rows.append(seq.mm_blocks[k // per_image] * per_image + k % per_image)
                k += 1
            elif p >= start:
                rows.append(-1)
        return rows + [-1] * (seq.num_tokens - max(start, len(seq.prompt_ids)))

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """One token per row of raw logits [B, V]: penalties (rows whose sequence uses them; its
        state is built if missing, and the token is counted), then ops.sample; logprob records
        of the raw logits for the sequences that asked."""
        sp = [s.sampling for s in seqs]
        slots = self.penalties.slots_for(seqs)
        penalized = max(slots, default=-1) >= 0
        raw = logits
        if penalized:  # rows without penalties are copied unchanged; a batch without any skips the op
            slot_rows = self._tensor(slots, torch.int64)
            logits = self.ops.apply_penalties(
                logits, self.penalties.counts, self.penalties.prompt_mask, slot_rows,
                self._tensor([p.presence_penalty for p in sp], torch.float32),
                self._tensor([p.frequency_penalty for p in sp], torch.float32),
                self._tensor([p.repetition_penalty for p in sp], torch.float32),
            )
        tokens = self.ops.sample(
            logits,
            self._tensor([p.temperature for p in sp], torch.float32),
            self._tensor([p.top_k for p in sp], torch.int64),
            self._tensor([p.top_p for p in sp], torch.float32),
            self._tensor([s.seed for s in seqs], torch.int64),
            self._tensor([len(s.output_ids) for s in seqs], torch.int64),
        )
        if penalized:
            self.ops.record_tokens(self.penalties.counts, slot_rows, tokens)
        rows = logprob_rows(seqs)
        if rows:
            index = self._tensor(rows, torch.int64)
            batch = token_logprobs(raw[index], tokens[index], max(sp[i].top_logprobs for i in rows))
        token_ids = tokens.tolist()
        if rows:
            append_records([seqs[i] for i in rows], [token_ids[i] for i in rows], batch)
        return token_ids
