"""LLaVA-NeXT end to end on the CPU (fp32, torch backend) against HF
`LlavaNextForConditionalGeneration` on the same tiny checkpoint: config and weights (both key
layouts), tokenization, prefill logits and greedy tokens, aggregated and EPD with two encoders
(a request's tiles split across them)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine import LLM, Request, SamplingParams
from engine.config import ConfigError, ModelConfig
from engine.loader import load_model
from scripts.make_tiny_model import NEXT_KEY_LAYOUTS, TINY_PINPOINTS, _rewrite_keys

STEPS = 32
# (height, width): wide, tall, square, smaller than a tile, extreme wide
SIZES_HW = {"wide": (100, 260), "tall": (250, 90), "square": (150, 150), "small": (40, 60), "strip": (30, 300)}


@pytest.fixture(scope="module")
def tiny_next(tiny_llava_next: Path) -> Path:
    return tiny_llava_next


@pytest.fixture(scope="module")
def next_llm(tiny_next: Path) -> LLM:
    return LLM(tiny_next, backend="torch", device="cpu", dtype="float32", max_images_per_batch=16)


@pytest.fixture(scope="module")
def hf_next(tiny_next: Path):
    from transformers import LlavaNextForConditionalGeneration

    return LlavaNextForConditionalGeneration.from_pretrained(str(tiny_next), dtype=torch.float32).eval()


def image(name: str, seed: int = 0) -> Image.Image:
    h, w = SIZES_HW[name]
    rng = np.random.default_rng(seed + h * 1000 + w)
    # smooth-ish content: a gradient plus noise, so tiles differ from each other
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([yy * 255 // max(h - 1, 1), xx * 255 // max(w - 1, 1), (yy + xx) % 256], axis=-1)
    return Image.fromarray(((base + rng.integers(0, 64, (h, w, 3))) % 256).astype(np.uint8))


def requests() -> list[Request]:
    return [
        Request("What is shown in this image?", images=[image("wide")]),
        Request("Describe the picture.", images=[image("tall")]),
        Request("What is this?", images=[image("square")]),
        Request("Is there a cat?", images=[image("small")]),
        Request("Compare <image> and <image> please.", images=[image("strip"), image("wide", 1)]),
    ]


def hf_inputs(seq) -> dict:
    return {"input_ids": torch.tensor([seq.prompt_ids]), "pixel_values": seq.pixel_values,
            "image_sizes": torch.tensor(seq.image_sizes)}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


# ----------------------------------------------------------------------------- config, weights, tokens


def test_config(tiny_next: Path) -> None:
    cfg = ModelConfig.from_dir(tiny_next)
    assert cfg.architecture == "LlavaNextForConditionalGeneration" and cfg.is_anyres
    assert cfg.image_grid_pinpoints == tuple(map(tuple, TINY_PINPOINTS))
    assert cfg.tokens_per_item == 36
    layout = cfg.image_layout(100, 260)  # best pinpoint 84x252: 1 x 3 tiles
    assert layout.num_items == 4
    raw = dict(cfg.raw, image_grid_pinpoints=[[84, 100]])
    with pytest.raises(ConfigError, match=r"image_grid_pinpoints \[84, 100\].*multiple of.*image_size 84"):
        ModelConfig.from_dict(raw)
    with pytest.raises(ConfigError, match="vision_feature_select_strategy 'full'"):
        ModelConfig.from_dict(dict(cfg.raw, vision_feature_select_strategy="full"))


@pytest.mark.parametrize("layout", sorted(NEXT_KEY_LAYOUTS))
def test_weights_load_in_every_key_layout(tiny_next: Path, hf_next, layout: str, tmp_path: Path) -> None:
    model_dir = tmp_path / layout
    shutil.copytree(tiny_next, model_dir)
    _rewrite_keys(model_dir, NEXT_KEY_LAYOUTS[layout])
    cfg = ModelConfig.from_dir(model_dir)
    model = load_model(cfg, model_dir, torch.float32, torch.device("cpu"))
    assert torch.equal(model.image_newline, hf_next.model.image_newline)
    assert torch.equal(model.vision.linear_1_weight, hf_next.model.multi_modal_projector.linear_1.weight)
    vision = load_model(cfg, model_dir, torch.float32, torch.device("cpu"), parts="vision")
    assert vision.image_newline is None and vision.lm is None
    lm = load_model(cfg, model_dir, torch.float32, torch.device("cpu"), parts="lm")
    assert torch.equal(lm.image_newline, hf_next.model.image_newline)


def test_tokens_match_hf_processor(tiny_next: Path, next_llm: LLM) -> None:
    from transformers import AutoTokenizer, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    proc = LlavaNextProcessor(image_processor=LlavaNextImageProcessorPil.from_pretrained(str(tiny_next)),
                              tokenizer=AutoTokenizer.from_pretrained(str(tiny_next)), patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)
    for req in requests():
        seq = next_llm.make_sequence(req)
        text = next_llm.input_processor.tokenizer.build_prompt(req.prompt, len(req.images))
        ref = proc(text=text, images=req.images, return_tensors="pt")
        assert seq.prompt_ids == ref["input_ids"][0].tolist(), req.prompt
        assert seq.image_sizes == [tuple(s) for s in ref["image_sizes"].tolist()]
        hf_items = torch.cat([pv[:n] for pv, n in zip(ref["pixel_values"], [
            next_llm.cfg.image_layout(h, w).num_items for h, w in seq.image_sizes])])
        assert torch.equal(seq.pixel_values, hf_items)


def test_image_over_the_context_is_refused(tiny_next: Path) -> None:
    from engine.sampling import RequestError

    llm = LLM(tiny_next, backend="torch", device="cpu", max_model_len=160)
    too_long = r"prompt has \d+ tokens \(\d+ of them for 1 image\(s\)\).*context length 160"
    with pytest.raises(RequestError, match=too_long):
        llm.make_sequence(Request("Hi", images=[image("square")]), SamplingParams(max_tokens=8))


# ----------------------------------------------------------------------------- parity, aggregated


def _prefill_logits(llm: LLM, seqs: list) -> list[torch.Tensor]:
    engine, runner = llm.engine, llm.runner
    for s in seqs:
        s.block_table = engine.kv_blocks.allocate(-(-len(s.prompt_ids) // runner.block_size) + 1)
        s.mm_blocks = engine.mm_blocks.allocate(s.num_items)
    runner.encode(seqs)
    logits = runner.prefill(seqs, all_logits=True).logits
    for s in seqs:
        engine.finish(s)
    return list(logits.split([len(s.prompt_ids) for s in seqs]))


def test_prefill_logits_match_hf(next_llm: LLM, hf_next) -> None:
    seqs = [next_llm.make_sequence(r, SamplingParams(max_tokens=1)) for r in requests()]
    ours = _prefill_logits(next_llm, seqs)  # all five packed in one varlen prefill
    for seq, logits in zip(seqs, ours):
        with torch.inference_mode():
            ref = hf_next(**hf_inputs(seq)).logits[0]
        err = rel_err(logits, ref)
        assert err <= 1e-4, f"request {seq.seq_id} ({seq.image_sizes}): rel err {err:.2e}"


def hf_greedy(hf, seq, steps: int = STEPS) -> list[int]:
    with torch.inference_mode():
        out = hf.generate(**hf_inputs(seq), attention_mask=torch.ones(1, len(seq.prompt_ids), dtype=torch.long),
                          max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0)
    return out[0, len(seq.prompt_ids):].tolist()


def test_greedy_tokens_match_hf(next_llm: LLM, hf_next) -> None:
    reqs = requests()
    outs = next_llm.generate(reqs, SamplingParams(max_tokens=STEPS, ignore_eos=True, temperature=0.0))
    for req, out in zip(reqs, outs):
        seq = next_llm.make_sequence(req)
        assert out.token_ids == hf_greedy(hf_next, seq), req.prompt


# ----------------------------------------------------------------------------- EPD, two encoders


def test_epd_two_encoders_split_tiles_and_match_hf(tiny_next: Path, next_llm: LLM, hf_next) -> None:
    """A two-image request (4 + 4 items) in EPD with two encoders: its items are split across both
    (intra-request tile parallelism), prefill reassembles them in order; tokens equal HF's and the
    aggregated engine's. Then pd mode (prefill encodes) on the same request."""
    from engine.epd import EPDEngine

    reqs = [requests()[4], requests()[1]]
    sp = SamplingParams(max_tokens=STEPS, ignore_eos=True, temperature=0.0)
    with EPDEngine(tiny_next, placement="E:cpu,cpu P:cpu D:cpu", backend="torch", dtype="float32") as epd:
        split = []
        original = epd.router.encoders_for

        def spy(items, encoders, *keys_and_hints):
            assignment = original(items, encoders, *keys_and_hints)
            split.append({e: list(v) for e, v in (assignment or {}).items()})
            return assignment

        epd.router.encoders_for = spy
        outs = epd.generate(reqs, sp)
        # the same request again: each of its 8 items is answered by the encoder that cached it
        again = epd.generate(reqs[:1], sp)[0]
        cfg = next_llm.cfg
        items = [sum(cfg.image_layout(im.height, im.width).num_items for im in r.images) for r in reqs]
        deadline = time.monotonic() + 30  # the encoders report their counters asynchronously
        while (cache := epd.status()["mm_cache"]).get("hits") != 8 and time.monotonic() < deadline:
            epd.step(timeout_s=0.05)
        assert (cache["hits"], cache["misses"]) == (8, sum(items))
        assert again.token_ids == outs[0].token_ids and split[-1] == split[0]
    assert len(split[0]) == 2, f"the first request's items went to one encoder only: {split[0]}"
    cfg = next_llm.cfg
    items = sum(cfg.image_layout(im.height, im.width).num_items for im in reqs[0].images)
    assert items == 8 and sorted(i for v in split[0].values() for i in v) == list(range(items))
    aggregated = next_llm.generate(reqs, sp)
    for req, out, agg in zip(reqs, outs, aggregated):
        assert out.token_ids == agg.token_ids, req.prompt
        assert out.token_ids == hf_greedy(hf_next, next_llm.make_sequence(req)), req.prompt
    with EPDEngine(tiny_next, mode="pd", placement="P:cpu D:cpu", backend="torch", dtype="float32") as pd:
        assert pd.generate(reqs[:1], sp)[0].token_ids == aggregated[0].token_ids  # prefill encodes the tiles


# ----------------------------------------------------------------------------- cuda backend (GPU only)


@pytest.fixture(scope="module")
def small_next(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small LLaVA-NeXT whose vision and text heads are 64 wide (the kernels and graphs apply), bf16."""
    from scripts.make_tiny_model import make_tiny_llava_next

    try:
        from epd_kernels import _epd_C  # noqa: F401
    except ImportError:
        pytest.skip("epd_kernels._epd_C is not built")
    return make_tiny_llava_next(tmp_path_factory.mktemp("models") / "small-llava-next", dtype=torch.bfloat16,
                                vision_sizes={"hidden_size": 128, "num_attention_heads": 2, "intermediate_size": 256},
                                text_sizes={"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 4,
                                            "intermediate_size": 512})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_backend_prefill_and_epd(small_next: Path) -> None:
    """The CPU parity test on the cuda backend (bf16, vision graphs on): prefill logits within 1.5x
    of HF-bf16's own error against HF fp32 (parity/logits.py's gate), and EPD with two encoders on
    one GPU token-for-token equal to aggregated."""
    from transformers import LlavaNextForConditionalGeneration

    from engine.epd import EPDEngine

    kw = {"backend": "cuda", "device": "cuda", "dtype": "bfloat16", "kv_cache_tokens": 4096,
          "max_images_per_batch": 16}
    llm = LLM(small_next, **kw)
    assert llm.runner.vision_graphs is not None  # items run under the vision graphs' buckets
    seqs = [llm.make_sequence(r, SamplingParams(max_tokens=1)) for r in requests()]
    ours = [x.float().cpu() for x in _prefill_logits(llm, seqs)]
    refs = {}
    for dtype in (torch.float32, torch.bfloat16):
        hf = LlavaNextForConditionalGeneration.from_pretrained(str(small_next), dtype=dtype).to("cuda").eval()
        with torch.inference_mode():
            refs[dtype] = [hf(**{k: v.to("cuda", dtype) if k == "pixel_values" else v.to("cuda")
                                 for k, v in hf_inputs(s).items()}).logits[0].float().cpu() for s in seqs]
        del hf
    for seq, o, r32, r16 in zip(seqs, ours, refs[torch.float32], refs[torch.bfloat16]):
        assert rel_err(o, r32) <= 1.5 * rel_err(r16, r32), f"request {seq.seq_id} ({seq.image_sizes})"
    reqs = [requests()[4], requests()[1]]
    sp = SamplingParams(max_tokens=16, ignore_eos=True, temperature=0.0)
    reference = [llm.generate([r], sp)[0].token_ids for r in reqs]
    del llm
    with EPDEngine(small_next, placement="E:0,0 P:0 D:0", **kw) as epd:
        assert [epd.generate([r], sp)[0].token_ids for r in reqs] == reference


def test_tokenize_needs_sizes(next_llm: LLM) -> None:
    from engine.sampling import RequestError

    with pytest.raises(RequestError, match="token count depends on its size"):
        next_llm.tokenize("What is this?", 1)
    _, ids = next_llm.tokenize("What is this?", 1, image_sizes=[(100, 260)])
    assert ids.count(next_llm.cfg.image_token_id) == next_llm.cfg.image_layout(100, 260).num_tokens == 138
