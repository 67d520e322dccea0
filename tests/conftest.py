"""Shared fixtures: tiny checkpoints made locally once per session (no network)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.make_tiny_model import make_tiny_llama, make_tiny_llava, make_tiny_llava_next  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llava(tmp_path_factory.mktemp("models") / "tiny-llava")


@pytest.fixture(scope="session")
def tiny_llava_next(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llava_next(tmp_path_factory.mktemp("models") / "tiny-llava-next")


@pytest.fixture(scope="session")
def small_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small LLaVA whose vision and text heads are 64 wide (the cuda kernels and graphs apply,
    not the reference fallback), bf16. Skips without CUDA and the built extension."""
    import torch

    from epd_kernels import cuda_available

    if not cuda_available():
        pytest.skip("needs CUDA and epd_kernels._epd_C")
    return make_tiny_llava(tmp_path_factory.mktemp("models") / "small-llava", dtype=torch.bfloat16,
                           vision_sizes={"hidden_size": 128, "num_attention_heads": 2, "intermediate_size": 256},
                           text_sizes={"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 4,
                                       "intermediate_size": 512})


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def llava_llm(tiny_llava: Path):
    from engine import LLM

    return LLM(tiny_llava, backend="torch", device="cpu")


@pytest.fixture(scope="session")
def llama_llm(tiny_llama: Path):
    from engine import LLM

    return LLM(tiny_llama, backend="torch", device="cpu")
