"""Fixtures for the TensorRT-LLM contract tests: the fake ``tensorrt_llm`` and a fake engine dir."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fake_tensorrt_llm  # noqa: E402
from trtllm_helpers import ENGINE_MAX_SEQ_LEN, VOCAB_SIZE  # noqa: E402


@pytest.fixture
def fake_trtllm(monkeypatch):
    """The fake ``tensorrt_llm`` in sys.modules, with no LLM created yet."""
    return fake_tensorrt_llm.install(monkeypatch)


@pytest.fixture
def engine_dir(tmp_path) -> Path:
    """A directory shaped like a saved TensorRT-LLM engine (config.json only)."""
    path = tmp_path / "engine"
    path.mkdir()
    config = {
        "pretrained_config": {"vocab_size": VOCAB_SIZE},
        "build_config": {"max_batch_size": 8, "max_input_len": 200, "max_seq_len": ENGINE_MAX_SEQ_LEN,
                         "max_num_tokens": 512},
    }
    (path / "config.json").write_text(json.dumps(config))
    return path
