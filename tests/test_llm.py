"""The offline API end to end on the torch backend: batching, streaming, stops, preemption, errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine import LLM, Request, RequestError, SamplingParams
from engine.config import ConfigError
from engine.images import ImageError


def _png(seed: int, size: tuple[int, int] = (90, 120)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _requests() -> list[Request]:
    return [
        Request("What is in the image?", images=[_png(1)]),
        Request("Describe both pictures in detail, please.", images=[_png(2), _png(3, (300, 200))]),
        Request("Hello there"),
        Request("<image> then text, then <image> and <image>", images=[_png(4), _png(5), _png(6)]),
    ]


GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


def test_batched_equals_one_at_a_time(llava_llm: LLM) -> None:
    batched = llava_llm.generate(_requests(), GREEDY)
    single = [llava_llm.generate(r, GREEDY)[0] for r in _requests()]
    assert [o.token_ids for o in batched] == [o.token_ids for o in single]
    assert all(len(o.token_ids) == 12 and o.finish_reason == "length" for o in batched)
    assert llava_llm.engine.kv_blocks.num_free == llava_llm.runner.num_kv_blocks


def test_stream_deltas_rebuild_text(llava_llm: LLM) -> None:
    deltas: dict[int, str] = {}
    outputs = {}
    for ev in llava_llm.stream(_requests()[:3], GREEDY):
        deltas[ev.index] = deltas.get(ev.index, "") + ev.text_delta
        if ev.output:
            outputs[ev.index] = ev.output
    for i, out in outputs.items():
        assert deltas[i] == out.text == llava_llm.tokenizer.decode(out.token_ids)
        assert out.ttft_s > 0 and out.tokens_per_s > 0


def test_preemption_keeps_greedy_output(tiny_llava: Path) -> None:
    long = SamplingParams(max_tokens=40, ignore_eos=True)
    reference = LLM(tiny_llava, backend="torch", device="cpu").generate(_requests(), long)
    # 12 blocks of 16 tokens: prompts are admitted, then decode growth must preempt.
    small = LLM(tiny_llava, backend="torch", device="cpu", kv_cache_tokens=192, block_size=16)
    outs = small.generate(_requests(), long)
    assert small.engine.num_preemptions > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in reference]
    assert small.engine.kv_blocks.num_free == small.runner.num_kv_blocks


def test_stop_token_and_stop_string(llama_llm: LLM) -> None:
    base = llama_llm.generate("Count the birds", SamplingParams(max_tokens=16, ignore_eos=True))[0]
    stop_id = base.token_ids[5]
    out = llama_llm.generate("Count the birds", SamplingParams(max_tokens=16, stop_token_ids=(stop_id,),
                                                               ignore_eos=True))[0]
    first = base.token_ids.index(stop_id)
    assert out.finish_reason == "stop" and out.token_ids == base.token_ids[: first + 1]
    stop_text = base.text[len(base.text) // 2 : len(base.text) // 2 + 3]
    if stop_text.strip():
        out = llama_llm.generate("Count the birds", SamplingParams(max_tokens=16, stop=(stop_text,),
                                                                   ignore_eos=True))[0]
        assert out.finish_reason == "stop" and stop_text not in out.text
        assert base.text.startswith(out.text)


def test_seeded_sampling_is_per_request(llama_llm: LLM) -> None:
    sp = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = llama_llm.generate("Tell me a story", sp)[0].token_ids
    other = SamplingParams(max_tokens=10, temperature=1.0, seed=7, ignore_eos=True)
    batched = llama_llm.generate([Request("Hello", sampling=other), Request("Tell me a story", sampling=sp)])
    assert batched[1].token_ids == alone
    different = llama_llm.generate("Tell me a story", SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9,
                                                                     top_k=50, seed=99, ignore_eos=True))[0]
    assert different.token_ids != alone


def test_context_length_error(llava_llm: LLM) -> None:
    with pytest.raises(RequestError, match=r"prompt has \d+ tokens and max_tokens is 1020: \d+ > the context length"):
        llava_llm.generate("hi", SamplingParams(max_tokens=1020))


def test_bad_requests_do_not_disturb_others(llava_llm: LLM, tmp_path: Path) -> None:
    bad = [
        (Request("x", images=[str(tmp_path / "missing.png")]), ImageError, "file not found"),
        (Request("x", images=[b"not an image"]), ImageError, "image 0: cannot decode"),
        (Request("x", images=[_png(1)[:200]]), ImageError, "image 0"),
        (Request("<image> <image>", images=[_png(1)]), RequestError, "2 <image> tag"),
        (Request("<image>", images=[_png(1), _png(2)]), RequestError, "1 <image> tag"),
    ]
    for req, err, match in bad:
        with pytest.raises(err, match=match):
            llava_llm.generate([Request("fine"), req], GREEDY)
    assert llava_llm.engine.kv_blocks.num_free == llava_llm.runner.num_kv_blocks
    assert llava_llm.generate("fine", GREEDY)[0].token_ids == llava_llm.generate("fine", GREEDY)[0].token_ids


def test_images_rejected_for_text_model(llama_llm: LLM) -> None:
    with pytest.raises(RequestError, match="takes no images"):
        llama_llm.generate(Request("x", images=[_png(1)]))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_k": -2}, "top_k"),
     ({"max_tokens": 0}, "max_tokens"), ({"seed": -5}, "seed"), ({"stop": ("",)}, "stop")],
)
def test_invalid_sampling(kwargs: dict, match: str) -> None:
    with pytest.raises(RequestError, match=f"sampling.{match}"):
        SamplingParams(**kwargs)


def test_engine_option_errors(tiny_llava: Path) -> None:
    with pytest.raises(ConfigError, match="max_model_len = 5000; the model's context is 1024"):
        LLM(tiny_llava, backend="torch", device="cpu", max_model_len=5000)
    with pytest.raises(ValueError, match="backend 'cuda' needs a CUDA device"):
        LLM(tiny_llava, backend="cuda", device="cpu")


def test_multi_step_decode_matches_single_step(tiny_llava: Path) -> None:
    """k steps back to back on device buffers (eager here; graphs on a GPU) change nothing."""
    sp = SamplingParams(max_tokens=21, ignore_eos=True)
    single = LLM(tiny_llava, backend="torch", device="cpu").generate(_requests(), sp)
    multi_llm = LLM(tiny_llava, backend="torch", device="cpu", multi_step=8)
    multi = multi_llm.generate(_requests(), sp)
    assert [o.token_ids for o in multi] == [o.token_ids for o in single]
    stop_id = single[0].token_ids[3]
    stopped = multi_llm.generate(_requests()[0], SamplingParams(max_tokens=21, stop_token_ids=(stop_id,),
                                                                ignore_eos=True))[0]
    assert stopped.token_ids == single[0].token_ids[: single[0].token_ids.index(stop_id) + 1]
    assert multi_llm.engine.kv_blocks.num_free == multi_llm.runner.num_kv_blocks


def test_stream_closed_early_frees_everything(llava_llm: LLM) -> None:
    stream = llava_llm.stream(_requests(), SamplingParams(max_tokens=30, ignore_eos=True))
    for _ in range(5):
        next(stream)
    stream.close()  # the consumer walks away mid-generation
    engine = llava_llm.engine
    assert not engine.has_work()
    assert engine.kv_blocks.num_free == llava_llm.runner.num_kv_blocks
    assert engine.encode.cache.stats()["in_use_blocks"] == 0  # what stays is cached images, no request's
    engine.encode.cache.check()
    assert len(llava_llm.generate("still works", GREEDY)[0].token_ids) == 12


def test_limits_on_batch_size_and_tokens(tiny_llama: Path) -> None:
    """A prompt over the token budget runs alone; never more than max_num_seqs run at once."""
    llm = LLM(tiny_llama, backend="torch", device="cpu", max_num_seqs=2, max_num_batched_tokens=32)
    seen = []
    step = llm.engine.step

    def spy():
        seen.append(len(llm.engine.decode.running))
        return step()

    llm.engine.step = spy
    long_prompt = "count the birds in the tree " * 12  # > 32 tokens
    outs = llm.generate([long_prompt, "a", "b", "c", "d"], SamplingParams(max_tokens=6, ignore_eos=True))
    assert all(len(o.token_ids) == 6 for o in outs) and len(outs[0].prompt_token_ids) > 32
    assert max(seen) <= 2


def test_timestamps_and_ttft_breakdown(llava_llm: LLM) -> None:
    out_img, out_txt = llava_llm.generate([_requests()[0], Request("text only")], GREEDY)
    for out in (out_img, out_txt):
        parts = out.ttft_breakdown
        assert set(parts) == {"queue_s", "preprocess_s", "encode_s", "wait_s", "prefill_s"}
        assert min(parts.values()) >= 0
        assert abs(sum(parts.values()) - out.ttft_s) < 1e-6
        times = out.token_times_s
        assert len(times) == len(out.token_ids) and times == sorted(times) and abs(times[0] - out.ttft_s) < 1e-6
    assert out_img.ttft_breakdown["encode_s"] > 0 and out_txt.ttft_breakdown["encode_s"] == 0
    # the image's decoding and preprocessing count in its TTFT (issue 13, item 4)
    assert out_img.ttft_breakdown["preprocess_s"] > 0 and out_txt.ttft_breakdown["preprocess_s"] == 0


def _png_bytes(size: tuple[int, int], seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_images_are_preprocessed_off_the_engine_thread(llava_llm: LLM) -> None:
    """add_request only checks headers: the image workers decode while the engine steps; the
    outputs equal generate's, a request whose image is corrupt past its header fails alone (an
    error event), and nothing is left behind."""
    llm = llava_llm
    good = [Request("what is this?", images=[_png_bytes((300, 200), i)]) for i in range(3)]
    corrupt = _png_bytes((300, 200), 9)
    bad = Request("and this?", images=[corrupt[: len(corrupt) // 2]])  # the header is intact
    ref = llm.generate(good, GREEDY)
    seqs = [llm.add_request(r, GREEDY) for r in (good[0], bad, good[1], good[2])]
    assert all(s.pixel_values is None for s in seqs)  # nothing decoded yet
    assert llm.status()["waiting_preprocess"] == 4
    outputs, errors = {}, {}
    for _ in range(500):
        if not llm.has_work():
            break
        for ev in llm.step():
            if ev.error is not None:
                errors[ev.index] = ev.error
            elif ev.output is not None:
                outputs[ev.index] = ev.output
    assert set(errors) == {seqs[1].seq_id} and "image 0" in errors[seqs[1].seq_id]
    assert [outputs[s.seq_id].token_ids for s in (seqs[0], seqs[2], seqs[3])] == [o.token_ids for o in ref]
    st = llm.status()
    assert st["waiting_preprocess"] == 0 and st["kv_blocks_free"] == st["kv_blocks_total"]
    assert llm.engine.encode.cache.stats()["in_use_blocks"] == 0 and not llm.output_processor.states


def test_abort_while_preprocessing(llava_llm: LLM) -> None:
    llm = llava_llm
    seq = llm.add_request(Request("x", images=[_png_bytes((64, 64))]), GREEDY)
    out = llm.abort(seq)
    assert out is not None and out.finish_reason == "abort" and out.token_ids == []
    for _ in range(20):
        llm.step()
    assert not llm.has_work() and llm.status()["waiting_preprocess"] == 0


@pytest.mark.parametrize(
    ("make", "match"),
    [(lambda: Request("hi \ud800 there"), r"prompt has a lone surrogate '\\ud800' at position 3"),
     (lambda: Request(5), "prompt must be a string, got int"),
     (lambda: Request("x", images="cat.png"), "images must be a list .*got str"),
     (lambda: Request("x", raw_prompt="yes"), "raw_prompt = 'yes'; must be True or False"),
     (lambda: Request("x", sampling={"max_tokens": 3}), "sampling must be a SamplingParams, got dict")],
)
def test_bad_request_fields_are_named(make, match: str) -> None:
    with pytest.raises(RequestError, match=match):
        make()


def test_garbage_reaching_the_llm_is_named(llama_llm: LLM) -> None:
    """Inputs the tokenizer or list() used to fail on with a bare TypeError."""
    with pytest.raises(RequestError, match="prompt has a lone surrogate '\\\\udfff' at position 1"):
        llama_llm.generate("a\udfff")
    changed = Request("fine")
    changed.images = "cat.png"  # assigned after construction: make_sequence checks again
    bad = [(lambda: llama_llm.generate(changed), "images must be a list"),
           (lambda: llama_llm.generate(5), "requests must be a Request, a prompt string or a list of them, got int"),
           (lambda: llama_llm.generate([Request("ok"), 7]), "request must be a Request or a prompt string, got int"),
           (lambda: llama_llm.generate("x", {"max_tokens": 2}), "sampling must be a SamplingParams, got dict")]
    for call, match in bad:
        with pytest.raises(RequestError, match=match):
            call()
    assert not llama_llm.has_work() and llama_llm.engine.kv_blocks.num_free == llama_llm.runner.num_kv_blocks


def test_finish_reason_in_every_output(llama_llm: LLM) -> None:
    """stop (token or string), length, and abort, on the request and on each CompletionOutput."""
    base = llama_llm.generate("Count the birds", SamplingParams(max_tokens=8, ignore_eos=True))[0]
    assert base.finish_reason == "length" and [o.finish_reason for o in base.outputs] == ["length"]
    assert (base.outputs[0].text, base.outputs[0].token_ids) == (base.text, base.token_ids)
    stopped = llama_llm.generate("Count the birds", SamplingParams(max_tokens=8, stop_token_ids=(base.token_ids[2],),
                                                                   ignore_eos=True))[0]
    assert stopped.finish_reason == stopped.outputs[0].finish_reason == "stop"
    seq = llama_llm.add_request("Count the birds", SamplingParams(max_tokens=8, ignore_eos=True))
    for _ in range(3):
        llama_llm.step()
    aborted = llama_llm.abort(seq)
    assert aborted.finish_reason == aborted.outputs[0].finish_reason == "abort"
    assert aborted.token_ids == base.token_ids[:3] and llama_llm.abort(seq) is None
    assert not llama_llm.has_work() and llama_llm.engine.kv_blocks.num_free == llama_llm.runner.num_kv_blocks


def test_block_runs_cut_blocks_into_consecutive_runs() -> None:
    from engine.runner import block_runs

    assert block_runs([]) == []
    assert block_runs([4]) == [(0, 4, 1)]
    assert block_runs([7, 8, 9, 2, 3]) == [(0, 7, 3), (3, 2, 2)]
    assert block_runs([5, 3, 4, 6]) == [(0, 5, 1), (1, 3, 2), (3, 6, 1)]


def test_encode_writes_each_item_into_its_own_block(tiny_llava: Path) -> None:
    """runner.encode copies the tower's output into the MM arena run by run: items whose blocks
    are scattered and out of order land in their own blocks, and no other block changes."""
    import torch

    from engine.request import Sequence

    llm = LLM(tiny_llava, backend="torch", device="cpu", mm_cache=False)  # its own arena, all blocks free
    runner, pool = llm.runner, llm.engine.mm_blocks
    got = pool.allocate(6)
    assert got is not None, f"{pool.num_free} MM blocks free"
    try:
        blocks = [got[3], got[4], got[0], got[1], got[5]]  # two runs, one lone block, got[2] left out
        size = runner.cfg.vision.image_size
        pixels = torch.randn((len(blocks), 3, size, size), generator=torch.Generator().manual_seed(3))
        before = runner.mm_arena.clone()
        seq = Sequence(seq_id=-1, prompt_ids=[], sampling=SamplingParams(), seed=0, stop_token_ids=frozenset(),
                       pixel_values=pixels, mm_blocks=blocks)
        runner.encode([seq])
        want = runner.encode_images(pixels)
        for i, b in enumerate(blocks):
            assert torch.equal(runner.mm_arena[b], want[i]), f"item {i} (block {b})"
        untouched = [b for b in range(runner.mm_arena.shape[0]) if b not in blocks]
        assert torch.equal(runner.mm_arena[untouched], before[untouched])
    finally:
        pool.free(got)
