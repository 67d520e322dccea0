"""CUDA sampler against epd_kernels/reference.py:sample (run on CPU in fp32).

The kernel computes the reference's function exactly in real arithmetic: same softmax, same
descending order (ties by lower index), same top_k / top_p cut, same counter-based uniform, same
inverse-CDF walk. The reference accumulates its CDF in floats, the kernel in exact fixed point, so a
row may differ where u (or the top_p threshold) lies within float rounding of a CDF boundary. Every
mismatch must be such a boundary case (checked in float64), and there may be only a handful.
"""

from __future__ import annotations

import pytest
import torch

from epd_kernels import reference

try:
    from epd_kernels import _epd_C
    from epd_kernels import sampling as ks
except ImportError:
    _epd_C = ks = None

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(_epd_C is None, reason="epd_kernels._epd_C is not built"),
]

BOUNDARY_EPS = 1e-6  # how close u (or the top_p threshold) must be to a CDF boundary to excuse a mismatch


def make_batch(batch: int, vocab: int, seed: int, greedy_share: float = 0.2) -> dict[str, torch.Tensor]:
    """Random logits (no ties) and a mix of sampling parameters, on CPU."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.5, 2.0, 6.0])[torch.randint(0, 3, (batch, 1), generator=gen)]
    logits = torch.randn((batch, vocab), generator=gen) * scale
    temperature = torch.tensor([0.5, 1.0, 1.0, 1.3, 0.8])[torch.randint(0, 5, (batch,), generator=gen)]
    temperature[torch.rand(batch, generator=gen) < greedy_share] = 0.0
    top_k = torch.tensor([0, 0, 1, 7, 50, vocab, vocab + 3, -1])[torch.randint(0, 8, (batch,), generator=gen)]
    top_p = torch.tensor([1.0, 1.0, 0.9, 0.5, 0.05, 0.0, 0.95])[torch.randint(0, 7, (batch,), generator=gen)]
    seeds = torch.randint(-(2**63), 2**63 - 1, (batch,), generator=gen, dtype=torch.int64)
    steps = torch.randint(0, 100_000, (batch,), generator=gen, dtype=torch.int64)
    return dict(logits=logits, temperature=temperature, top_k=top_k, top_p=top_p.float(), seeds=seeds, steps=steps)


def run_kernel(case: dict[str, torch.Tensor]) -> torch.Tensor:
    args = {name: t.cuda() for name, t in case.items()}
    out = torch.full((case["logits"].shape[0],), -7, dtype=torch.int64, device="cuda")
    _epd_C.sample(out, args["logits"], args["temperature"], args["top_k"], args["top_p"], args["seeds"],
                  args["steps"])
    assert torch.equal(ks.sample(**args), out), "wrapper and raw binding disagree"
    return out.cpu()


def boundary_distance(case: dict[str, torch.Tensor], row: int, token: int) -> float:
    """How far (in probability mass, float64) `token` is from being the reference's draw for `row`:
    the distance from u to the token's CDF interval, or from top_p to the nearest mass-before value.
    0 for the reference's own token; inf when the token is not in the kept set at all."""
    logits, t = case["logits"][row], case["temperature"][row].item()
    k, p = int(case["top_k"][row]), case["top_p"][row].item()
    vocab = logits.shape[0]
    probs = torch.softmax(logits / max(t, 1e-5), dim=-1)  # fp32, as the reference
    sorted_probs, order = probs.sort(descending=True, stable=True)
    sp = sorted_probs.double()
    cum = sp.cumsum(0)
    before = cum - sp
    kept = min(k if k > 0 else vocab, vocab)
    p_gap = float("inf")
    if p < 1.0:
        kept = min(kept, max(1, int((before < p).sum())))
        p_gap = (before[1:] - p).abs().min().item() if vocab > 1 else float("inf")
    rank = (order == token).nonzero().item()
    if rank >= kept:
        return p_gap
    u01 = reference.random_uniform(case["seeds"][row : row + 1], case["steps"][row : row + 1]).item()
    u = u01 * cum[kept - 1].item()
    lo, hi = before[rank].item(), cum[rank].item()
    draw_gap = 0.0 if lo <= u < hi else min(abs(u - lo), abs(u - hi))
    if rank == kept - 1 and u >= hi:
        draw_gap = 0.0  # the reference clamps to the last kept token
    return min(draw_gap, p_gap)


def compare(case: dict[str, torch.Tensor], label: str, max_share: float = 0.02) -> int:
    """Kernel vs reference; asserts every mismatch is a boundary case and there are few. Returns the count."""
    got = run_kernel(case)
    want = reference.sample(**case)
    assert ((got >= 0) & (got < case["logits"].shape[1])).all(), f"{label}: token out of range"
    rows = (got != want).nonzero().flatten().tolist()
    greedy = case["temperature"] <= 0
    if rows:
        assert not greedy[rows].any(), f"{label}: greedy rows differ: {rows}"
    gaps = [boundary_distance(case, r, int(got[r])) for r in rows]
    bad = [(r, int(got[r]), int(want[r]), g) for r, g in zip(rows, gaps) if not g < BOUNDARY_EPS]
    assert not bad, f"{label}: mismatches not explained by a CDF boundary (row, got, want, gap): {bad[:5]}"
    sampled = int((~greedy).sum())
    allowed = max(2, int(max_share * sampled))
    assert len(rows) <= allowed, f"{label}: {len(rows)} boundary mismatches of {sampled} sampled rows"
    if rows:
        print(f"{label}: {len(rows)}/{sampled} sampled rows differ at a boundary (gaps {[f'{g:.1e}' for g in gaps]})")
    return len(rows)


@pytest.mark.parametrize("batch", [1, 3, 17, 64])
@pytest.mark.parametrize("vocab", [7, 1000, 32064])
def test_matches_reference(batch: int, vocab: int) -> None:
    for rep in range(3):
        compare(make_batch(batch, vocab, seed=batch * 1000 + vocab + rep), f"B={batch} V={vocab} rep={rep}")


def test_matches_reference_large_vocab() -> None:
    compare(make_batch(5, 128256, seed=11, greedy_share=0.0), "V=128256")


@pytest.mark.parametrize("batch", [1, 3, 17, 64])
@pytest.mark.parametrize("vocab", [7, 1000, 32064])
def test_greedy_first_index_on_ties(batch: int, vocab: int) -> None:
    gen = torch.Generator().manual_seed(batch + vocab)
    case = make_batch(batch, vocab, seed=batch + vocab)
    case["logits"] = torch.randint(-3, 3, (batch, vocab), generator=gen).float()  # many equal maxima
    case["temperature"] = torch.where(torch.arange(batch) % 2 == 0, 0.0, -1.0)
    got = run_kernel(case)
    assert torch.equal(got, case["logits"].argmax(dim=-1))
    assert torch.equal(got, reference.sample(**case))


def test_ties_when_sampling() -> None:
    """Equal probabilities are ordered by index, as the reference's stable sort (exercises the tie search)."""
    gen = torch.Generator().manual_seed(3)
    for vocab, levels in [(1000, 1), (1000, 4), (32064, 3)]:
        case = make_batch(64, vocab, seed=vocab + levels, greedy_share=0.0)
        case["logits"] = torch.randint(0, levels, (64, vocab), generator=gen).float()
        compare(case, f"ties V={vocab} levels={levels}", max_share=0.05)


def test_masked_logits_never_drawn() -> None:
    case = make_batch(64, 1000, seed=5, greedy_share=0.0)
    mask = torch.rand(case["logits"].shape, generator=torch.Generator().manual_seed(6)) < 0.9
    mask[:, 0] = False
    case["logits"][mask] = float("-inf")
    case["top_k"].fill_(0)
    case["top_p"].fill_(1.0)
    got = run_kernel(case)
    assert not mask.gather(1, got[:, None]).any(), "drew a token whose logit is -inf"
    compare(case, "masked")


def test_special_parameters() -> None:
    """top_k == 1 and top_p <= 0 keep only the most likely token."""
    case = make_batch(64, 1000, seed=9, greedy_share=0.0)
    argmax = case["logits"].argmax(dim=-1)
    for top_k, top_p in [(1, 1.0), (0, 0.0), (5, -1.0), (1, 0.3)]:
        case["top_k"].fill_(top_k)
        case["top_p"].fill_(top_p)
        assert torch.equal(run_kernel(case), argmax), f"top_k={top_k} top_p={top_p}"


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 5, 1.0), (1.0, 0, 0.6), (0.7, 8, 0.8), (1.5, 0, 1.0)])
def test_filtering_and_distribution(temperature: float, top_k: int, top_p: float) -> None:
    """One row of V=20 drawn with 8192 seeds: dropped tokens never appear; frequencies follow the kept probs."""
    vocab, draws = 20, 8192
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(21)) * 1.5
    case = dict(
        logits=logits.expand(draws, vocab).contiguous(),
        temperature=torch.full((draws,), temperature),
        top_k=torch.full((draws,), top_k, dtype=torch.int64),
        top_p=torch.full((draws,), top_p),
        seeds=torch.arange(draws, dtype=torch.int64) * 7919 + 13,
        steps=torch.full((draws,), 3, dtype=torch.int64),
    )
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True, stable=True)
    before = sorted_probs.cumsum(0) - sorted_probs
    kept = min(top_k if top_k > 0 else vocab, vocab)
    if top_p < 1.0:
        assert (before - top_p).abs().min() > 1e-4, "test logits put top_p on a boundary"
        kept = min(kept, int((before < top_p).sum()))
    kept_ids = order[:kept]
    got = run_kernel(case)
    assert torch.isin(got, kept_ids).all(), f"drew tokens outside the kept set {kept_ids.tolist()}"
    observed = torch.bincount(got, minlength=vocab)[kept_ids].double()
    expected = sorted_probs[:kept] / sorted_probs[:kept].sum() * draws
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    dof = max(kept - 1, 1)
    assert chi2 < dof + 8 * (2 * dof) ** 0.5 + 10, f"chi-square {chi2:.1f} with {dof} degrees of freedom"
    compare(case, f"distribution T={temperature} k={top_k} p={top_p}", max_share=0.005)


def test_independent_of_batch_composition() -> None:
    """A row's token depends on its logits, parameters, seed and step only."""
    small = make_batch(17, 32064, seed=31, greedy_share=0.0)
    big = make_batch(64, 32064, seed=32)
    positions = torch.randperm(64, generator=torch.Generator().manual_seed(33))[:17]
    for name in big:
        big[name][positions] = small[name]
    got_small = run_kernel(small)
    assert torch.equal(run_kernel(big)[positions], got_small)
    assert torch.equal(run_kernel(small), got_small), "not deterministic run to run"
    for i in range(3):  # alone, in a batch of one
        single = {name: t[i : i + 1].clone() for name, t in small.items()}
        assert run_kernel(single).item() == got_small[i].item()


def test_seed_and_step_change_the_draw() -> None:
    case = make_batch(64, 1000, seed=41, greedy_share=0.0)
    case["top_k"].fill_(0)
    case["top_p"].fill_(1.0)
    case["temperature"].fill_(1.0)
    case["logits"] = case["logits"][:1].expand(64, 1000).contiguous() * 0.1  # flat: draws spread widely
    case["seeds"].fill_(1234)
    case["steps"] = torch.arange(64)
    assert run_kernel(case).unique().numel() > 32


def test_graph_capture() -> None:
    case = {name: t.cuda() for name, t in make_batch(17, 1000, seed=51).items()}
    ks.sample(**case)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ks.sample(**case)
    fresh = make_batch(17, 1000, seed=52)
    for name, t in fresh.items():
        case[name].copy_(t)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, ks.sample(**case))


def test_empty_batch() -> None:
    case = {name: t[:0].cuda() for name, t in make_batch(1, 10, seed=1).items()}
    assert ks.sample(**case).shape == (0,)


def test_errors() -> None:
    case = {name: t.cuda() for name, t in make_batch(3, 10, seed=1).items()}
    out = torch.empty(3, dtype=torch.int64, device="cuda")
    with pytest.raises(RuntimeError, match="top_k must be"):
        _epd_C.sample(out, case["logits"], case["temperature"], case["top_k"][:2], case["top_p"], case["seeds"],
                      case["steps"])
    with pytest.raises(RuntimeError, match="temperature must be"):
        _epd_C.sample(out, case["logits"], case["temperature"].double(), case["top_k"], case["top_p"],
                      case["seeds"], case["steps"])


# ----------------------------------------------------------------------------- penalties


def make_penalty_case(batch: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """Logits with zeros, signed zeros, -inf and NaN; sparse counts with repeats; slots with -1, one
    out of range and two rows sharing a slot; penalties of both signs (repetition < 1 and > 1)."""
    gen = torch.Generator().manual_seed(seed)
    slots_total = batch + 3
    logits = torch.randn((batch, vocab), generator=gen) * 4
    special = torch.randint(0, vocab, (batch, 4), generator=gen)
    logits.scatter_(1, special, torch.tensor([0.0, -0.0, float("-inf"), float("nan")]).expand(batch, 4))
    counts = torch.randint(0, 6, (slots_total, vocab), generator=gen, dtype=torch.int32)
    counts *= torch.rand((slots_total, vocab), generator=gen) < 0.01
    prompt_mask = torch.rand((slots_total, vocab), generator=gen) < 0.02
    slots = torch.randint(0, slots_total, (batch,), generator=gen)
    slots[torch.rand(batch, generator=gen) < 0.3] = -1
    if batch > 2:
        slots[1], slots[2] = slots_total + 4, slots[0]  # past S: unchanged; a shared slot
    return dict(logits=logits, counts=counts, prompt_mask=prompt_mask, slots=slots,
                presence=torch.rand(batch, generator=gen) * 4 - 2, frequency=torch.rand(batch, generator=gen) * 4 - 2,
                repetition=torch.rand(batch, generator=gen) * 2.5 + 0.2)


@pytest.mark.parametrize("batch", [1, 7, 97])
@pytest.mark.parametrize("vocab", [32000, 32007, 128256])
def test_penalties_match_reference(batch: int, vocab: int) -> None:
    """Bit-identical (NaN where the reference has NaN) out of place into a poisoned output, in place,
    and through the wrapper, also on logits with a row stride wider than V."""
    case = make_penalty_case(batch, vocab, seed=batch * 7 + vocab)
    want = reference.apply_penalties(**case)
    args = {name: t.cuda() for name, t in case.items()}
    state = (args["counts"], args["prompt_mask"], args["slots"], args["presence"], args["frequency"],
             args["repetition"])
    out = torch.full_like(args["logits"], float("nan"))
    out[:, ::3] = 123.0
    _epd_C.apply_penalties(out, args["logits"], *state)
    torch.testing.assert_close(out.cpu(), want, rtol=0, atol=0, equal_nan=True)
    inplace = args["logits"].clone()
    _epd_C.apply_penalties(inplace, inplace, *state)
    torch.testing.assert_close(inplace.cpu(), want, rtol=0, atol=0, equal_nan=True)
    wide = torch.zeros(batch, vocab + 5, device="cuda")[:, 1 : vocab + 1]
    wide.copy_(args["logits"])
    torch.testing.assert_close(ks.apply_penalties(wide, *state).cpu(), want, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(args["counts"].cpu(), case["counts"]), "apply_penalties wrote its state"


def test_record_tokens_matches_reference() -> None:
    gen = torch.Generator().manual_seed(3)
    counts = torch.randint(0, 3, (9, 1000), generator=gen, dtype=torch.int32)
    slots = torch.tensor([0, 3, 3, -1, 8, 9, 2, 3, 0])  # 9: past S; slot 3 three times, twice on one token
    tokens = torch.tensor([5, 7, 7, 5, 999, 1, 1000, 8, -1])  # 1000 and -1: outside the vocab
    want = counts.clone()
    reference.record_tokens(want, slots, tokens)
    got = counts.cuda()
    ks.record_tokens(got, slots.cuda(), tokens.cuda())
    assert torch.equal(got.cpu(), want)
    assert want[3, 7] == counts[3, 7] + 2 and want[2].equal(counts[2])


def test_penalties_graph_capture() -> None:
    case = {name: t.cuda() for name, t in make_penalty_case(17, 32000, seed=5).items()}
    tokens = torch.randint(0, 32000, (17,), device="cuda")
    ks.apply_penalties(**case)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    counts_before = case["counts"].clone()
    with torch.cuda.graph(graph):
        out = ks.apply_penalties(**case)
        ks.record_tokens(case["counts"], case["slots"], tokens)
    fresh = make_penalty_case(17, 32000, seed=6)
    for name, t in fresh.items():
        case[name].copy_(t)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out.cpu(), reference.apply_penalties(**fresh), rtol=0, atol=0, equal_nan=True)
    recorded = fresh["counts"].clone()
    reference.record_tokens(recorded, fresh["slots"], tokens.cpu())
    assert torch.equal(case["counts"].cpu(), recorded) and not torch.equal(counts_before, case["counts"])


def test_penalties_errors() -> None:
    case = {name: t.cuda() for name, t in make_penalty_case(3, 100, seed=1).items()}
    out = torch.empty_like(case["logits"])
    state = [case[n] for n in ("counts", "prompt_mask", "slots", "presence", "frequency", "repetition")]
    bad = {1: (case["prompt_mask"][:, :50], "prompt_mask must be counts' shape"),
           0: (case["counts"].long(), "counts must be Int"),
           2: (case["slots"].int(), "slots must be Long"),
           5: (case["repetition"][:2], "repetition must be a contiguous")}
    for index, (tensor, match) in bad.items():
        args = list(state)
        args[index] = tensor
        with pytest.raises(RuntimeError, match=match):
            _epd_C.apply_penalties(out, case["logits"], *args)
    with pytest.raises(RuntimeError, match="counts must be \\[S, 100\\]"):
        _epd_C.apply_penalties(out, case["logits"], case["counts"][:, :99], case["prompt_mask"][:, :99], *state[2:])
    with pytest.raises(RuntimeError, match="tokens must be a contiguous"):
        _epd_C.record_tokens(case["counts"], case["slots"], case["slots"][:2])
