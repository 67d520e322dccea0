"""Logprobs: log_softmax of the raw model logits (before penalties and temperature) for each sampled
token and its top_logprobs alternatives, against HF's logits (fp32, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import LLM, Request, SamplingParams
from engine.logprobs import token_logprobs

PROMPTS = ["Count the birds in the tree", "Hello", "What colour is the sky on a clear summer day?"]
TOL = 1e-4


@pytest.fixture(scope="module")
def hf_llama(tiny_llama: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()


def _hf_logprobs(hf, prompt: list[int], output: list[int]) -> torch.Tensor:
    """log_softmax of HF's logits [len(output), V] at the positions that predicted each output token."""
    with torch.inference_mode():
        logits = hf(input_ids=torch.tensor([prompt + output])).logits[0].float()
    return torch.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + len(output)], dim=-1)


def _check_against_hf(llm: LLM, hf, prompt: str, sp: SamplingParams, token_ids: list[int], records: list) -> None:
    assert [r.token_id for r in records] == token_ids
    ref = _hf_logprobs(hf, llm.make_sequence(prompt, sp).prompt_ids, token_ids)
    chosen = torch.tensor([r.logprob for r in records])
    torch.testing.assert_close(chosen, ref.gather(1, torch.tensor(token_ids)[:, None])[:, 0], atol=TOL, rtol=0)
    values, ids = torch.topk(ref, sp.top_logprobs, dim=-1)
    for step, r in enumerate(records):
        assert [t for t, _ in r.top] == ids[step].tolist(), f"{prompt!r} step {step}"
        torch.testing.assert_close(torch.tensor([v for _, v in r.top]), values[step], atol=TOL, rtol=0)


def test_logprobs_match_hf_raw_logits(llama_llm: LLM, hf_llama) -> None:
    """Raw mode: the penalized, tempered row reports the model's own distribution."""
    params = [SamplingParams(max_tokens=12, ignore_eos=True, logprobs=True, top_logprobs=5),
              SamplingParams(max_tokens=12, ignore_eos=True, logprobs=True, top_logprobs=3, temperature=0.8, seed=4,
                             repetition_penalty=1.3, presence_penalty=1.0),
              SamplingParams(max_tokens=12, ignore_eos=True)]
    outs = llama_llm.generate([Request(p, sampling=sp) for p, sp in zip(PROMPTS, params)])
    for prompt, sp, out in zip(PROMPTS[:2], params, outs):
        _check_against_hf(llama_llm, hf_llama, prompt, sp, out.token_ids, out.outputs[0].logprobs)
    assert outs[2].outputs[0].logprobs is None
    alone = llama_llm.generate(PROMPTS[2], params[2])[0]
    assert outs[2].token_ids == alone.token_ids  # rows without logprobs are unchanged by those with


def test_logprobs_only_the_sampled_token(llama_llm: LLM, hf_llama) -> None:
    sp = SamplingParams(max_tokens=1, ignore_eos=True, logprobs=True)  # prefill's token only, no alternatives
    out = llama_llm.generate(PROMPTS[0], sp)[0]
    (record,) = out.outputs[0].logprobs
    assert record.top == []
    ref = _hf_logprobs(hf_llama, llama_llm.make_sequence(PROMPTS[0], sp).prompt_ids, out.token_ids)
    assert abs(record.logprob - ref[0, out.token_ids[0]].item()) < TOL


def test_multi_step_logprobs_equal_single_step(llama_llm: LLM) -> None:
    sp = SamplingParams(max_tokens=19, ignore_eos=True, logprobs=True, top_logprobs=2, temperature=1.0, seed=8)
    single = llama_llm.generate(PROMPTS, sp)
    engine = llama_llm.engine
    engine.multi_step = 8
    try:
        multi = llama_llm.generate(PROMPTS, sp)
        stop = single[0].token_ids[4]  # a stop in the middle of an 8-step run: records end with the tokens
        stopped = llama_llm.generate(PROMPTS[0], SamplingParams(max_tokens=19, ignore_eos=True, logprobs=True,
                                                                temperature=1.0, seed=8, stop_token_ids=(stop,)))[0]
    finally:
        engine.multi_step = 1
    for a, b in zip(single, multi):
        assert a.token_ids == b.token_ids
        for ra, rb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            assert ra.token_id == rb.token_id and [t for t, _ in ra.top] == [t for t, _ in rb.top]
            assert abs(ra.logprob - rb.logprob) < 1e-5
    n = single[0].token_ids.index(stop) + 1
    assert stopped.token_ids == single[0].token_ids[:n] and len(stopped.outputs[0].logprobs) == n


def test_every_sample_of_n_gets_its_records(llama_llm: LLM, hf_llama) -> None:
    sp = SamplingParams(max_tokens=8, ignore_eos=True, n=3, temperature=1.0, seed=21, logprobs=True, top_logprobs=2,
                        frequency_penalty=0.5)
    out = llama_llm.generate(PROMPTS[1], sp)[0]
    assert len(out.outputs) == 3 and len({tuple(c.token_ids) for c in out.outputs}) > 1
    for c in out.outputs:
        _check_against_hf(llama_llm, hf_llama, PROMPTS[1], sp, c.token_ids, c.logprobs)


def test_top_logprobs_ties_go_to_the_lower_id() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0, 5.0]])
    batch = token_logprobs(logits, torch.tensor([3, 0]), 3)
    assert batch.top_ids.tolist() == [[1, 2, 4], [5, 0, 1]]
    torch.testing.assert_close(batch.chosen, torch.log_softmax(logits, -1)[[0, 1], [3, 0]])
