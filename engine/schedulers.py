"""One scheduler per stage kind. Each owns a FCFS queue and the blocks it hands out.

- EncodeScheduler: batches requests' images up to an item budget; MM blocks per item (a
  vision-tower input: a LLaVA-1.5 image, or a LLaVA-NeXT image's base or one of its tiles),
  through the encoder cache (engine/mm_cache.py): a cached item is not encoded again.
- PrefillScheduler: packs whole prompts (varlen) up to a token budget; KV blocks per prompt.
- DecodeScheduler: continuous batching; when KV blocks run out, preempts the newest
  sequence, whose blocks are freed and which is recomputed later (nothing is lost).

Schedulers never touch tensors: they move sequences and block ids.
"""

from __future__ import annotations

from collections import deque

from engine.block_manager import BlockManager
from engine.mm_cache import EncoderCache, items_per_image
from engine.request import Sequence, Status


def blocks_for(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


class EncodeScheduler:
    """Sequences waiting for their images to be encoded into MM blocks (one block per item).
    max_images_per_batch counts items. Blocks come from the encoder cache over mm_blocks
    (cache=False: it keeps nothing)."""

    def __init__(self, mm_blocks: BlockManager, max_images_per_batch: int, cache: bool = True) -> None:
        self.blocks = mm_blocks
        self.cache = EncoderCache(mm_blocks, enabled=cache)
        self.max_images = max_images_per_batch
        self.waiting: deque[Sequence] = deque()
        self.to_encode: list[tuple[Sequence, int]] = []  # the last batch's images not cached: (seq, image)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> list[Sequence]:
        """Whole requests, FCFS, while their items fit the batch and the MM arena.
        A request with more items than the batch limit goes alone."""
        batch: list[Sequence] = []
        images = 0
        self.to_encode = []
        while self.waiting:
            seq = self.waiting[0]
            n = seq.num_items
            if batch and images + n > self.max_images:
                break
            misses = self.acquire(seq)
            if misses is None:
                break
            self.to_encode += [(seq, i) for i in misses]
            batch.append(self.waiting.popleft())
            images += n
        return batch

    def acquire(self, seq: Sequence) -> list[int] | None:
        """Give seq the MM blocks of its images (cached ones shared, equal ones once); returns
        the images whose embeddings must be encoded into them, or None (nothing taken) when the
        arena cannot hold them now."""
        taken = self.cache.acquire(seq.mm_keys, items_per_image(seq))
        if taken is None:
            return None
        seq.mm_blocks = [b for blocks, _ in taken for b in blocks]
        return [i for i, (_, hit) in enumerate(taken) if not hit]

    def release(self, seq: Sequence) -> None:
        """Drop a sequence's references to its MM blocks once prefill has consumed them (cached
        images stay, for the next request that shows them)."""
        self.cache.release(seq.mm_blocks)
        seq.mm_blocks = []


class PrefillScheduler:
    """Sequences ready for prefill (images encoded), packed up to a token budget."""

    def __init__(self, kv_blocks: BlockManager, block_size: int, max_num_batched_tokens: int) -> None:
        self.blocks = kv_blocks
        self.block_size = block_size
        self.max_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()

    def add(self, seq: Sequence, front: bool = False) -> None:
        if front:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def schedule(self, max_seqs: int) -> list[Sequence]:
        """FCFS: stop at the first prompt that does not fit (no overtaking). A prompt longer
        than the budget runs alone. max_seqs counts decode rows: a prompt that forks into n
        samples after its prefill takes n, and its blocks include one per forked sample for
        its copy of the last, partially filled prompt block (seq.fork_blocks)."""
        batch: list[Sequence] = []
        tokens = rows = 0
        while self.waiting:
            seq = self.waiting[0]
            seq_rows = seq.sampling.n if seq.needs_fork else 1
            if rows + seq_rows > max_seqs:
                break
            new_tokens = seq.num_tokens - seq.num_cached
            if batch and tokens + new_tokens > self.max_tokens:
                break
            needed = blocks_for(seq.num_tokens, self.block_size) - len(seq.block_table)
            copies = seq_rows - 1 if seq.num_tokens % self.block_size else 0
            blocks = self.blocks.allocate(needed + copies)
            if blocks is None:
                break
            seq.block_table += blocks[:needed]
            seq.fork_blocks = blocks[needed:]
            seq.status = Status.RUNNING
            batch.append(self.waiting.popleft())
            tokens += new_tokens
            rows += seq_rows
        return batch


class DecodeScheduler:
    """Continuous batching over running sequences; preempts the newest when the arena is full."""

    def __init__(self, kv_blocks: BlockManager, block_size: int, max_num_seqs: int) -> None:
        self.blocks = kv_blocks
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def free_slots(self) -> int:
        return self.max_num_seqs - len(self.running)

    def add(self, seq: Sequence) -> None:
        if self.free_slots <= 0:
            raise RuntimeError(f"decode batch full: {len(self.running)} running, max_num_seqs = {self.max_num_seqs}")
        self.running.append(seq)

    def schedule(self, lookahead: int = 1) -> tuple[list[Sequence], list[Sequence]]:
        """Returns (sequences to decode, sequences preempted to make room). Each scheduled
        sequence holds blocks for its next `lookahead` tokens."""
        preempted: list[Sequence] = []
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            while blocks_for(seq.num_tokens + lookahead - 1, self.block_size) > len(seq.block_table):
                blocks = self.blocks.allocate(1)
                if blocks is not None:
                    seq.block_table += blocks
                    continue
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
        return [s for s in self.running if s.status is Status.RUNNING], preempted

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.block_table)
        seq.block_table = []
        seq.num_cached = 0
        seq.status = Status.WAITING
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.block_table)
        seq.block_table = []
        seq.status = Status.FINISHED
