"""The reference sampler (greedy, filters, per-request counter-based randomness) and the
validation of SamplingParams: every bad field named with its limit."""

from __future__ import annotations

import pytest
import torch

from engine.sampling import RequestError, SamplingParams
from epd_kernels.reference import random_uniform, sample


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


BAD_SAMPLING = [
    ({"stop": 5}, "sampling.stop = 5; must be a string or a list of non-empty strings"),
    ({"stop": ["ok", 3]}, "sampling.stop = .*must be a string or a list of non-empty strings"),
    ({"stop": ("ok", "a\ud800b")}, r"sampling.stop\[1\] has a lone surrogate '\\ud800' at position 1"),
    ({"stop_token_ids": 7}, "sampling.stop_token_ids = 7; must be a list of non-negative integers"),
    ({"stop_token_ids": [1, True]}, "sampling.stop_token_ids = .*non-negative integers"),
    ({"stop_token_ids": "12"}, "sampling.stop_token_ids = '12'"),
    ({"max_tokens": True}, r"sampling.max_tokens = True; must be an integer >= 1"),
    ({"max_tokens": 2.0}, r"sampling.max_tokens = 2.0"),
    ({"temperature": True}, r"sampling.temperature = True; must be a number in \[0, 100\]"),
    ({"temperature": float("nan")}, "sampling.temperature = nan"),
    ({"temperature": "0.5"}, "sampling.temperature = '0.5'"),
    ({"top_p": float("inf")}, r"sampling.top_p = inf; must be a number in \(0, 1\]"),
    ({"top_k": 1.5}, "sampling.top_k = 1.5"),
    ({"seed": 1.0}, r"sampling.seed = 1.0; must be None or an integer in \[0, 2\*\*63\)"),
    ({"seed": True}, "sampling.seed = True"),
    ({"ignore_eos": "yes"}, "sampling.ignore_eos = 'yes'; must be True or False"),
    ({"skip_special_tokens": 1}, "sampling.skip_special_tokens = 1"),
    ({"n": 0}, r"sampling.n = 0; must be an integer in \[1, 16\]"),
    ({"n": 17}, r"sampling.n = 17"),
    ({"n": 2.0}, r"sampling.n = 2.0"),
    ({"presence_penalty": 2.5}, r"sampling.presence_penalty = 2.5; must be a number in \[-2, 2\]"),
    ({"presence_penalty": float("nan")}, "sampling.presence_penalty = nan"),
    ({"frequency_penalty": -3}, r"sampling.frequency_penalty = -3; must be a number in \[-2, 2\]"),
    ({"repetition_penalty": 0.0}, r"sampling.repetition_penalty = 0.0; must be a number in \(0, 10\]"),
    ({"repetition_penalty": 11}, "sampling.repetition_penalty = 11"),
    ({"logprobs": 1}, "sampling.logprobs = 1; must be True or False"),
    ({"top_logprobs": 21, "logprobs": True}, r"sampling.top_logprobs = 21; must be an integer in \[0, 20\]"),
    ({"top_logprobs": 3}, "sampling.top_logprobs = 3; needs logprobs=True"),
]


@pytest.mark.parametrize(("kwargs", "match"), BAD_SAMPLING)
def test_bad_sampling_names_the_field_and_the_limit(kwargs: dict, match: str) -> None:
    with pytest.raises(RequestError, match=match):
        SamplingParams(**kwargs)


def test_sampling_accepts_the_limits() -> None:
    sp = SamplingParams(stop="END", stop_token_ids=[1, 2], n=16, presence_penalty=-2, frequency_penalty=2.0,
                        repetition_penalty=10, logprobs=True, top_logprobs=20, seed=2**63 - 1, temperature=100)
    assert sp.stop == ("END",) and sp.stop_token_ids == (1, 2) and sp.n == 16
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
