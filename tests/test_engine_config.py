"""EngineConfig: every setting checked in one place, errors naming the field and the limit; the
same config reaches the runner, the engines, the input processor and the stage roles."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine import LLM
from engine.config import ConfigError, EngineConfig, ModelConfig


@pytest.mark.parametrize(("settings", "message"), [
    ({"block_size": 12}, "block_size = 12; use one of 8, 16, 32, 64, 128"),
    ({"multi_step": 0}, r"multi_step = 0; must be in \[1, 64\]"),
    ({"multi_step": 65}, r"multi_step = 65; must be in \[1, 64\]"),
    ({"max_num_seqs": 0}, "max_num_seqs = 0; must be >= 1"),
    ({"max_num_seqs": 2.5}, "max_num_seqs = 2.5; must be an integer"),
    ({"max_num_batched_tokens": True}, "max_num_batched_tokens = True; must be an integer"),
    ({"kv_cache_tokens": 0}, "kv_cache_tokens = 0; must be >= 1"),
    ({"max_model_len": -3}, "max_model_len = -3; must be >= 1"),
    ({"max_images_per_batch": -1}, "max_images_per_batch = -1; must be >= 0"),
    ({"gpu_memory_utilization": 0.0}, r"gpu_memory_utilization = 0.0; must be a number in \(0, 1\]"),
    ({"gpu_memory_utilization": 1.5}, r"gpu_memory_utilization = 1.5; must be a number in \(0, 1\]"),
    ({"gpu_memory_utilization": "0.5"}, r"gpu_memory_utilization = '0.5'; must be a number in \(0, 1\]"),
    ({"backend": "triton"}, "backend = 'triton'; use one of auto, torch, cuda"),
    ({"dtype": "float64"}, "dtype 'float64' is not supported"),
    ({"device": "gpu0"}, "device = 'gpu0' is not a device; use cpu, cuda or cuda:N"),
    ({"cuda_graphs": "yes"}, "cuda_graphs = 'yes'; must be True or False"),
    ({"torch_threads": -1}, "torch_threads = -1; must be >= 0"),
])
def test_each_setting_is_checked_with_a_message_naming_it(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        EngineConfig("some/model", **settings)


def test_for_model_resolves_auto_and_checks_the_context(tiny_llava: Path) -> None:
    cfg = ModelConfig.from_dir(tiny_llava)
    config = EngineConfig(str(tiny_llava), device="cpu").for_model(cfg)
    assert config.torch_dtype == cfg.checkpoint_dtype and config.dtype == str(cfg.checkpoint_dtype)[len("torch."):]
    assert config.max_model_len == cfg.text.max_position_embeddings
    assert config.num_kv_blocks() == -(-4 * config.max_model_len // config.block_size)  # CPU default
    assert config.num_mm_blocks(cfg) == 2 * config.max_images_per_batch
    assert EngineConfig("m", dtype=torch.bfloat16).dtype == "bfloat16"  # a torch dtype is accepted, stored by name
    with pytest.raises(ConfigError, match="max_model_len = 5000; the model's context is 1024 tokens"):
        EngineConfig(str(tiny_llava), max_model_len=5000).for_model(cfg)
    with pytest.raises(ConfigError, match="dtype is still 'auto'"):
        _ = EngineConfig("m").torch_dtype


def test_one_config_reaches_every_part(tiny_llava: Path) -> None:
    llm = LLM(tiny_llava, backend="torch", device="cpu", block_size=32, max_num_seqs=5, kv_cache_tokens=2048,
              max_images_per_batch=3, multi_step=2)
    config = llm.config
    assert llm.runner.config is config and llm.input_processor.config is config
    assert llm.runner.block_size == 32 and llm.runner.num_kv_blocks == 2048 // 32 == llm.input_processor.kv_blocks
    assert llm.runner.num_mm_blocks == 6 == llm.input_processor.mm_blocks
    assert llm.engine.multi_step == 2 and llm.engine.decode.max_num_seqs == 5
    assert llm.runner.decode_graphs.buffers.block_tables.shape[0] == 5
    again = LLM(replace(config, multi_step=1))  # a config value passes whole
    assert again.config == replace(config, multi_step=1)
    with pytest.raises(ConfigError, match="unknown setting 'max_batch'; the settings are EngineConfig's fields"):
        LLM(tiny_llava, max_batch=4)
