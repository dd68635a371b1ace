"""``trillm build-engine`` (trillm.trtllm.build) against the fake tensorrt_llm."""

from __future__ import annotations

import hashlib
import json
import sys
from datetime import datetime
from pathlib import Path

import pytest
from trtllm_helpers import Collector, host_params

from trillm.engine.types import FinishReason, GenerationRequest, SamplingParams
from trillm.trtllm import create_trtllm_engine
from trillm.trtllm.build import main

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    path = tmp_path / "ckpt"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 100,
                                                 "max_position_embeddings": 2048}))
    return path


@pytest.fixture
def repository(tmp_path) -> Path:
    """A model repository whose tensorrt_llm model has version 1."""
    model = tmp_path / "repo" / "tensorrt_llm"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text('name: "tensorrt_llm"\n')
    (model / "1" / "model.py").write_text((ROOT / "model_repository/tensorrt_llm/1/model.py").read_text())
    return model.parent


def the_llm(fake_trtllm):
    (instance,) = fake_trtllm.LLM.instances
    return instance


def test_builds_with_the_build_config_and_writes_the_manifest(fake_trtllm, checkpoint, tmp_path):
    out = tmp_path / "engine"
    assert main(["--checkpoint", str(checkpoint), "--out", str(out), "--max-batch-size", "8",
                 "--dtype", "float16"]) == 0
    llm = the_llm(fake_trtllm)
    assert llm.model == checkpoint
    assert llm.kwargs["build_config"] == fake_trtllm.BuildConfig(
        max_batch_size=8, max_input_len=2047, max_seq_len=2048, max_num_tokens=8192)
    assert llm.kwargs["dtype"] == "float16"
    assert llm.kwargs["skip_tokenizer_init"] is True
    assert "quant_config" not in llm.kwargs
    assert llm.saved_to == out and llm.shut_down
    manifest = json.loads((out / "trillm-engine.json").read_text())
    assert manifest["source_checkpoint"] == str(checkpoint.resolve())
    assert manifest["source_config_sha256"] == hashlib.sha256((checkpoint / "config.json").read_bytes()).hexdigest()
    assert manifest["build_config"] == {"max_batch_size": 8, "max_input_len": 2047, "max_seq_len": 2048,
                                        "max_num_tokens": 8192, "dtype": "float16", "quantization": "none"}
    assert manifest["tensorrt_llm_version"] == fake_trtllm.__version__
    assert datetime.fromisoformat(manifest["built_at"]).tzinfo is not None


def test_explicit_lengths_are_used(fake_trtllm, checkpoint, tmp_path):
    assert main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "e"), "--max-seq-len", "512",
                 "--max-input-len", "300", "--max-num-tokens", "1024"]) == 0
    build = the_llm(fake_trtllm).kwargs["build_config"]
    assert (build.max_seq_len, build.max_input_len, build.max_num_tokens) == (512, 300, 1024)


@pytest.mark.parametrize("name,algo", [("fp8", "FP8"), ("int4_awq", "W4A16_AWQ")])
def test_quantisation(fake_trtllm, checkpoint, tmp_path, name, algo):
    assert main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "e"), "--quantization", name,
                 "--calib-dataset", "/data/calib"]) == 0
    kwargs = the_llm(fake_trtllm).kwargs
    assert kwargs["quant_config"] == fake_trtllm.QuantConfig(quant_algo=fake_trtllm.QuantAlgo[algo])
    assert kwargs["calib_config"] == fake_trtllm.CalibConfig(calib_dataset="/data/calib")
    assert "skip_tokenizer_init" not in kwargs  # calibration tokenises its dataset


def test_a_new_model_version_points_at_the_engine_and_serves_it(fake_trtllm, checkpoint, repository, tmp_path):
    out = tmp_path / "engine"
    assert main(["--checkpoint", str(checkpoint), "--out", str(out), "--max-seq-len", "64",
                 "--model-repository", str(repository), "--version", "2"]) == 0
    version = repository / "tensorrt_llm" / "2"
    assert json.loads((version / "engine.json").read_text()) == {"engine_dir": str(out.resolve())}
    assert (version / "model.py").read_text() == (repository / "tensorrt_llm/1/model.py").read_text()

    engine = create_trtllm_engine(host_params(""), version_dir=version)
    try:
        assert engine.max_model_len == 64 and engine.vocab_size == 100
        collector = Collector()
        engine.submit(GenerationRequest("r", [5], SamplingParams(max_tokens=3)), collector)
        assert collector.wait().finish_reason is FinishReason.LENGTH
        assert collector.tokens == [6, 7, 8]
    finally:
        engine.shutdown()


def test_an_existing_version_is_refused_before_building(fake_trtllm, checkpoint, repository, tmp_path, capsys):
    code = main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "e"),
                 "--model-repository", str(repository), "--version", "1"])
    assert code == 2
    assert "already exists" in capsys.readouterr().err
    assert fake_trtllm.LLM.instances == []


@pytest.mark.parametrize("args,message", [
    (["--max-seq-len", "100", "--max-input-len", "200"], "exceeds --max-seq-len"),
    (["--max-input-len", "4000", "--max-seq-len", "4096", "--max-num-tokens", "1000"], "must be >= --max-input-len"),
    (["--version", "2"], "go together"),
    (["--calib-dataset", "/data"], "only applies"),
    (["--max-batch-size", "0"], "must be > 0"),
])
def test_bad_options_fail_before_building(fake_trtllm, checkpoint, tmp_path, capsys, args, message):
    assert main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "e"), *args]) == 2
    assert message in capsys.readouterr().err
    assert fake_trtllm.LLM.instances == []


def test_a_non_empty_out_dir_needs_force(fake_trtllm, checkpoint, tmp_path, capsys):
    out = tmp_path / "e"
    out.mkdir()
    (out / "stale.engine").write_text("old")
    assert main(["--checkpoint", str(checkpoint), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["--checkpoint", str(checkpoint), "--out", str(out), "--force"]) == 0
    assert not (out / "stale.engine").exists() and (out / "trillm-engine.json").exists()


def test_not_a_checkpoint(fake_trtllm, tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "e")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_missing_tensorrt_llm_names_what_to_install(monkeypatch, checkpoint, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)
    assert main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert 'pip install "tensorrt_llm>=1.0,<1.3"' in err and "nvcr.io/nvidia/tritonserver" in err


def test_a_version_outside_the_supported_range_is_refused_before_building(monkeypatch, checkpoint, tmp_path, capsys):
    import fake_tensorrt_llm

    fake = fake_tensorrt_llm.install(monkeypatch, version="1.3.0")
    assert main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "e")]) == 2
    assert "tensorrt_llm 1.3.0 is installed, but trillm supports tensorrt_llm>=1.0,<1.3" in capsys.readouterr().err
    assert fake.LLM.instances == []
