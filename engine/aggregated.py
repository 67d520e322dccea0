"""The aggregated engine: encode, prefill and decode stages in one process over one runner.

Each step: encode waiting images (if any), then prefill a batch of ready prompts if there is
one, otherwise decode every running sequence (prefill first, as vLLM does). A sequence
preempted by decode goes back to the front of encode (if it has images) or prefill.
Decode runs up to `multi_step` steps back to back when every running sequence has that many
tokens left and the free KV blocks cover them; stops are checked after the run.

n samples of one prompt: the prompt is prefilled once, then forks (`_fork`) into n sequences
that share its full KV blocks by reference count; each forked sample gets its own copy of the
last, partially filled block (copy-on-write: all later writes land past the prompt) and samples
its first token from the same prefill logits with its own seed (`sample_seed`). From then on
the samples are ordinary sequences: batched, preempted and recomputed one by one; a shared
block returns to the pool with its last reference.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.request import Sequence, Status
from engine.runner import ModelRunner
from engine.sampling import sample_seed
from engine.schedulers import DecodeScheduler, EncodeScheduler, PrefillScheduler, blocks_for


class AggregatedEngine:
    def __init__(self, runner: ModelRunner, config: EngineConfig, kv_blocks: BlockManager | None = None,
                 on_phase: Callable[[int, str, float, float], None] | None = None) -> None:
        """kv_blocks: the pool decode allocates from (default: every block of the runner's arena).
        on_phase: told (seq_id, "encode" | "prefill", start, end) when a sequence's images are
        encoded or its prompt prefilled (the LLM's request timings; again after a preemption)."""
        self.runner = runner
        self.on_phase = on_phase
        self.multi_step = config.multi_step
        self.kv_blocks = kv_blocks or BlockManager(runner.num_kv_blocks)
        self.mm_blocks = BlockManager(runner.num_mm_blocks) if runner.num_mm_blocks else None
        self.encode = (EncodeScheduler(self.mm_blocks, config.max_images_per_batch, cache=config.mm_cache)
                       if self.mm_blocks else None)
        self.prefill = PrefillScheduler(self.kv_blocks, runner.block_size, config.max_num_batched_tokens)
        self.decode = DecodeScheduler(self.kv_blocks, runner.block_size, config.max_num_seqs)

    def add(self, seq: Sequence) -> None:
        if seq.num_items:
            assert self.encode is not None, "images on a model without a vision tower"
            self.encode.add(seq)
        else:
            self.prefill.add(seq)

    def has_work(self) -> bool:
        return bool((self.encode and self.encode.waiting) or self.prefill.waiting or self.decode.running)

    def step(self) -> list[tuple[Sequence, int]]:
        """Run one step; returns (sequence, sampled token) pairs in generation order (with
        multi-step decode, several per sequence: the caller's engine.request.append_step drops
        those after a stop)."""
        if self.encode is not None and self.encode.waiting:
            encoded = self.encode.schedule()
            if encoded:
                start = time.perf_counter()
                self.runner.encode(encoded, self.encode.to_encode)  # images cached are not encoded again
                end = time.perf_counter()
                for seq in encoded:
                    self._phase(seq, "encode", start, end)
                    self.prefill.add(seq)
        batch = self.prefill.schedule(max_seqs=self.decode.free_slots)
        if batch:
            start = time.perf_counter()
            for seq in batch:
                self._phase(seq, "prefill", start, start)
            out = self.runner.prefill(batch)
            produced = list(zip(batch, out.token_ids))
            for row, seq in enumerate(batch):
                if seq.mm_blocks:
                    self.encode.release(seq)
                self.decode.add(seq)
                if seq.needs_fork:
                    produced += self._fork(seq, out.logits[row])
            return produced
        steps = self._decode_steps()
        batch, preempted = self.decode.schedule(lookahead=steps)
        for seq in reversed(preempted):  # the oldest preempted goes first
            if seq.num_items:
                self.encode.waiting.appendleft(seq)
            else:
                self.prefill.add(seq, front=True)
        if not batch:
            return []  # everything running was preempted: the next step prefills it again
        tokens, _ = self.runner.decode(batch, steps)
        return [(seq, t) for step_tokens in tokens for seq, t in zip(batch, step_tokens)]

    def _phase(self, seq: Sequence, phase: str, start: float, end: float) -> None:
        if self.on_phase is not None:
            self.on_phase(seq.seq_id, phase, start, end)

    def _decode_steps(self) -> int:
        """How many decode steps to run back to back now (1 unless all can take multi_step)."""
        running = self.decode.running
        if self.multi_step == 1 or not running:
            return 1
        steps = min(self.multi_step, *(s.sampling.max_tokens - len(s.output_ids) for s in running))
        bs = self.runner.block_size
        extra = sum(max(0, blocks_for(s.num_tokens + steps - 1, bs) - len(s.block_table)) for s in running)
        return steps if steps > 1 and extra <= self.kv_blocks.num_free else 1

    def _fork(self, seq: Sequence, logits: torch.Tensor) -> list[tuple[Sequence, int]]:
        """Samples 1..n-1 of a just prefilled `seq` (logits [V] at its last prompt token): they
        join decode after it, each with its first token drawn from those logits."""
        bs = self.runner.block_size
        full = seq.block_table[: len(seq.prompt_ids) // bs]  # read-only from now on: shared
        partial = seq.block_table[len(full):]  # the last prompt block if partially filled, else []
        samples = [seq.fork(i, sample_seed(seq.seed, i)) for i in range(1, seq.sampling.n)]
        for i, sample in enumerate(samples):
            self.kv_blocks.share(full)
            sample.block_table = full + seq.fork_blocks[i : i + 1]
        if partial:
            self.runner.copy_kv_blocks(partial * len(samples), seq.fork_blocks)
        seq.fork_blocks = []
        seq.samples = [seq, *samples]
        for sample in samples:  # penalties see the prompt; sample() then counts the first token
            self.runner.init_penalty_state(sample)
        tokens = self.runner.sample(logits.expand(len(samples), -1).contiguous(), samples)
        for sample in samples:
            self.decode.add(sample)
        return list(zip(samples, tokens))

    @property
    def num_preemptions(self) -> int:
        return self.decode.num_preemptions

    def finish(self, seq: Sequence) -> None:
        """Release everything a sequence holds, wherever it is (finished or aborted)."""
        if seq in self.decode.running:
            self.decode.finish(seq)
        for queue in (self.prefill.waiting, self.encode.waiting if self.encode else []):
            if seq in queue:
                queue.remove(seq)
        if seq.block_table:
            self.kv_blocks.free(seq.block_table)
            seq.block_table = []
        if seq.fork_blocks:
            self.kv_blocks.free(seq.fork_blocks)
            seq.fork_blocks = []
        if seq.mm_blocks:
            self.encode.release(seq)
        self.runner.release(seq)  # its penalty slot, if any
        seq.status = Status.FINISHED
