"""Fixtures for the engine tests: checkpoints (the demo model, small random Llamas) and engines."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import engine_helpers

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def demo_checkpoint() -> Path:
    """The demo model: built through trillm.demo_model when importable, else an existing build."""
    path = Path(os.environ.get("TRILLM_DEMO_DIR", ROOT / "build" / "demo-model"))
    try:
        from trillm.demo_model import build_demo_model
    except ImportError:
        if (path / "config.json").is_file():
            return path
        pytest.skip(f"no demo model: trillm.demo_model is not importable and {path} does not exist")
    return Path(build_demo_model(path))


@pytest.fixture(scope="session")
def random_llama(tmp_path_factory) -> Path:
    """A random Llama shaped unlike the demo model: tied embeddings, MHA, head_dim != hidden/heads,
    llama3 rope scaling, attention and MLP biases."""
    return engine_helpers.make_random_llama(
        tmp_path_factory.mktemp("random-llama"),
        vocab_size=512, hidden_size=96, intermediate_size=200, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, head_dim=32, tie_word_embeddings=True,
        attention_bias=True, mlp_bias=True, rms_norm_eps=1e-5, max_position_embeddings=512,
        rope_theta=50000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    )


@pytest.fixture(scope="session")
def sharded_bf16_llama(tmp_path_factory) -> Path:
    """A random GQA Llama (6 heads, 2 KV heads) with linear rope scaling, saved in bfloat16 in several shards."""
    return engine_helpers.make_random_llama(
        tmp_path_factory.mktemp("sharded-llama"), dtype="bfloat16", max_shard_size="100KB",
        vocab_size=384, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False,
        max_position_embeddings=256, rope_scaling={"rope_type": "linear", "factor": 2.0},
    )


@pytest.fixture(scope="module")
def demo_engine(demo_checkpoint):
    """A demo-model engine with default scheduling, shared by a test module."""
    engine = engine_helpers.make_engine(demo_checkpoint, max_model_len=1024)
    yield engine
    engine.shutdown()
