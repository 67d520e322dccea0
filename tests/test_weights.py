"""engine/roles/weights.py and ipc/peer_link.py on the CPU: a model packed into one shared arena
keeps its outputs; another process maps the same memory (zero copy: a write in one is seen in the
other); a peer receives a copy over gloo (PeerLink) and generates the same tokens. The GPU forms
(CUDA IPC, NCCL) run the same code on the device machine."""

from __future__ import annotations

import io
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from engine import LLM, Request, SamplingParams
from engine.config import ModelConfig
from engine.roles.weights import WeightManifest, WeightStore
from ipc.peer_link import PeerLink

SP = SamplingParams(max_tokens=12, ignore_eos=True)


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


REQUESTS = [Request("Describe the picture", images=[_png(1)]), Request("Hello there"),
            Request("Two: <image> and <image>", images=[_png(2), _png(3)])]


def _tokens(llm: LLM) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(REQUESTS, SP)]


def _llm_on(model_dir, model) -> LLM:
    """An LLM whose runner is built on `model` instead of weights read from disk."""
    import engine.runner as runner

    load = runner.load_weights
    runner.load_weights = lambda *args, **kw: model
    try:
        return LLM(model_dir, backend="torch", device="cpu", kv_cache_tokens=2048, mm_cache=False)
    finally:
        runner.load_weights = load


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llm(tiny_llava):
    return LLM(tiny_llava, backend="torch", device="cpu", kv_cache_tokens=2048, mm_cache=False)


def test_packed_and_opened_models_generate_the_same_tokens(llm, tiny_llava) -> None:
    before = _tokens(llm)
    original = llm.runner.model
    store = WeightStore.pack(original)
    assert store.manifest.parts == "all" and store.nbytes >= sum(
        p.numel() * p.element_size() for p in original.parameters())
    base = store.arena.tensor.data_ptr()
    for p in original.parameters():  # every parameter is a view of the arena now
        assert base <= p.data_ptr() < base + store.nbytes
    assert _tokens(llm) == before
    shared = WeightStore.open(store.manifest, llm.cfg)  # mapped again (here: the same shm file)
    assert _tokens(_llm_on(tiny_llava, shared.model)) == before
    # zero copy: a write through the owner's view is seen through the other mapping
    w = original.lm.norm
    keep = w.detach().clone()
    w.data.mul_(0.5)
    assert torch.equal(shared.model.lm.norm, w) and not torch.equal(shared.model.lm.norm, keep)
    w.data.copy_(keep)
    assert shared.describe()["shared"] and not store.describe()["shared"]


def test_a_manifest_for_another_model_is_refused(llm, tiny_llava_next) -> None:
    store = WeightStore.pack(llm.runner.model)
    with pytest.raises(ValueError, match="weight manifest does not fit"):
        WeightStore.open(store.manifest, ModelConfig.from_dir(tiny_llava_next))


def _open_in_child(manifest: WeightManifest, model_dir: str, conn) -> None:
    """Another process: map the store, report a checksum, then read a weight the parent changes."""
    from engine.config import ModelConfig
    from engine.roles.weights import WeightStore

    store = WeightStore.open(manifest, ModelConfig.from_dir(model_dir))
    conn.send(sum(float(p.double().sum()) for p in store.model.parameters()))
    conn.recv()  # the parent has written
    conn.send(float(store.model.lm.norm[0]))


def _start(target, *args):
    """target(*args, conn) in a spawned process: (the process, our end of the pipe)."""
    import multiprocess as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(*args, child))
    proc.start()
    return proc, parent


def test_another_process_maps_the_same_weights(llm, tiny_llava) -> None:
    store = WeightStore.pack(llm.runner.model)
    proc, parent = _start(_open_in_child, store.manifest, str(tiny_llava))
    try:
        assert parent.poll(120), "the child did not answer"
        checksum = parent.recv()
        assert checksum == pytest.approx(sum(float(p.double().sum()) for p in llm.runner.model.parameters()))
        norm = llm.runner.model.lm.norm
        keep = float(norm[0])
        norm.data[0] = 123.0
        parent.send("written")
        assert parent.poll(60) and parent.recv() == 123.0  # the child's weights are the parent's memory
        norm.data[0] = keep
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == 0


def _receive_in_child(manifest: WeightManifest, model_dir: str, port: int, conn) -> None:
    """A peer: receive the weights over gloo, generate with them, report the tokens."""
    from engine.config import ModelConfig
    from engine.roles.weights import WeightStore
    from ipc.peer_link import PeerLink
    from tests.test_weights import _llm_on, _tokens

    link = PeerLink("127.0.0.1", port, rank=1, backend="gloo")
    store = WeightStore.receive(manifest, ModelConfig.from_dir(model_dir), "cpu", link)
    conn.send((_tokens(_llm_on(model_dir, store.model)), store.describe()))
    link.close()


def test_a_peer_receives_the_weights_over_gloo(llm, tiny_llava) -> None:
    expected = _tokens(llm)
    store = WeightStore.pack(llm.runner.model)
    port = _free_port()
    proc, parent = _start(_receive_in_child, store.manifest, str(tiny_llava), port)
    try:
        link = PeerLink("127.0.0.1", port, rank=0, backend="gloo")
        store.send(link)
        assert parent.poll(120), "the peer did not answer"
        tokens, described = parent.recv()
        link.close()
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    assert tokens == expected
    assert described["bytes"] == store.nbytes and not described["shared"]


def test_peer_link_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="ranks 0 and 1"):
        PeerLink("127.0.0.1", _free_port(), rank=2)


def _open_on_gpu(manifest: WeightManifest, model_dir: str, conn) -> None:
    import torch

    from engine.config import ModelConfig
    from engine.roles.weights import WeightStore

    before = torch.cuda.memory_allocated()
    store = WeightStore.open(manifest, ModelConfig.from_dir(model_dir), "cuda:0")
    conn.send((sum(float(p.double().sum()) for p in store.model.parameters()), torch.cuda.memory_allocated() - before))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_ipc_weights_cost_the_mapper_no_memory(tiny_llava) -> None:
    """On a GPU the mapper's parameters are the owner's memory (CUDA IPC): the same values, and
    the mapper's allocator holds no weight bytes (only rotary tables)."""
    from engine.config import EngineConfig
    from engine.runner import load_weights

    config = EngineConfig(str(tiny_llava), backend="cuda", device="cuda:0").for_model(ModelConfig.from_dir(tiny_llava))
    model = load_weights(config, ModelConfig.from_dir(tiny_llava))
    store = WeightStore.pack(model)
    proc, parent = _start(_open_on_gpu, store.manifest, str(tiny_llava))
    try:
        assert parent.poll(180), "the child did not answer"
        checksum, allocated = parent.recv()
    finally:
        proc.join(30)
    assert checksum == pytest.approx(sum(float(p.double().sum()) for p in model.parameters()))
    assert allocated < store.nbytes / 2, (allocated, store.nbytes)
