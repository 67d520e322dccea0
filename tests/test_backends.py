"""Both backends expose the same ops with the same signatures (checked from source: no GPU needed)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import torch

import epd_kernels.reference as reference
from epd_kernels import get_backend

ROOT = Path(__file__).resolve().parents[1]


def _public_functions(path: Path) -> dict[str, list[str]]:
    tree = ast.parse(path.read_text())
    return {n.name: [a.arg for a in n.args.args] for n in tree.body
            if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")}


def test_cuda_ops_mirror_reference() -> None:
    cuda_ops = ast.parse((ROOT / "epd_kernels" / "cuda_ops.py").read_text())
    exported = {}
    for node in cuda_ops.body:
        if isinstance(node, ast.ImportFrom) and node.module.startswith("epd_kernels."):
            family = ROOT / Path(*node.module.split(".")) / "__init__.py"
            wrappers = _public_functions(family)
            for alias in node.names:
                assert alias.name in wrappers, f"{family} has no wrapper {alias.name}"
                exported[alias.name] = wrappers[alias.name]
    model_ops = {"rms_norm", "add_rms_norm", "layer_norm", "add_layer_norm", "silu_and_mul", "gelu", "quick_gelu",
                 "embed_tokens", "rope_and_cache_write", "paged_attention_prefill", "paged_attention_decode",
                 "attention_dense", "sample", "apply_penalties", "record_tokens", "linear", "gate_up_silu"}
    assert set(exported) == model_ops
    for name, args in exported.items():
        ref_args = list(inspect.signature(getattr(reference, name)).parameters)
        assert args == ref_args, f"{name}: cuda {args} vs reference {ref_args}"


def test_auto_picks_torch_on_cpu_and_for_fp32() -> None:
    assert get_backend("auto", torch.device("cpu"), torch.bfloat16) is reference
    assert get_backend("auto", torch.device("cpu"), torch.float32) is reference
