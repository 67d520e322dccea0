"""The reference sampler: greedy, filters, and per-request counter-based randomness."""

from __future__ import annotations

import torch

from kernels.reference import random_uniform, sample


def _params(b: int, temp: float = 1.0, k: int = 0, p: float = 1.0, seed: int = 0):
    return (torch.full((b,), temp), torch.full((b,), k, dtype=torch.int64), torch.full((b,), p),
            torch.arange(b, dtype=torch.int64) + seed, torch.zeros(b, dtype=torch.int64))


def test_greedy_first_index_on_ties() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    assert sample(logits, *_params(2, temp=0.0)).tolist() == [1, 0]


def test_top_k_and_top_p_never_leave_the_kept_set() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 50, generator=g).repeat(400, 1)
    temp, _, _, seeds, steps = _params(400)
    top5 = set(logits[0].topk(5).indices.tolist())
    drawn = sample(logits, temp, torch.full((400,), 5), torch.ones(400), seeds, steps)
    assert set(drawn.tolist()) <= top5 and len(set(drawn.tolist())) > 1
    probs = torch.softmax(logits[0], -1)
    order = probs.argsort(descending=True)
    mass = probs[order].cumsum(0)
    nucleus = set(order[: int((mass < 0.5).sum()) + 1].tolist())
    drawn = sample(logits, temp, torch.zeros(400, dtype=torch.int64), torch.full((400,), 0.5), seeds, steps)
    assert set(drawn.tolist()) <= nucleus


def test_distribution_matches_softmax() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).repeat(20000, 1)
    temp, k, p, seeds, steps = _params(20000)
    counts = torch.bincount(sample(logits, temp, k, p, seeds, steps), minlength=4).float() / 20000
    assert torch.allclose(counts, torch.softmax(logits[0], -1), atol=0.015)


def test_uniform_depends_only_on_seed_and_step() -> None:
    seeds = torch.tensor([1, 2**40 + 3, 7, 1])
    steps = torch.tensor([0, 5, 9, 0])
    u = random_uniform(seeds, steps)
    assert u[0] == u[3] and ((u >= 0) & (u < 1)).all()
    assert random_uniform(seeds[1:2], steps[1:2]) == u[1]
    many = random_uniform(torch.arange(100000), torch.zeros(100000, dtype=torch.int64))
    assert abs(many.mean().item() - 0.5) < 0.01
