"""Programmatic dependent launch (epd_kernels/common.cuh, launch_pdl): on sm_90 the decode step's
kernels are scheduled while the kernel ahead of them still runs and wait for it inside, after
reading only weights. A kernel that read an activation or wrote anything before its wait would
race; this runs two Llama-7B-shaped decode layers and a head, queued back to back behind a long
producer, and wants the bits of the same ops each run alone (synchronized), eagerly and replayed
from a CUDA graph, on fresh inputs each time, and the bits of a run with EPD_PDL=0.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from epd_kernels import reference

try:
    from epd_kernels import _epd_C, attn_varlen, gemv, rmsnorm_rope
except ImportError:  # CPU machines: the extension is not built
    _epd_C = attn_varlen = gemv = rmsnorm_rope = None

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(_epd_C is None, reason="epd_kernels._epd_C is not built"),
]

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB = 4096, 32, 8, 128, 11008, 32064
BLOCK, LAYERS, EPS = 16, 2, 1e-5
LENGTHS = [640, 1, 97, 2048, 577, 33, 1500, 16]  # context of each sequence before this step


def _weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape: int, scale: float) -> torch.Tensor:
        return (torch.randn(shape, generator=g, device="cuda") * scale).to(torch.bfloat16)

    qkv_rows = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    return {"producer": randn(VOCAB, HIDDEN, scale=HIDDEN**-0.5), "ln": randn(HIDDEN, scale=0.1) + 1,
            "qkv": randn(qkv_rows, HIDDEN, scale=HIDDEN**-0.5), "o": randn(HIDDEN, HIDDEN, scale=HIDDEN**-0.5),
            "gate_up": randn(2 * INTER, HIDDEN, scale=HIDDEN**-0.5), "down": randn(HIDDEN, INTER, scale=INTER**-0.5),
            "head": randn(VOCAB, HIDDEN, scale=HIDDEN**-0.5)}


def _state(batch: int, seed: int) -> dict[str, torch.Tensor]:
    """One decode step's inputs: x, positions, slots, block tables and a KV arena holding each
    sequence's earlier tokens (random)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    lens = LENGTHS[:batch]
    per_seq = -(-(max(lens) + 1) // BLOCK)
    arena = torch.randn((batch * per_seq, LAYERS, 2, BLOCK, KV_HEADS, HEAD_DIM), generator=g, device="cuda")
    tables = torch.arange(batch * per_seq, device="cuda", dtype=torch.int32).view(batch, per_seq)
    positions = torch.tensor(lens, device="cuda", dtype=torch.int64)
    slots = tables[:, 0].long() * BLOCK + positions  # each sequence's blocks are consecutive
    return {"x": torch.randn((batch, HIDDEN), generator=g, device="cuda").to(torch.bfloat16),
            "arena": arena.to(torch.bfloat16), "tables": tables, "positions": positions, "slots": slots,
            "seq_lens": positions.to(torch.int32) + 1,
            "cos_sin": reference.rope_cos_sin(10000.0 ** (-torch.arange(0, HEAD_DIM, 2) / HEAD_DIM), 4096).cuda()}


def _step(w: dict, s: dict, sync: bool) -> list[torch.Tensor]:
    """The producer (a lm_head-sized GEMV, ~65 us), two decode layers as engine/models/llama.py runs
    them, the final norm and the head, each op followed by a device sync when `sync` (never inside
    a capture). Returns every op's output and the arena, live."""
    outs: list[torch.Tensor] = []

    def keep(*ts: torch.Tensor) -> None:
        if sync:
            torch.cuda.synchronize()
        outs.extend(ts)

    batch = s["x"].shape[0]
    q_size, kv_size = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    produced = gemv.linear(s["x"], w["producer"])
    keep(produced)
    hidden = rmsnorm_rope.rms_norm(produced[:, :HIDDEN].contiguous(), w["ln"], EPS)
    residual = produced[:, HIDDEN: 2 * HIDDEN].contiguous()
    keep(hidden, residual)
    for layer in range(LAYERS):
        hidden, residual = rmsnorm_rope.add_rms_norm(hidden, residual, w["ln"], EPS)
        keep(hidden, residual)
        qkv = gemv.linear(hidden, w["qkv"])
        keep(qkv)
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = rmsnorm_rope.rope_and_cache_write(
            q.view(batch, HEADS, HEAD_DIM), k.view(batch, KV_HEADS, HEAD_DIM), v.view(batch, KV_HEADS, HEAD_DIM),
            s["positions"], s["cos_sin"], s["arena"], layer, s["slots"])
        keep(q)
        attn = attn_varlen.paged_attention_decode(q, s["arena"], layer, s["seq_lens"], s["tables"], HEAD_DIM**-0.5)
        keep(attn)
        hidden = gemv.linear(attn.reshape(batch, q_size), w["o"])
        keep(hidden)
        hidden, residual = rmsnorm_rope.add_rms_norm(hidden, residual, w["ln"], EPS)
        keep(hidden, residual)
        gated = gemv.gate_up_silu(hidden, w["gate_up"])
        keep(gated)
        hidden = gemv.linear(gated, w["down"])
        keep(hidden)
    hidden, _ = rmsnorm_rope.add_rms_norm(hidden, residual, w["ln"], EPS)
    keep(hidden)
    keep(gemv.linear(hidden, w["head"]), s["arena"])
    return outs


def _fresh(s: dict) -> dict:
    return {k: v.clone() for k, v in s.items()}


def _done(outs: list[torch.Tensor]) -> list[torch.Tensor]:
    torch.cuda.synchronize()
    return [t.clone() for t in outs]


def _compare(got: list[torch.Tensor], want: list[torch.Tensor], what: str) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(a, b), f"{what}: output {i} of the step differs from the op-by-op run"


def _outputs(batch: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """(op by op, back to back, replayed from a graph), all from the same weights and inputs."""
    w, s = _weights(seed), _state(batch, seed + 1)
    alone = _done(_step(w, _fresh(s), sync=True))
    queued = _done(_step(w, _fresh(s), sync=False))
    graph_state = _fresh(s)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):  # records; runs nothing
        captured = _step(w, graph_state, sync=False)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    return alone, queued, _done(captured)


def test_pdl_is_on_where_the_device_has_it() -> None:
    want = torch.cuda.get_device_capability()[0] >= 9 and os.environ.get("EPD_PDL") != "0"
    assert _epd_C.pdl_enabled() == want


@pytest.mark.parametrize("batch", [1, 5, 8])
def test_kernels_queued_back_to_back_give_the_op_by_op_bits(batch: int) -> None:
    for trial in range(3):
        alone, queued, replayed = _outputs(batch, seed=100 * batch + trial)
        _compare(queued, alone, f"batch {batch} trial {trial}, queued")
        _compare(replayed, alone, f"batch {batch} trial {trial}, graph replay")


def test_pdl_off_gives_the_same_bits(tmp_path: Path) -> None:
    """EPD_PDL=0 (plain launches) in a fresh process: the same step, the same bits."""
    ours = _outputs(8, seed=7)[1]
    saved = tmp_path / "off.pt"
    root, here = str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)
    code = (f"import sys, torch; sys.path.insert(0, {root!r}); sys.path.insert(0, {here!r}); import test_pdl as t\n"
            "from epd_kernels import _epd_C\nassert not _epd_C.pdl_enabled()\n"
            f"torch.save(t._outputs(8, seed=7)[1], {str(saved)!r})")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300, env={**os.environ, "EPD_PDL": "0"})
    _compare(ours, torch.load(saved), "EPD_PDL=0")
