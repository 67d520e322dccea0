"""Continuous-batching scheduler for one process: prefill first, then decode everything running.

FCFS. When the KV arena is full during decode, the newest running sequence is preempted:
its blocks are freed and it is recomputed later from its prompt plus the tokens it has.
"""

from __future__ import annotations

from collections import deque

from engine.block_manager import BlockManager
from engine.request import Sequence, Status


class Scheduler:
    def __init__(
        self, block_manager: BlockManager, block_size: int, max_num_seqs: int, max_num_batched_tokens: int
    ) -> None:
        self.blocks = block_manager
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def schedule(self) -> tuple[list[Sequence], bool]:
        """Returns (sequences, is_prefill). Prefill batches pack whole prompts up to the token budget."""
        batch: list[Sequence] = []
        tokens = 0
        while self.waiting and len(self.running) + len(batch) < self.max_num_seqs:
            seq = self.waiting[0]
            new_tokens = seq.num_tokens - seq.num_cached
            if batch and tokens + new_tokens > self.max_num_batched_tokens:
                break
            blocks = self.blocks.allocate(self._blocks_for(seq.num_tokens) - len(seq.block_table))
            if blocks is None:
                break
            seq.block_table += blocks
            seq.status = Status.RUNNING
            batch.append(self.waiting.popleft())
            tokens += new_tokens
        if batch:
            self.running += batch
            return batch, True

        scheduled: list[Sequence] = []
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:
                continue  # preempted in this loop
            while self._blocks_for(seq.num_tokens) > len(seq.block_table):
                blocks = self.blocks.allocate(1)
                if blocks is not None:
                    seq.block_table += blocks
                    break
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                scheduled.append(seq)
        return scheduled, False

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.block_table)
        seq.block_table = []
        seq.num_cached = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.block_table)
        seq.block_table = []
        seq.status = Status.FINISHED
