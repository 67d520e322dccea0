"""n samples of one prompt: one prefill, shared prompt blocks (the partial one copied), each
sample equal to a single run with its seed, through finish, abort, preemption and streaming."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine import LLM, Request, RequestError, SamplingParams
from engine.config import EngineConfig
from engine.epd import EPDEngine
from engine.estimator import LoadEstimator
from engine.input_processor import InputProcessor
from engine.sampling import sample_seed

SEED = 123
SAMPLED = {"max_tokens": 10, "temperature": 0.8, "seed": SEED, "ignore_eos": True}


def _birds(words: int) -> Request:
    """A raw prompt of 2 * words + 2 tokens on the tiny Llama (7 words: 16 = one full block)."""
    return Request(" ".join(["bird"] * words), raw_prompt=True)


def _png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _singles(llm: LLM, request: Request, n: int, **sampling) -> list[list[int]]:
    """What each of n samples must be: a plain n=1 run with that sample's seed."""
    kw = {**SAMPLED, **sampling}
    return [llm.generate(request, SamplingParams(**{**kw, "seed": sample_seed(kw["seed"], i)}))[0].token_ids
            for i in range(n)]


def _all_free(llm: LLM) -> bool:
    return not llm.has_work() and llm.engine.kv_blocks.num_free == llm.runner.num_kv_blocks


def test_sample_seeds() -> None:
    seeds = [sample_seed(SEED, i) for i in range(16)]
    assert seeds[0] == SEED and len(set(seeds)) == 16 and all(0 <= s < 2**63 for s in seeds)
    assert sample_seed(2**63 - 1, 15) == sample_seed(2**63 - 1, 15) < 2**63


@pytest.mark.parametrize("words", [7, 8])  # 16 prompt tokens (block-aligned) / 18 (last block partial: copied)
def test_samples_equal_single_runs_and_prefill_once(llama_llm: LLM, words: int,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    runner = llama_llm.runner
    prefilled: list[int] = []
    prefill = runner.prefill

    def spy(seqs, *args, **kwargs):
        prefilled.extend(s.num_tokens - s.num_cached for s in seqs)
        return prefill(seqs, *args, **kwargs)

    monkeypatch.setattr(runner, "prefill", spy)
    out = llama_llm.generate(_birds(words), SamplingParams(n=4, **SAMPLED))[0]
    assert prefilled == [2 * words + 2]  # one prefill of the prompt, none per sample
    monkeypatch.undo()
    assert [o.index for o in out.outputs] == [0, 1, 2, 3]
    assert all(o.finish_reason == "length" and len(o.token_ids) == 10 for o in out.outputs)
    assert (out.token_ids, out.text, out.finish_reason) == (out.outputs[0].token_ids, out.outputs[0].text, "length")
    singles = _singles(llama_llm, _birds(words), 4)
    assert [o.token_ids for o in out.outputs] == singles
    assert len({tuple(t) for t in singles}) > 1  # the seeds differ, and so do the samples
    assert [o.text for o in out.outputs] == [llama_llm.tokenizer.decode(t) for t in singles]
    assert _all_free(llama_llm)


def test_fork_shares_full_blocks_and_copies_the_partial_one(llama_llm: LLM) -> None:
    seq = llama_llm.add_request(_birds(8), SamplingParams(n=3, **SAMPLED))  # 18 tokens: 1 full block + 2
    total = llama_llm.runner.num_kv_blocks
    events = llama_llm.step()  # the prefill, then the fork
    assert [(ev.index, ev.sample) for ev in events] == [(seq.seq_id, 0), (seq.seq_id, 1), (seq.seq_id, 2)]
    tables = [s.block_table for s in seq.samples]
    assert len({t[0] for t in tables}) == 1 and len({t[1] for t in tables}) == 3
    assert llama_llm.engine.kv_blocks.num_free == total - 4  # 1 shared + 3 own
    arena = llama_llm.runner.kv_arena
    for t in tables[1:]:  # the copies hold the prompt's last 2 tokens, as the original does
        assert torch.equal(arena[t[1], :, :, :2], arena[tables[0][1], :, :, :2])
    output = llama_llm.abort(seq)
    assert [o.finish_reason for o in output.outputs] == ["abort"] * 3 and output.finish_reason == "abort"
    assert [len(o.token_ids) for o in output.outputs] == [1, 1, 1]
    assert _all_free(llama_llm) and llama_llm.abort(seq) is None


def test_temperature_zero_gives_identical_samples(llama_llm: LLM) -> None:
    out = llama_llm.generate("Tell me a story", SamplingParams(n=3, max_tokens=8, ignore_eos=True))[0]
    alone = llama_llm.generate("Tell me a story", SamplingParams(max_tokens=8, ignore_eos=True))[0]
    assert [o.token_ids for o in out.outputs] == [alone.token_ids] * 3


def test_abort_before_prefill_and_mid_stream_frees_every_block(llama_llm: LLM) -> None:
    seq = llama_llm.add_request("Tell me a story", SamplingParams(n=4, **SAMPLED))
    output = llama_llm.abort(seq)  # still waiting: its samples do not exist yet
    assert [(o.index, o.token_ids, o.finish_reason) for o in output.outputs] == [(i, [], "abort") for i in range(4)]
    assert _all_free(llama_llm)
    stream = llama_llm.stream(["Tell me a story", "Hello"], SamplingParams(n=4, max_tokens=30, temperature=0.8))
    for _ in range(12):  # both prefilled and forked, a few decode steps in
        next(stream)
    stream.close()
    assert _all_free(llama_llm)


def test_stream_events_carry_the_sample_index(llama_llm: LLM) -> None:
    texts: dict[tuple[int, int], str] = {}
    done = []
    for ev in llama_llm.stream(["Tell me a story", "Hello"], SamplingParams(n=3, **SAMPLED)):
        texts[ev.index, ev.sample] = texts.get((ev.index, ev.sample), "") + ev.text_delta
        if ev.output is not None:
            done.append(ev)
    assert sorted(texts) == [(i, s) for i in range(2) for s in range(3)]
    assert sorted(ev.index for ev in done) == [0, 1]  # one output per request, on its last token
    for ev in done:
        assert [texts[ev.index, o.index] for o in ev.output.outputs] == [o.text for o in ev.output.outputs]


def test_finish_reason_per_sample(llama_llm: LLM) -> None:
    singles = _singles(llama_llm, _birds(5), 3)
    stop_id = singles[1][3]
    out = llama_llm.generate(_birds(5), SamplingParams(n=3, stop_token_ids=(stop_id,), **SAMPLED))[0]
    for tokens, sample in zip(singles, out.outputs):
        cut = tokens[: tokens.index(stop_id) + 1] if stop_id in tokens else tokens
        assert sample.token_ids == cut
        assert sample.finish_reason == ("stop" if stop_id in tokens else "length")
    assert out.outputs[1].finish_reason == "stop" and _all_free(llama_llm)


def test_samples_with_images_survive_preemption(tiny_llava: Path, llava_llm: LLM) -> None:
    """A tiny arena preempts forked samples; each recomputes itself (images re-encoded) and
    ends with the tokens it has with room to spare."""
    requests = [Request("What is in the image?", images=[_png(1)]), Request("Describe it", images=[_png(2)])]
    sp = SamplingParams(n=2, max_tokens=20, temperature=0.8, seed=7, ignore_eos=True)
    reference = llava_llm.generate(requests, sp)
    # 49- and 50-token prompts: 5 blocks each with its fork, 7 at the end; 11 make the growth preempt
    small = LLM(tiny_llava, backend="torch", device="cpu", kv_cache_tokens=11 * 16, block_size=16)
    preempted: list[int] = []
    preempt = small.engine.decode._preempt

    def spy(seq):
        preempted.append(seq.sample_index)
        preempt(seq)

    small.engine.decode._preempt = spy
    outs = small.generate(requests, sp)
    assert any(i > 0 for i in preempted), preempted  # a forked sample was preempted and recomputed
    assert [[o.token_ids for o in r.outputs] for r in outs] == [[o.token_ids for o in r.outputs] for r in reference]
    assert _all_free(small) and small.engine.encode.cache.stats()["in_use_blocks"] == 0


def test_capacity_counts_every_sample(tiny_llama: Path, llama_llm: LLM) -> None:
    # 14 prompt + 1000 = 1014 tokens = 64 blocks of 16 per sample; the arena has 256
    assert llama_llm.make_sequence("Tell me a story", SamplingParams(n=4, max_tokens=1000)).sampling.n == 4
    with pytest.raises(RequestError, match=r"needs 320 KV blocks \(1014 tokens, 5 samples\); the cache has 256"):
        llama_llm.make_sequence("Tell me a story", SamplingParams(n=5, max_tokens=1000))
    narrow = LLM(tiny_llama, backend="torch", device="cpu", max_num_seqs=2)
    with pytest.raises(RequestError, match="sampling.n = 3; each sample is a decode row and max_num_seqs is 2"):
        narrow.generate("Hello", SamplingParams(n=3))
    assert len(narrow.generate("Hello", SamplingParams(n=2, max_tokens=4))[0].outputs) == 2


def test_penalties_with_samples_equal_single_runs(llama_llm: LLM) -> None:
    """Forked samples start their penalty state from the prompt and their own first token."""
    penalties = {"repetition_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": 0.4}
    out = llama_llm.generate(_birds(8), SamplingParams(n=3, **SAMPLED, **penalties))[0]
    assert [o.token_ids for o in out.outputs] == _singles(llama_llm, _birds(8), 3, **penalties)
    assert [o.token_ids for o in out.outputs] != _singles(llama_llm, _birds(8), 3)  # the penalties act


@pytest.mark.parametrize(("sampling", "field"), [({"n": 2}, "n"), ({"logprobs": True}, "logprobs")])
def test_disaggregated_modes_refuse_what_they_cannot_serve(tiny_llava: Path, sampling: dict, field: str) -> None:
    """Checked in add_request before anything is sent to a stage (no stages needed here)."""
    epd = EPDEngine.__new__(EPDEngine)
    epd.estimator, epd.dynamic = LoadEstimator(), None
    epd.stages, epd.flights, epd.late_events, epd.broken, epd.mode, epd.image_bytes = {}, {}, [], None, "pd", None
    from engine.config import ModelConfig

    cfg = ModelConfig.from_dir(tiny_llava)
    epd.input_processor = InputProcessor(EngineConfig(str(tiny_llava)).for_model(cfg), cfg, 256, 8)
    with pytest.raises(RequestError, match=f"sampling.{field} = .*pd mode does not serve it yet; the aggregated mode"):
        epd.add_request("Hello", SamplingParams(**sampling))
    assert not epd.flights


def test_logprobs_per_sample_equal_single_runs(llama_llm: LLM) -> None:
    sp = {**SAMPLED, "max_tokens": 5, "logprobs": True, "top_logprobs": 2}
    out = llama_llm.generate(_birds(8), SamplingParams(n=3, **sp))[0]
    for i, sample in enumerate(out.outputs):
        alone = llama_llm.generate(_birds(8), SamplingParams(**{**sp, "seed": sample_seed(SEED, i)}))[0]
        assert [r.token_id for r in sample.logprobs] == sample.token_ids == alone.token_ids
        assert [r.logprob for r in sample.logprobs] == pytest.approx([r.logprob for r in alone.outputs[0].logprobs],
                                                                     abs=1e-5)
