"""Model runner: owns the weights, the KV arena and the ops backend; turns a batch of
sequences into tensors, runs one forward step and samples."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from engine.config import MAX_MULTI_STEP, ConfigError, EngineConfig, ModelConfig
from engine.image_layout import NEWLINE
from engine.loader import load_model
from engine.logprobs import LogprobBatch, append_records, logprob_rows, token_logprobs
from engine.models.llama import AttentionMetadata
from engine.models.llava import MultimodalModel
from engine.penalties import PenaltyState
from engine.request import Sequence
from engine.sampling import SamplingParams
from epd_kernels import get_backend
from epd_kernels.invariant import batch_invariant
from graphs.decode_graphs import DecodeBatch, DecodeGraphs
from graphs.vision_graphs import VisionGraphs

log = logging.getLogger(__name__)
NEWLINE_REF = (-1, -1)  # _image_rows: the token reads the model's image_newline vector


@dataclass
class StepOutput:
    token_ids: list[int]  # one per sequence
    logits: torch.Tensor  # [B, V] fp32 at each sequence's last token, or [T, V] with all_logits


def decode_batch(seqs: list[Sequence], penalty_slots: list[int]) -> DecodeBatch:
    """The rows DecodeGraphs.run takes for one decode call of `seqs` (each feeds its last token);
    penalty_slots: each sequence's penalty slot, -1 without penalties (PenaltyState.slots_for)."""
    sp = [s.sampling for s in seqs]
    return DecodeBatch(
        input_ids=[s.last_token for s in seqs],
        positions=[s.num_tokens - 1 for s in seqs],
        block_tables=[s.block_table for s in seqs],
        temperature=[p.temperature for p in sp],
        top_k=[p.top_k for p in sp],
        top_p=[p.top_p for p in sp],
        seeds=[s.seed for s in seqs],
        steps=[len(s.output_ids) for s in seqs],
        presence=[p.presence_penalty for p in sp],
        frequency=[p.frequency_penalty for p in sp],
        repetition=[p.repetition_penalty for p in sp],
        penalty_slot=penalty_slots,
    )


def block_runs(blocks: list[int]) -> list[tuple[int, int, int]]:
    """(first index in `blocks`, first block, length) of each run of consecutive block ids, in
    order: blocks [7, 8, 9, 2, 3] -> [(0, 7, 3), (3, 2, 2)]."""
    runs: list[tuple[int, int, int]] = []
    for i, b in enumerate(blocks):
        if runs and runs[-1][1] + runs[-1][2] == b:
            src, first, n = runs[-1]
            runs[-1] = (src, first, n + 1)
        else:
            runs.append((i, b, 1))
    return runs


class ModelRunner:
    """Runs the model's steps over arenas it is given: the KV arena [blocks, layers, 2,
    block_size, kv_heads, head_dim] and the MM arena [blocks, tokens_per_item, hidden] (one
    item per block: a CLIP image, or a LLaVA-NeXT image's base or one of its tiles). Who
    allocates them decides where they live: `build_runner` allocates plain tensors for the
    in-process engine; an EPD stage role allocates shared arenas, or maps another stage's
    (engine/roles/). Block ids index the whole KV arena; which of its blocks are whose is the
    block managers' business, not the runner's."""

    def __init__(self, config: EngineConfig, cfg: ModelConfig, model: MultimodalModel, kv_arena: torch.Tensor,
                 mm_arena: torch.Tensor, mm_peers: list[torch.Tensor | None] | None = None) -> None:
        """mm_peers: MM arenas of other processes on this device (EPD encoders), read in place by
        prefill for sequences whose mm_peer_blocks name them (None: not readable here)."""
        self.config, self.cfg, self.model = config, cfg, model
        self.device, self.dtype = torch.device(config.device), config.torch_dtype
        self.ops = get_backend(config.backend, self.device, self.dtype)
        self.backend = "cuda" if self.ops.__name__.endswith("cuda_ops") else "torch"
        if config.deterministic:
            self.ops = batch_invariant(self.ops)
        self.block_size = config.block_size
        self.max_images_per_batch = config.max_images_per_batch
        self.vision_graphs: VisionGraphs | None = None  # captured by capture_graphs
        self.mm_arena = mm_arena
        self.num_mm_blocks = mm_arena.shape[0]
        self.mm_peers = list(mm_peers or [])
        # Penalty state (engine/penalties.py): one slot per running sequence plus headroom for
        # preempted ones (kv_blocks_from_memory counts it among the activations).
        slots = config.max_num_seqs + max(16, config.max_num_seqs // 4) if model.lm is not None else 0
        self.penalties = PenaltyState(slots, cfg.text.vocab_size, self.device)
        self.kv_arena = kv_arena
        self.num_kv_blocks = kv_arena.shape[0]
        max_blocks = -(-cfg.text.max_position_embeddings // self.block_size)
        self.decode_graphs = self._decode_graphs(config.max_num_seqs, max_blocks) if model.lm is not None else None

    def _decode_graphs(self, max_batch: int, max_blocks_per_seq: int) -> DecodeGraphs:
        return DecodeGraphs(model=self.model, ops=self.ops, kv_arena=self.kv_arena, block_size=self.block_size,
                            penalty_counts=self.penalties.counts, penalty_prompt_mask=self.penalties.prompt_mask,
                            device=self.device, max_batch=max_batch, max_blocks_per_seq=max_blocks_per_seq,
                            max_steps=MAX_MULTI_STEP)

    def capture_graphs(self, background: bool = False) -> None:
        """Capture vision graphs per image-batch bucket (multimodal models), then decode graphs
        per batch bucket (cuda backend only; decode in the background if asked)."""
        if self.backend != "cuda":
            raise ValueError("CUDA graphs need the cuda backend")
        if not self.has_attention_kernel:
            log.warning("head_dim %d has no attention kernel: decode runs eagerly", self.cfg.text.head_dim)
            return
        if self.model.vision is not None:
            self.vision_graphs = VisionGraphs(
                forward=partial(self.model.encode_images, self.ops), image_size=self.cfg.vision.image_size,
                dtype=self.dtype, device=self.device, max_images=self.max_images_per_batch)
            self.vision_graphs.capture_all()
        if self.decode_graphs is not None:
            self.decode_graphs.capture_all(background)

    @property
    def has_attention_kernel(self) -> bool:
        """The model's head_dim has a CUDA attention kernel; the torch fallback for other head
        dims syncs with the host, so such a model cannot run under CUDA graphs."""
        from epd_kernels.attn_varlen import KERNEL_HEAD_DIMS

        return self.cfg.text.head_dim in KERNEL_HEAD_DIMS

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
        return kv_block_bytes(self.config, self.cfg)

    # ------------------------------------------------------------------ images

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] -> [N, tokens_per_item, hidden]; a graph replay when one fits (the
        result may then be a view of a static buffer: consume it before the next call)."""
        pixel_values = pixel_values.to(self.device, self.dtype)
        if self.vision_graphs is not None:
            out = self.vision_graphs.run(pixel_values)
            if out is not None:
                return out
        return self.model.encode_images(self.ops, pixel_values)

    @torch.inference_mode()
    def encode(self, seqs: list[Sequence], items: list[tuple[Sequence, int]] | None = None) -> None:
        """Encode every item of `seqs` in one batch into their MM-arena blocks (one per item); or
        only `items`, (sequence, item index) pairs (the others' embeddings are cached)."""
        if items is None:
            pixels = torch.cat([s.pixel_values for s in seqs])
            blocks = [b for s in seqs for b in s.mm_blocks]
        else:
            if not items:
                return
            pixels = torch.cat([seq.pixel_values[i : i + 1] for seq, i in items])
            blocks = [seq.mm_blocks[i] for seq, i in items]
        out = self.encode_images(pixels)
        for src, dst, n in block_runs(blocks):  # copies at copy speed (an index_put ran 5x slower)
            self.mm_arena[dst : dst + n].copy_(out[src : src + n])

    # ------------------------------------------------------------------ steps

    def _tensor(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(len(s.block_table) for s in seqs)
        return self._tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], torch.int32)

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence], all_logits: bool = False,
                after_layer: Callable[[int], None] | None = None) -> StepOutput:
        """One forward over each sequence's uncached tokens (packed varlen); samples one token
        per sequence from its last position. Updates num_cached. after_layer(i): called as each
        layer is launched (a prefill stage yields the GPU to its encoders there)."""
        ids, positions, slots, cu, image_index = [], [], [], [0], []
        peer_rows: dict[int, tuple[list[int], list[int]]] = {}  # peer -> (packed positions, rows in its arena)
        newline_at: list[int] = []  # packed positions that read image_newline (LLaVA-NeXT)
        has_images = False
        for seq in seqs:
            start = seq.num_cached
            tokens = seq.all_ids[start:]
            if (seq.mm_blocks or seq.mm_peer_blocks) and start < len(seq.prompt_ids):
                for offset, ref in enumerate(self._image_rows(seq, start)):
                    source, row = ref if ref is not None else (0, -1)
                    if ref is NEWLINE_REF:
                        newline_at.append(len(ids) + offset)
                        source = row = -1
                    image_index.append(row if source == 0 else -1)
                    has_images |= source == 0 and row >= 0
                    if source > 0:
                        at, rows = peer_rows.setdefault(source - 1, ([], []))
                        at.append(len(ids) + offset)
                        rows.append(row)
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
            image_rows_from=[(self._tensor(at, torch.int64), self._tensor(rows, torch.int64),
                              self.mm_peers[peer].view(-1, self.mm_peers[peer].shape[-1]))
                             for peer, (at, rows) in peer_rows.items()],
            newline_at=self._tensor(newline_at, torch.int64) if newline_at else None,
            after_layer=after_layer,
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
        slots = self.penalties.slots_for(seqs)  # state for sequences that have none yet (EPD decode, rebuilt)
        rows = logprob_rows(seqs)
        pending: list[LogprobBatch] = []
        on_step = None
        if rows:
            index = self._tensor(rows, torch.int64)
            k = max(seqs[i].sampling.top_logprobs for i in rows)

            def on_step(logits: torch.Tensor, tokens: torch.Tensor) -> None:
                pending.append(token_logprobs(logits[index], tokens[index], k))

        tokens, logits = self.decode_graphs.run(decode_batch(seqs, slots), num_steps, on_step)
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

    def _image_rows(self, seq: Sequence, start: int) -> list[tuple[int, int] | None]:
        """Per token from `start` on: (source, row) of its embedding, NEWLINE_REF for the model's
        image_newline, None for text. Source 0 is this runner's MM arena (seq.mm_blocks); source
        e + 1 is mm_peers[e] (seq.mm_peer_blocks, an encoder's arena read in place). Blocks are
        the images' items in order; each image's layout (ModelConfig.image_layout, from its size)
        says which item and row each of its tokens reads. Rows index the flattened
        [blocks x tokens_per_item]."""
        per_item = self.cfg.tokens_per_item
        refs = [(e + 1, b) for e, b in seq.mm_peer_blocks] or [(0, b) for b in seq.mm_blocks]
        sizes = seq.image_sizes or [(None, None)] * len(refs)  # sizes matter only to anyres layouts
        image_refs: list[tuple[int, int]] = []  # one per image token of the prompt, in order
        first = 0  # the image's first item among refs
        for h, w in sizes:
            layout = self.cfg.image_layout(h, w)
            if first + layout.num_items > len(refs):
                raise ValueError(f"sequence {seq.seq_id}: its images need more than the {len(refs)} MM blocks it has")
            for r in layout.rows:
                if r == NEWLINE:
                    image_refs.append(NEWLINE_REF)
                else:
                    source, block = refs[first + r // per_item]
                    image_refs.append((source, block * per_item + r % per_item))
            first += layout.num_items
        rows: list[tuple[int, int] | None] = []
        k = 0
        for p, t in enumerate(seq.prompt_ids[: seq.num_tokens]):
            if t == self.cfg.image_token_id:
                if p >= start:
                    rows.append(image_refs[k])
                k += 1
            elif p >= start:
                rows.append(None)
        if k != len(image_refs):
            raise ValueError(f"sequence {seq.seq_id}: {k} image tokens in the prompt, its images' layouts have "
                             f"{len(image_refs)}")
        return rows + [None] * (seq.num_tokens - max(start, len(seq.prompt_ids)))

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


# ----------------------------------------------------------------------------- building runners


def load_weights(config: EngineConfig, cfg: ModelConfig, parts: str = "all") -> MultimodalModel:
    """The model's weights on config.device (a resolved config): "all", or "vision" / "lm" for
    a stage that needs only the tower + projector or only the LM."""
    device = torch.device(config.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # graph capture and cuBLAS use the current device's stream and handle
    return load_model(cfg, config.model, config.torch_dtype, device, progress=config.progress, parts=parts)


def kv_block_shape(config: EngineConfig, cfg: ModelConfig) -> tuple[int, ...]:
    """One KV block: [layers, 2 (K, V), block_size, kv_heads, head_dim]."""
    t = cfg.text
    return (t.num_layers, 2, config.block_size, t.num_kv_heads, t.head_dim)


def kv_block_bytes(config: EngineConfig, cfg: ModelConfig) -> int:
    """Bytes of one KV block (kv_block_shape) in config's dtype."""
    return math.prod(kv_block_shape(config, cfg)) * config.torch_dtype.itemsize


def mm_arena_shape(config: EngineConfig, cfg: ModelConfig, num_blocks: int | None = None) -> tuple[int, ...]:
    """The MM arena: [blocks (config.num_mm_blocks by default), tokens_per_item, hidden]."""
    blocks = config.num_mm_blocks(cfg) if num_blocks is None else num_blocks
    return (blocks, cfg.tokens_per_item if cfg.is_multimodal else 0, cfg.text.hidden_size)


def kv_blocks_from_memory(config: EngineConfig, cfg: ModelConfig, model: MultimodalModel, mm_arena: torch.Tensor,
                          share: float = 1.0) -> int:
    """KV blocks that fit in `share` of what config.gpu_memory_utilization of the card leaves
    after everything allocated on it now (this process's weights and MM arena, other
    processes), this process's activations (a profiled prefill of max_num_batched_tokens and,
    with a tower, an image batch) and a 1 GiB reserve (graphs, cuBLAS workspaces)."""
    device = torch.device(config.device)
    if device.type != "cuda":
        raise ConfigError("the KV cache is sized from GPU memory only on a GPU; give kv_cache_tokens on the CPU")
    dtype = config.torch_dtype
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)  # weights + MM arena
    tokens = min(config.max_num_batched_tokens, cfg.text.max_position_embeddings)
    probe_blocks = -(-tokens // config.block_size)
    probe = ModelRunner(config, cfg, model, torch.zeros(probe_blocks, *kv_block_shape(config, cfg), dtype=dtype,
                                                        device=device), mm_arena)
    arena_bytes = probe.kv_arena.numel() * dtype.itemsize
    if model.lm is not None:
        seq = Sequence(seq_id=-1, prompt_ids=[0] * tokens, sampling=SamplingParams(), seed=0,
                       stop_token_ids=frozenset(), block_table=list(range(probe_blocks)))
        probe.prefill([seq])
    if model.vision is not None and probe.num_mm_blocks:
        size = cfg.vision.image_size
        probe.encode_images(torch.randn(max(1, min(probe.num_mm_blocks, config.max_images_per_batch)), 3, size, size))
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base - arena_bytes
    del probe
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    others = total - free - torch.cuda.memory_reserved(device)  # CUDA context, other processes
    reserve = 1 << 30
    budget = int((int(total * config.gpu_memory_utilization) - others - base - peak - reserve) * share)
    block = kv_block_bytes(config, cfg)
    if budget < block:
        raise ConfigError(
            f"no GPU memory left for the KV cache: {total / 2**30:.1f} GiB x gpu_memory_utilization "
            f"{config.gpu_memory_utilization} minus weights {base / 2**30:.1f} GiB, activations "
            f"{peak / 2**30:.1f} GiB and other processes {others / 2**30:.1f} GiB")
    return budget // block


def build_runner(config: EngineConfig, cfg: ModelConfig, parts: str = "all") -> ModelRunner:
    """A runner for this process over arenas of its own: weights loaded, the MM arena made, the
    KV arena sized (config.num_kv_blocks, or from GPU memory) and allocated."""
    model = load_weights(config, cfg, parts)
    device, dtype = torch.device(config.device), config.torch_dtype
    mm_arena = torch.empty(mm_arena_shape(config, cfg, None if model.vision is not None else 0), dtype=dtype,
                           device=device)
    if model.lm is None:
        blocks = 0
    else:
        blocks = config.num_kv_blocks()
        if blocks is None:
            blocks = kv_blocks_from_memory(config, cfg, model, mm_arena)
    kv_arena = torch.zeros(blocks, *kv_block_shape(config, cfg), dtype=dtype, device=device)
    return ModelRunner(config, cfg, model, kv_arena, mm_arena)
