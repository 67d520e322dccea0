"""The device state that presence / frequency / repetition penalties read: per slot, how often
each token was generated (counts) and which tokens the prompt holds (prompt_mask).

One slot per live sequence that uses penalties, owned by the runner. The state is a function of
the sequence's prompt_ids and output_ids alone, so a slot can always be rebuilt: a sequence gets one
the first time it is sampled (prefill, a forked sample's first token, or an EPD decode stage's first
step) and keeps it while preempted; it is released when the sequence finishes. When every slot is
held, one is taken back from a finished sequence, else from one outside the batch being sampled,
which rebuilds its state the next time it is sampled. The tensors are allocated once, so decode
graphs can bake in their addresses.
"""

from __future__ import annotations

import torch

from engine.request import Sequence, Status
from engine.sampling import SamplingParams


def uses_penalties(sampling: SamplingParams) -> bool:
    return sampling.presence_penalty != 0.0 or sampling.frequency_penalty != 0.0 or sampling.repetition_penalty != 1.0


class PenaltyState:
    def __init__(self, num_slots: int, vocab_size: int, device: torch.device) -> None:
        self.counts = torch.zeros(num_slots, vocab_size, dtype=torch.int32, device=device)  # [S, V]
        self.prompt_mask = torch.zeros(num_slots, vocab_size, dtype=torch.bool, device=device)  # [S, V]
        self.owners: list[Sequence | None] = [None] * num_slots

    @property
    def num_slots(self) -> int:
        return len(self.owners)

    def holds(self, seq: Sequence) -> bool:
        """seq owns the slot it names (a copied Sequence may name another's slot)."""
        return 0 <= seq.penalty_slot < self.num_slots and self.owners[seq.penalty_slot] is seq

    def init(self, seq: Sequence, keep: frozenset[int] = frozenset()) -> None:
        """(Re)build seq's state from its prompt_ids and output_ids; a no-op without penalties.
        keep: ids of sequences whose slots must not be taken back (the batch being sampled)."""
        if not uses_penalties(seq.sampling):
            return
        slot = seq.penalty_slot if self.holds(seq) else self._take(seq, keep)
        vocab, device = self.counts.shape[1], self.counts.device
        prompt = torch.tensor([t for t in seq.prompt_ids if 0 <= t < vocab], dtype=torch.int64, device=device)
        output = torch.tensor([t for t in seq.output_ids if 0 <= t < vocab], dtype=torch.int64, device=device)
        self.prompt_mask[slot].zero_()
        self.prompt_mask[slot, prompt] = True
        self.counts[slot].zero_()
        self.counts[slot].index_put_((output,), torch.ones_like(output, dtype=torch.int32), accumulate=True)

    def release(self, seq: Sequence) -> None:
        """Free seq's slot; a no-op when it holds none."""
        if self.holds(seq):
            self.owners[seq.penalty_slot] = None
        seq.penalty_slot = -1

    def slots_for(self, seqs: list[Sequence]) -> list[int]:
        """Each sequence's slot (-1 without penalties), building the state of those without one."""
        users = [s for s in seqs if uses_penalties(s.sampling)]
        if len(users) > self.num_slots:
            raise RuntimeError(f"penalty state full: a batch of {len(users)} sequences with penalties; there are "
                               f"{self.num_slots} slots (max_num_seqs plus headroom)")
        keep = frozenset(id(s) for s in users)
        for s in users:
            if not self.holds(s):
                self.init(s, keep)
        return [s.penalty_slot if uses_penalties(s.sampling) else -1 for s in seqs]

    def _take(self, seq: Sequence, keep: frozenset[int]) -> int:
        free = next((i for i, o in enumerate(self.owners) if o is None), None)
        if free is None:  # finished sequences first, then preempted / waiting ones, then any outside the batch
            for ok in (lambda o: o.status is Status.FINISHED, lambda o: o.status is not Status.RUNNING, lambda o: True):
                free = next((i for i, o in enumerate(self.owners) if id(o) not in keep and ok(o)), None)
                if free is not None:
                    self.owners[free].penalty_slot = -1
                    break
        if free is None:
            raise RuntimeError(f"penalty state full: all {self.num_slots} slots are held by the batch being sampled")
        self.owners[free] = seq
        seq.penalty_slot = free
        return free
