"""Split-KV paged decode attention (epd_kernels/attn_varlen/decode.cu) vs epd_kernels/reference.py.

The reference runs in fp32 on upcast inputs. A case passes when the kernel's max abs error is at
most 2x the error of torch SDPA run in the input dtype on the same gathered K/V, + 1e-5.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from epd_kernels import reference

try:
    from epd_kernels import _epd_C
except ImportError:  # CPU machines: the extension is not built
    _epd_C = None

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(_epd_C is None, reason="epd_kernels._epd_C is not built"),
]

LENGTHS = [1, 7, 97, 577, 1025, 4096]
NUM_LAYERS, LAYER = 2, 1


def _lengths(batch: int, seed: int, padded: bool) -> list[int]:
    """Mixed lengths drawn from LENGTHS (every one present once the batch is large enough), some 0 if padded."""
    g = torch.Generator().manual_seed(seed)
    pool = LENGTHS + ([0] if padded else [])
    order = torch.randperm(len(pool), generator=g).tolist()
    lens = [pool[order[i % len(pool)]] for i in range(batch)]
    return [lens[i] for i in torch.randperm(batch, generator=g).tolist()]


def _make_case(
    lens: list[int],
    hq: int,
    hkv: int,
    d: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int,
    max_blocks: int | None = None,
) -> dict:
    """Random q and arena; each sequence's blocks are scattered (shuffled) over the arena; table entries
    past a sequence's blocks point far outside the arena, so reading them would fault or show."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    need = [math.ceil(n / block_size) for n in lens]
    max_blocks = max_blocks or max(1, max(need))
    num_blocks = sum(need) + 3
    arena = torch.randn(num_blocks, NUM_LAYERS, 2, block_size, hkv, d, device="cuda", generator=g).to(dtype)
    perm = torch.randperm(num_blocks, device="cuda", generator=g).to(torch.int32)
    tables = torch.full((len(lens), max_blocks), num_blocks + 10**6, dtype=torch.int32, device="cuda")
    start = 0
    for i, nb in enumerate(need):
        tables[i, :nb] = perm[start : start + nb]
        start += nb
    q = (1.5 * torch.randn(len(lens), hq, d, device="cuda", generator=g)).to(dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    return dict(q=q, arena=arena, seq_lens=seq_lens, tables=tables, scale=d**-0.5)


def _run_kernel(case: dict) -> torch.Tensor:
    out = torch.full_like(case["q"], float("nan"))  # poisoned: every element must be written
    _epd_C.paged_attention_decode(out, case["q"], case["arena"], LAYER, case["seq_lens"], case["tables"], case["scale"])
    return out


def _reference(case: dict) -> torch.Tensor:
    return reference.paged_attention_decode(
        case["q"].float(), case["arena"].float(), LAYER, case["seq_lens"], case["tables"], case["scale"]
    )


def _sdpa_low_precision(case: dict) -> torch.Tensor:
    """The peer: torch SDPA in the input dtype on each sequence's gathered K/V."""
    q = case["q"]
    out = torch.zeros_like(q)
    group = q.shape[1] // case["arena"].shape[4]
    for i, n in enumerate(case["seq_lens"].tolist()):
        if n == 0:
            continue
        k, v = reference.gather_kv(case["arena"], LAYER, case["tables"][i], n)  # [n, Hkv, D]
        k = k.repeat_interleave(group, dim=1).transpose(0, 1)[None]  # [1, Hq, n, D]
        v = v.repeat_interleave(group, dim=1).transpose(0, 1)[None]
        out[i] = F.scaled_dot_product_attention(q[i][None, :, None], k, v, scale=case["scale"])[0, :, 0]
    return out


def _check(case: dict, out: torch.Tensor, ref: torch.Tensor, label: str) -> None:
    assert not torch.isnan(out).any(), f"{label}: {int(torch.isnan(out).sum())} outputs never written (NaN)"
    peer_err = (_sdpa_low_precision(case).float() - ref).abs().max().item()
    tol = 2 * peer_err + 1e-5
    diff = (out.float() - ref).abs()
    err = diff.max().item()
    if err > tol:
        bad = (diff > tol).nonzero()[:8].tolist()
        lines = [
            f"  [b={b}, h={h}, d={d}] got {out[b, h, d].item():+.6f} want {ref[b, h, d].item():+.6f}" for b, h, d in bad
        ]
        raise AssertionError(
            f"{label}: max abs err {err:.3g} > tol {tol:.3g} (SDPA err {peer_err:.3g}); "
            f"seq_lens {case['seq_lens'].tolist()[:16]}; first failures:\n" + "\n".join(lines)
        )
    zero_rows = case["seq_lens"] == 0
    assert (out[zero_rows] == 0).all(), f"{label}: padded rows must be zeros"


HEADS = [(32, 32), (32, 8), (28, 4)]
HEAD_DIMS = [64, 80, 96, 128]
DTYPES = [torch.bfloat16, torch.float16]
BATCHES = [1, 3, 17, 64]
GRID = [(hq, hkv, d, dt) for hq, hkv in HEADS for d in HEAD_DIMS for dt in DTYPES]


@pytest.mark.parametrize(
    "idx", range(len(GRID)), ids=lambda i: "H{}-{}_D{}_{}".format(*GRID[i][:3], str(GRID[i][3])[6:])
)
def test_decode_matches_reference(idx: int) -> None:
    """Every (heads, head_dim, dtype), batch sizes and block sizes rotated across the grid."""
    hq, hkv, d, dtype = GRID[idx]
    batch = BATCHES[idx % len(BATCHES)]
    block_size = (16, 32)[(idx // len(BATCHES)) % 2]
    lens = _lengths(batch, seed=idx, padded=batch > 1)
    case = _make_case(lens, hq, hkv, d, block_size, dtype, seed=1000 + idx)
    _check(case, _run_kernel(case), _reference(case), f"B={batch} H={hq}/{hkv} D={d} bs={block_size} {dtype}")


@pytest.mark.parametrize(
    "lens,hq,hkv,block_size,max_blocks",
    [
        ([1], 32, 32, 16, None),  # batch 1, context 1
        ([4096], 32, 32, 16, None),  # batch 1, long context: many splits
        ([4096], 32, 8, 32, None),
        ([100], 32, 32, 16, 1024),  # wide table (graph bucket capacity), short sequence
        ([0, 0, 0], 32, 8, 16, 8),  # all rows padded
        ([33, 0, 1025, 17, 4096], 32, 32, 8, None),  # block_size 8
        ([33, 0, 1025, 17, 4096], 28, 4, 128, None),  # block_size 128
        ([5000, 12, 129], 32, 8, 64, 200),  # not a multiple of the tile or block size
        ([2048] * 8, 32, 32, 16, None),  # the benchmark shape
        ([70] * 64, 8, 8, 16, None),  # many CTAs, one split
        ([40, 9], 48, 4, 16, None),  # GQA group 12 > 8: query heads split over two CTAs
        ([300, 2], 6, 2, 16, None),  # GQA group 3 (padded to 4)
    ],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_decode_edge_cases(
    lens: list[int], hq: int, hkv: int, block_size: int, max_blocks: int | None, dtype: torch.dtype
) -> None:
    case = _make_case(
        lens, hq, hkv, 128, block_size, dtype, seed=len(lens) * 7 + hq + block_size, max_blocks=max_blocks
    )
    _check(case, _run_kernel(case), _reference(case), f"lens={lens[:4]} H={hq}/{hkv} bs={block_size} {dtype}")


def test_decode_strided_q_and_out() -> None:
    """q and out may be views with a contiguous last dim (e.g. a slice of a fused qkv buffer)."""
    case = _make_case([97, 1025, 0], 32, 8, 128, 16, torch.bfloat16, seed=5)
    wide = torch.randn(3, 48, 128, device="cuda", dtype=torch.bfloat16)
    wide[:, :32] = case["q"]
    case_view = dict(case, q=wide[:, :32])
    out_buf = torch.full((3, 40, 128), float("nan"), device="cuda", dtype=torch.bfloat16)
    out = out_buf[:, 4:36]
    _epd_C.paged_attention_decode(
        out, case_view["q"], case["arena"], LAYER, case["seq_lens"], case["tables"], case["scale"]
    )
    _check(case, out, _reference(case), "strided q/out")
    assert torch.isnan(out_buf[:, :4]).all() and torch.isnan(out_buf[:, 36:]).all(), "wrote outside the out view"


def test_decode_cuda_graph_replay() -> None:
    """Capture once, then change seq_lens / block_tables / q contents in place and replay."""
    batch, hq, hkv, d, block_size, max_blocks = 8, 32, 8, 128, 16, 160
    dtype = torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(0)
    num_blocks = batch * max_blocks
    arena = torch.randn(num_blocks, NUM_LAYERS, 2, block_size, hkv, d, device="cuda", generator=g).to(dtype)
    q = torch.randn(batch, hq, d, device="cuda", generator=g).to(dtype)
    seq_lens = torch.ones(batch, dtype=torch.int32, device="cuda")
    tables = torch.arange(num_blocks, dtype=torch.int32, device="cuda").view(batch, max_blocks).contiguous()
    out = torch.empty_like(q)
    scale = d**-0.5

    def step() -> None:
        _epd_C.paged_attention_decode(out, q, arena, LAYER, seq_lens, tables, scale)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    for trial in range(4):
        gen = torch.Generator().manual_seed(trial)
        lens = torch.randint(0, max_blocks * block_size + 1, (batch,), generator=gen)
        lens[trial % batch] = 0
        lens[(trial + 1) % batch] = max_blocks * block_size
        lens[(trial + 2) % batch] = 1
        seq_lens.copy_(lens.to(torch.int32))
        tables.copy_(torch.randperm(num_blocks, generator=gen).to(torch.int32).view(batch, max_blocks))
        q.copy_(torch.randn(batch, hq, d, generator=gen).to(dtype))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        case = dict(q=q, arena=arena, seq_lens=seq_lens, tables=tables, scale=scale)
        _check(case, out, _reference(case), f"graph replay {trial}: lens {lens.tolist()}")


def test_decode_rejects_bad_dtypes() -> None:
    # Only checks whose messages hold no integers: on the device image, formatting an int64 into a
    # TORCH_CHECK message segfaulted inside the extension's std::ostream (a libstdc++ mismatch).
    case = _make_case([10], 32, 8, 128, 16, torch.bfloat16, seed=1)
    out = torch.empty_like(case["q"])
    with pytest.raises(RuntimeError, match="seq_lens"):
        _epd_C.paged_attention_decode(
            out, case["q"], case["arena"], LAYER, case["seq_lens"].long(), case["tables"], 1.0
        )
    with pytest.raises(RuntimeError, match="kv_arena"):
        _epd_C.paged_attention_decode(
            out, case["q"], case["arena"].half(), LAYER, case["seq_lens"], case["tables"], 1.0
        )
