"""The aggregated engine: encode, prefill and decode stages in one process over one runner.

Each step: encode waiting images (if any), then prefill a batch of ready prompts if there is
one, otherwise decode every running sequence (prefill first, as vLLM does). A sequence
preempted by decode goes back to the front of encode (if it has images) or prefill.
"""

from __future__ import annotations

from engine.block_manager import BlockManager
from engine.request import Sequence, Status
from engine.runner import ModelRunner
from engine.schedulers import DecodeScheduler, EncodeScheduler, PrefillScheduler


class AggregatedEngine:
    def __init__(
        self,
        runner: ModelRunner,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_images_per_batch: int,
    ) -> None:
        self.runner = runner
        self.kv_blocks = BlockManager(runner.num_kv_blocks)
        self.mm_blocks = BlockManager(runner.num_mm_blocks) if runner.num_mm_blocks else None
        self.encode = EncodeScheduler(self.mm_blocks, max_images_per_batch) if self.mm_blocks else None
        self.prefill = PrefillScheduler(self.kv_blocks, runner.block_size, max_num_batched_tokens)
        self.decode = DecodeScheduler(self.kv_blocks, runner.block_size, max_num_seqs)

    def add(self, seq: Sequence) -> None:
        if seq.num_images:
            assert self.encode is not None, "images on a model without a vision tower"
            self.encode.add(seq)
        else:
            self.prefill.add(seq)

    def has_work(self) -> bool:
        return bool((self.encode and self.encode.waiting) or self.prefill.waiting or self.decode.running)

    def step(self) -> list[tuple[Sequence, int]]:
        """Run one step; returns (sequence, sampled token) pairs."""
        if self.encode is not None and self.encode.waiting:
            encoded = self.encode.schedule()
            if encoded:
                self.runner.encode(encoded)
                for seq in encoded:
                    self.prefill.add(seq)
        batch = self.prefill.schedule(max_seqs=self.decode.free_slots)
        if batch:
            tokens = self.runner.step(batch, is_prefill=True).token_ids
            for seq in batch:
                if seq.mm_blocks:
                    self.encode.release(seq)
                self.decode.add(seq)
            return list(zip(batch, tokens))
        batch, preempted = self.decode.schedule()
        for seq in reversed(preempted):  # the oldest preempted goes first
            if seq.num_images:
                self.encode.waiting.appendleft(seq)
            else:
                self.prefill.add(seq, front=True)
        if not batch:
            return []  # everything running was preempted: the next step prefills it again
        return list(zip(batch, self.runner.step(batch, is_prefill=False).token_ids))

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
        if seq.mm_blocks:
            self.encode.release(seq)
        seq.status = Status.FINISHED
