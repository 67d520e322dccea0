"""The cuda backend end to end (GPU only): eager vs CUDA-graph decode, and vs the torch backend."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _extension_built() -> bool:
    try:
        from epd_kernels import _epd_C  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small GQA Llama with head_dim 64 (the kernels' smallest), bf16, made on the spot."""
    import transformers as hf

    from scripts.make_tiny_model import _init_non_flat, _start_dir

    if not _extension_built():
        pytest.skip("epd_kernels._epd_C is not built")
    out, tok = _start_dir(tmp_path_factory.mktemp("models") / "small-llama", None)
    cfg = hf.LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = hf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        _init_non_flat(model, 0, embed_std=0.3, head_gain=3.0, residual_gain=3.0)
    model.to(torch.bfloat16).save_pretrained(str(out))
    return out


PROMPTS = ["Count the birds in the tree", "Hello", "What colour is the sky on a clear summer day?", "One two"]


def _generate(model: Path, wait: bool = True, prompts: list[str] = PROMPTS, **kw) -> list[list[int]]:
    from engine import LLM, SamplingParams

    llm = LLM(model, device="cuda", dtype="bfloat16", kv_cache_tokens=8192, max_num_seqs=8, **kw)
    graphs = llm.runner.decode_graphs
    if wait:
        graphs.wait_for_capture()
        captured = kw.get("backend") == "cuda" and kw.get("cuda_graphs", True)
        assert len(graphs.graphs) == (len(graphs.buckets) if captured else 0)
    outs = llm.generate(prompts, SamplingParams(max_tokens=24, ignore_eos=True))
    graphs.wait_for_capture()
    return [o.token_ids for o in outs]


def test_graph_decode_equals_eager(small_llama: Path) -> None:
    eager = _generate(small_llama, backend="cuda", cuda_graphs=False)
    assert _generate(small_llama, backend="cuda") == eager
    assert _generate(small_llama, backend="cuda", multi_step=8) == eager
    # 3 sequences run in the bucket of 4: the padded row must change nothing
    three = _generate(small_llama, backend="cuda", cuda_graphs=False, prompts=PROMPTS[:3])
    assert _generate(small_llama, backend="cuda", multi_step=8, prompts=PROMPTS[:3]) == three


def test_background_capture_while_serving(small_llama: Path) -> None:
    eager = _generate(small_llama, backend="cuda", cuda_graphs=False)
    # serving while the buckets are still being captured on a side stream
    assert _generate(small_llama, backend="cuda", background_capture=True, wait=False) == eager


def test_cuda_backend_close_to_torch_backend(small_llama: Path) -> None:
    """bf16 on both backends: the first tokens agree (later ones may drift on near-ties)."""
    ours = _generate(small_llama, backend="cuda", cuda_graphs=True)
    ref = _generate(small_llama, backend="torch")
    agree = sum(a[:8] == b[:8] for a, b in zip(ours, ref))
    assert agree >= len(PROMPTS) - 1, (ours, ref)


def test_vision_graphs_equal_eager_encode(small_llava: Path) -> None:
    from engine import LLM, Request, SamplingParams
    from scripts.bench_offline import images

    llm = LLM(small_llava, backend="cuda", device="cuda", kv_cache_tokens=4096, max_images_per_batch=4)
    vg = llm.runner.vision_graphs
    assert vg is not None and sorted(vg.graphs) == [1, 2, 4]
    size = llm.cfg.vision.image_size
    for n in (1, 3, 4):
        pixels = torch.randn(n, 3, size, size, device="cuda", dtype=torch.bfloat16)
        graphed = vg.run(pixels).clone()
        eager = llm.runner.model.encode_images(llm.runner.ops, pixels)
        torch.testing.assert_close(graphed, eager, rtol=0, atol=0)
    reqs = [Request("Describe", images=images(1, 84)), Request("Two: <image> <image>", images=images(2, 84))]
    sp = SamplingParams(max_tokens=12, ignore_eos=True)
    eager_llm = LLM(small_llava, backend="cuda", device="cuda", kv_cache_tokens=4096, cuda_graphs=False)
    assert [o.token_ids for o in llm.generate(reqs, sp)] == [o.token_ids for o in eager_llm.generate(reqs, sp)]


def test_epd_stages_on_one_gpu_load_only_their_half(small_llava: Path) -> None:
    """Encoders hold the vision tower only, prefill and decode the LM only, decode reads the
    prompt's KV in place in prefill's arena and prefill the embeddings in the encoders' arenas on
    its GPU; output == aggregated, and again with KV copied (and, on two GPUs, embeddings)."""
    from engine import LLM, Request, SamplingParams
    from engine.epd import EPDEngine
    from scripts.bench_offline import images

    reqs = [Request("Describe", images=images(1, 84)), Request("No image"),
            Request("Three: <image> <image> <image>", images=images(3, 84))]
    sp = SamplingParams(max_tokens=16, ignore_eos=True)
    kw = {"backend": "cuda", "device": "cuda", "dtype": "bfloat16", "kv_cache_tokens": 4096}
    llm = LLM(small_llava, **kw)
    reference = [llm.generate([r], sp)[0].token_ids for r in reqs]
    del llm
    runs = [("E:0,0 P:0 D:0", True), ("E:0,0 P:0 D:0", False)]
    if torch.cuda.device_count() > 1:  # peer copies: KV 0 -> 1, embeddings 1 -> 0
        runs.append(("E:1,0 P:0 D:1", True))
    for placement, share in runs:
        with EPDEngine(small_llava, placement=placement, share_kv_arena=share, **kw) as epd:
            outs = [epd.generate([r], sp)[0] for r in reqs]
        assert [o.token_ids for o in outs] == reference, (placement, share)
        assert (outs[0].handoff["kv_bytes"] > 0) == (not share or placement.endswith("D:1"))
        if placement.startswith("E:0,0"):  # the encoders share prefill's GPU: nothing copied
            assert all(o.handoff["mm_bytes"] == 0 for o in outs)
        else:  # encoder0 on GPU 1: its images are copied to prefill's GPU
            assert outs[2].handoff["mm_bytes"] == 3 * outs[0].handoff["mm_bytes"] > 0


def test_aggregated_engine_preprocesses_on_its_gpu(small_llava: Path) -> None:
    """image_preprocess "auto": the LLM's image workers decode and preprocess on the GPU, each on
    its own stream, while the engine steps; PNG pixels are PIL's bit for bit, so the tokens
    equal the PIL path's ("cpu") — for requests sent one by one and for 12 at once (4 workers
    racing the engine: a stream hazard would move tokens)."""
    import io

    import numpy as np
    from PIL import Image

    from engine import LLM, Request, SamplingParams
    from engine.preprocess import GpuImagePreprocessor

    def png(seed: int, w: int, h: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
        return buf.getvalue()

    sizes = [(84, 84), (200, 120), (97, 301), (640, 480)]
    reqs = [Request(f"Describe {i}", images=[png(i, *sizes[i % 4]), png(100 + i, *sizes[(i + 1) % 4])])
            for i in range(12)]
    sp = SamplingParams(max_tokens=12, ignore_eos=True)
    kw = {"backend": "cuda", "device": "cuda", "dtype": "bfloat16", "kv_cache_tokens": 8192, "image_workers": 4}
    outs = {}
    for pre in ("cpu", "auto"):
        llm = LLM(small_llava, image_preprocess=pre, mm_cache=False, **kw)
        alone = [llm.generate([r], sp)[0].token_ids for r in reqs[:3]]
        together = [o.token_ids for o in llm.generate(reqs, sp)]
        on_gpu = isinstance(llm.input_processor.stage_processor(), GpuImagePreprocessor)
        assert on_gpu == (pre == "auto")
        outs[pre] = alone, together
        del llm
    assert outs["auto"] == outs["cpu"]
