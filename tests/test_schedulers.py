"""Scheduler and block-manager properties over 1,000 random requests, with a fake model runner."""

from __future__ import annotations

import random

import pytest
import torch

from engine.aggregated import AggregatedEngine
from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.request import Sequence, Status, append_step
from engine.runner import StepOutput
from engine.sampling import SamplingParams


class FakeRunner:
    """Deterministic 'model': the next token depends only on the sequence's id, seed and length."""

    def __init__(self, num_kv_blocks: int, num_mm_blocks: int, block_size: int) -> None:
        self.num_kv_blocks, self.num_mm_blocks, self.block_size = num_kv_blocks, num_mm_blocks, block_size
        self.prefill_order: list[int] = []
        self.encoded: set[int] = set()
        self.kv: BlockManager | None = None  # the engine's, to check that no write lands in a shared block
        self.copies: list[tuple[int, int]] = []

    def encode(self, seqs: list[Sequence], images: list[tuple[Sequence, int]] | None = None) -> None:
        for s in seqs:
            assert len(s.mm_blocks) == s.num_items
            self.encoded.add(s.seq_id)

    @staticmethod
    def _token(seq: Sequence, num_tokens: int) -> int:
        return (seq.seq_id * 7919 + seq.seed * 104729 + num_tokens * 31) % 1000

    def _check_blocks(self, seqs: list[Sequence], num_tokens: list[int]) -> None:
        """Blocks cover the tokens, and the blocks written (from num_cached on) belong to one
        sequence alone: a shared prompt block is never written (copy-on-write)."""
        written = []
        for s, n in zip(seqs, num_tokens):
            assert len(s.block_table) >= -(-n // self.block_size), "scheduled without blocks for its tokens"
            written += sorted({s.block_table[p // self.block_size] for p in range(s.num_cached, n)})
        assert len(set(written)) == len(written), "two sequences write one block"
        if self.kv is not None:
            assert all(self.kv._refs[b] == 1 for b in written), "a write into a shared block"

    def prefill(self, seqs: list[Sequence]) -> StepOutput:
        self._check_blocks(seqs, [s.num_tokens for s in seqs])
        for s in seqs:
            assert s.num_items == 0 or s.seq_id in self.encoded, "prefill before encode"
            self.prefill_order.append(s.seq_id)
            s.num_cached = s.num_tokens
        return StepOutput([self._token(s, s.num_tokens) for s in seqs], torch.zeros(len(seqs), 1))

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        assert logits.shape == (len(seqs), 1)
        return [self._token(s, s.num_tokens) for s in seqs]

    def copy_kv_blocks(self, src: list[int], dst: list[int]) -> None:
        self.copies += zip(src, dst)

    def init_penalty_state(self, seq: Sequence) -> None:
        pass  # no penalties in this fake

    def release(self, seq: Sequence) -> None:
        pass

    def decode(self, seqs: list[Sequence], num_steps: int = 1) -> tuple[list[list[int]], torch.Tensor]:
        self._check_blocks(seqs, [s.num_tokens + num_steps - 1 for s in seqs])
        tokens = [[self._token(s, s.num_tokens + k) for s in seqs] for k in range(num_steps)]
        return tokens, torch.empty(0)


def _seq(i: int, rng: random.Random, capacity: int = 10_000) -> Sequence:
    """A random request that fits a KV arena of `capacity` tokens (the LLM rejects larger ones)."""
    images = rng.choice([0, 0, 1, 3])
    prompt = [5] * rng.randint(1, 60) + [999] * (4 * images)
    prompt = prompt[-(capacity - 1):]
    max_tokens = min(rng.randint(1, 40), capacity - len(prompt))
    sp = SamplingParams(max_tokens=max_tokens, stop_token_ids=(rng.randrange(1000),))
    return Sequence(seq_id=i, prompt_ids=prompt, sampling=sp, seed=0,
                    stop_token_ids=frozenset(sp.stop_token_ids),
                    pixel_values=torch.zeros(images, 3, 1, 1) if images else None)


@pytest.mark.parametrize(("num_kv_blocks", "block_size", "multi_step"),
                         [(40, 4, 1), (400, 16, 1), (13, 8, 1), (400, 16, 8), (40, 4, 4)])
def test_random_requests_all_finish_without_leaks(num_kv_blocks: int, block_size: int, multi_step: int) -> None:
    rng = random.Random(num_kv_blocks)
    runner = FakeRunner(num_kv_blocks, 8, block_size)
    config = EngineConfig("fake", max_num_seqs=16, max_num_batched_tokens=256, max_images_per_batch=4,
                          multi_step=multi_step)
    engine = AggregatedEngine(runner, config)
    seqs = [_seq(i, rng, num_kv_blocks * block_size) for i in range(1000)]
    pending = list(seqs)
    steps = 0
    while pending or engine.has_work():
        for _ in range(rng.randint(0, 5)):  # requests arrive while others run
            if pending:
                engine.add(pending.pop(0))
        for kept in append_step(engine.step()):  # tokens past a stop (multi-step) dropped
            if kept.finish_reason:
                engine.finish(kept.seq)
        steps += 1
        assert steps < 200_000
        held = sum(len(s.block_table) for s in seqs if s.status is not Status.FINISHED)
        assert held + engine.kv_blocks.num_free == num_kv_blocks  # exact accounting
    assert all(s.status is Status.FINISHED for s in seqs)
    assert engine.kv_blocks.num_free == num_kv_blocks and engine.mm_blocks.num_free == 8
    for s in seqs:  # max_tokens and stop tokens honoured
        assert 1 <= len(s.output_ids) <= s.sampling.max_tokens
        stops = [j for j, t in enumerate(s.output_ids) if t in s.stop_token_ids]
        assert stops in ([], [len(s.output_ids) - 1])
    # FCFS: first prefills happen in arrival order within each path (text-only / with images).
    first = list(dict.fromkeys(runner.prefill_order))
    for has_images in (False, True):
        order = [i for i in first if (seqs[i].num_items > 0) == has_images]
        assert order == sorted(order)


def test_preemption_recomputes_with_identical_tokens() -> None:
    """Tokens depend only on (id, length): a preempted sequence must continue exactly."""
    rng = random.Random(1)
    seqs = [_seq(i, rng) for i in range(60)]
    results = []
    for blocks, multi_step in ((10_000, 1), (12, 1), (12, 4), (10_000, 16)):
        runner = FakeRunner(blocks, 8, 8)
        config = EngineConfig("fake", max_num_seqs=8, max_num_batched_tokens=128, max_images_per_batch=4,
                              multi_step=multi_step)
        engine = AggregatedEngine(runner, config)
        copies = [Sequence(seq_id=s.seq_id, prompt_ids=list(s.prompt_ids), sampling=s.sampling, seed=0,
                           stop_token_ids=s.stop_token_ids, pixel_values=s.pixel_values) for s in seqs]
        for s in copies:
            engine.add(s)
        while engine.has_work():
            for kept in append_step(engine.step()):  # tokens past a stop (multi-step) dropped
                if kept.finish_reason:
                    engine.finish(kept.seq)
        results.append(([s.output_ids for s in copies], engine.num_preemptions))
    assert results[1][1] > 0 and results[0][1] == 0
    assert all(r[0] == results[0][0] for r in results)


@pytest.mark.parametrize(("num_kv_blocks", "multi_step"), [(400, 1), (30, 1), (30, 4)])
def test_n_samples_share_prompt_blocks_without_leaks(num_kv_blocks: int, multi_step: int) -> None:
    """Requests forking into 1-4 samples, with preemption when the arena is tight: exact block
    accounting with shared prompt blocks, no write into a shared block, and every sample's
    tokens those its own seed gives alone."""
    rng = random.Random(num_kv_blocks + multi_step)
    bs = 4
    runner = FakeRunner(num_kv_blocks, 8, bs)
    config = EngineConfig("fake", max_num_seqs=12, max_num_batched_tokens=64, max_images_per_batch=4,
                          multi_step=multi_step)
    engine = AggregatedEngine(runner, config)
    runner.kv = engine.kv_blocks
    seqs = []
    for i in range(150):
        prompt = [5] * rng.randint(1, 20)
        n = rng.choice([1, 2, 3, 4])
        max_tokens = rng.randint(1, min(12, (num_kv_blocks * bs // n - len(prompt)) // 2))
        sp = SamplingParams(max_tokens=max_tokens, n=n, stop_token_ids=(rng.randrange(1000),))
        seqs.append(Sequence(seq_id=i, prompt_ids=prompt, sampling=sp, seed=rng.randrange(100),
                             stop_token_ids=frozenset(sp.stop_token_ids)))
    pending = list(seqs)
    for _ in range(100_000):
        if not (pending or engine.has_work()):
            break
        for _ in range(rng.randint(0, 3)):
            if pending:
                engine.add(pending.pop(0))
        for kept in append_step(engine.step()):  # tokens past a stop (multi-step) dropped
            if kept.finish_reason:
                engine.finish(kept.seq)
        live = [s for root in seqs for s in root.samples or [root] if s.status is not Status.FINISHED]
        held = {b for s in live for b in s.block_table}
        assert len(held) + engine.kv_blocks.num_free == num_kv_blocks  # shared blocks counted once
    assert not pending and not engine.has_work() and engine.kv_blocks.num_free == num_kv_blocks
    assert any(len(root.samples) == 4 for root in seqs) and runner.copies
    for root in seqs:
        samples = root.samples or [root]
        assert [s.sample_index for s in samples] == list(range(root.sampling.n))
        for s in samples:  # what this seed gives alone: token by length until a stop or max_tokens
            expected = []
            while len(expected) < s.sampling.max_tokens and (not expected or expected[-1] not in s.stop_token_ids):
                expected.append(runner._token(s, len(s.prompt_ids) + len(expected)))
            assert s.output_ids == expected
    if num_kv_blocks < 100:
        assert engine.num_preemptions > 0


def test_block_manager_refcounts() -> None:
    bm = BlockManager(4)
    a = bm.allocate(3)
    assert bm.allocate(2) is None and bm.num_free == 1
    bm.share(a[:1])
    bm.free(a)
    assert bm.num_free == 3
    bm.free(a[:1])
    assert bm.num_free == 4
    with pytest.raises(AssertionError, match="freed twice"):
        bm.free(a[:1])
