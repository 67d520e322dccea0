"""Batch-invariant mode (EngineConfig.deterministic, epd_kernels/invariant.py): a request's tokens and
log-probabilities are bit-identical alone or in a batch, and EPD with two encoders equals the
aggregated engine in bf16 (which, without it, differs: test_epd's GPU test says why).

The CPU tests run the torch backend; the `gpu` ones the cuda backend on conftest's small_llava, whose
head dims the kernels take (decode graphs per batch bucket, the split-KV decode, the prefill tiles)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine import LLM, Request, SamplingParams
from engine.config import ConfigError, EngineConfig
from epd_kernels import cuda_available, reference
from epd_kernels.invariant import ROWS, batch_invariant

SP = SamplingParams(max_tokens=10, ignore_eos=True, logprobs=True, top_logprobs=3)
SP_EPD = SamplingParams(max_tokens=24, ignore_eos=True)  # EPD returns no logprobs yet: tokens only


def _png(seed: int, h: int = 40, w: int = 50) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h + seed, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _requests() -> list[Request]:
    return [
        Request("What is in the picture?", images=[_png(1)]),
        Request("No image here, just text, and a longer prompt than the others by some words."),
        Request("Compare <image>, <image> and <image> please", images=[_png(2), _png(3), _png(4)]),
        Request("Another one", images=[_png(5)]),
        Request("Short"),
    ]


def _record(out) -> tuple:
    """What must be bit-identical: the tokens and every log-probability (sampled and top-3)."""
    return tuple(out.token_ids), tuple((lp.logprob, tuple(lp.top)) for lp in out.outputs[0].logprobs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocked_ops_do_not_depend_on_the_batch(dtype: torch.dtype) -> None:
    ops = batch_invariant(reference)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2 * ROWS + 7, 96, generator=gen).to(dtype)
    w, b = torch.randn(80, 96, generator=gen).to(dtype), torch.randn(80, generator=gen).to(dtype)
    wgu = torch.randn(2 * 40, 96, generator=gen).to(dtype)
    full, full_b, full_gu = ops.linear(x, w), ops.linear(x, w, b), ops.gate_up_silu(x, wgu)
    for i in (0, 1, ROWS - 1, ROWS, 2 * ROWS + 6):  # alone, and at another place in another batch
        row = x[i: i + 1]
        assert torch.equal(ops.linear(row, w), full[i: i + 1])
        assert torch.equal(ops.linear(row, w, b), full_b[i: i + 1])
        assert torch.equal(ops.gate_up_silu(row, wgu), full_gu[i: i + 1])
        shifted = torch.cat([x[i: i + 1], x[:5]])
        assert torch.equal(ops.linear(shifted, w)[0], full[i])
    lead = x[: 3 * (x.shape[0] // 3)].view(3, -1, 96)[:, :2]  # leading dims, non-contiguous
    assert ops.linear(lead, w).shape == (3, 2, 80)
    q, k, v = (torch.randn(4, 30, 2, 16, generator=gen).to(dtype) for _ in range(3))
    dense = ops.attention_dense(q, k, v, 0.25)
    assert torch.equal(ops.attention_dense(q[2:3], k[2:3], v[2:3], 0.25), dense[2:3])
    assert ops.__name__.endswith(reference.__name__) and ops.base is reference
    assert ops.rms_norm is reference.rms_norm  # row-wise ops are the backend's own


def test_deterministic_is_a_bool() -> None:
    with pytest.raises(ConfigError, match="deterministic"):
        EngineConfig("m", deterministic=1)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_output_does_not_depend_on_what_shares_the_batch(tiny_llava: Path, dtype: str) -> None:
    llm = LLM(tiny_llava, backend="torch", device="cpu", dtype=dtype, deterministic=True)
    together = [_record(o) for o in llm.generate(_requests(), SP)]
    alone = [_record(llm.generate([r], SP)[0]) for r in _requests()]
    assert alone == together
    reordered = [_record(o) for o in llm.generate(_requests()[::-1], SP)][::-1]
    assert reordered == together


def test_epd_with_two_encoders_equals_aggregated_in_bf16(tiny_llava: Path) -> None:
    """Without deterministic the 3-image request differs here (two encoders batch its images 2 + 1
    where aggregated encodes 3 at once; test_epd's GPU test)."""
    from engine.epd import EPDEngine

    kw = {"backend": "torch", "device": "cpu", "dtype": "bfloat16", "deterministic": True}
    reference_out = [o.token_ids for o in LLM(tiny_llava, **kw).generate(_requests(), SP_EPD)]
    with EPDEngine(tiny_llava, placement="E:cpu,cpu P:cpu D:cpu", **kw) as epd:
        assert [o.token_ids for o in epd.generate(_requests(), SP_EPD)] == reference_out


# ----------------------------------------------------------------------------- the cuda backend


@pytest.mark.gpu
def test_cuda_output_does_not_depend_on_the_batch_or_the_graph_bucket(small_llava: Path) -> None:
    llm = LLM(small_llava, backend="cuda", device="cuda", dtype="bfloat16", deterministic=True,
              kv_cache_tokens=8192)
    together = [_record(o) for o in llm.generate(_requests(), SP)]  # decode bucket 8
    alone = [_record(llm.generate([r], SP)[0]) for r in _requests()]  # bucket 1
    assert alone == together


@pytest.mark.gpu
def test_cuda_epd_with_two_encoders_equals_aggregated(small_llava: Path) -> None:
    from engine.epd import EPDEngine

    kw = {"backend": "cuda", "device": "cuda", "dtype": "bfloat16", "deterministic": True, "kv_cache_tokens": 8192}
    reference_out = [o.token_ids for o in LLM(small_llava, **kw).generate(_requests(), SP_EPD)]
    with EPDEngine(small_llava, placement="E:0,0 P:0 D:0", **kw) as epd:
        assert [o.token_ids for o in epd.generate(_requests(), SP_EPD)] == reference_out


@pytest.mark.gpu
def test_invariant_decode_attention_ignores_batch_and_table_width() -> None:
    """The split-KV decode with invariant=True: one sequence's output alone, in a batch of 9, and
    with a block table twice as wide is bit-identical (without it the split count follows both)."""
    if not cuda_available():
        pytest.skip("needs CUDA and epd_kernels._epd_C")
    from epd_kernels.attn_varlen import paged_attention_decode

    gen = torch.Generator(device="cuda").manual_seed(0)
    bs, blocks, layers, hkv, d = 16, 1200, 1, 2, 64  # 128 blocks per sequence hold its 2047 tokens
    arena = torch.randn(blocks, layers, 2, bs, hkv, d, device="cuda", generator=gen).to(torch.bfloat16)
    q = torch.randn(9, 8, d, device="cuda", generator=gen).to(torch.bfloat16)
    lens = torch.tensor([1500, 17, 640, 1, 900, 33, 2047, 512, 300], dtype=torch.int32, device="cuda")
    table = torch.randperm(blocks, device="cuda", generator=gen)[: 9 * 128].view(9, 128).to(torch.int32)
    # the same sequence over 4, 8 and 12 splits of 512 tokens (tables 1x, 2x, 3x as wide): same bits
    wide = torch.cat([table, torch.zeros_like(table)], dim=1)
    wider = torch.cat([table, torch.zeros_like(table), torch.zeros_like(table)], dim=1)
    batch = paged_attention_decode(q, arena, 0, lens, table, d**-0.5, invariant=True)
    for i in range(9):
        one = paged_attention_decode(q[i: i + 1], arena, 0, lens[i: i + 1], table[i: i + 1], d**-0.5, invariant=True)
        assert torch.equal(one, batch[i: i + 1]), i
        for t in (wide, wider):
            w1 = paged_attention_decode(q[i: i + 1], arena, 0, lens[i: i + 1], t[i: i + 1], d**-0.5, invariant=True)
            assert torch.equal(w1, batch[i: i + 1]), (i, t.shape)
    ref = reference.paged_attention_decode(q, arena, 0, lens, table, d**-0.5)
    assert (batch.float() - ref.float()).abs().max().item() < 2e-2
