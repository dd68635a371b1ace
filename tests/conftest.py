"""Shared fixtures: the demo model's two versions (built once per session) and
one real tritonserver per test session on free loopback ports."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import fake_pb_utils  # noqa: E402

# Model modules import triton_python_backend_utils at import time; outside a
# tritonserver that is our fake (see fake_pb_utils.py).
if "triton_python_backend_utils" not in sys.modules:
    fake_pb_utils.install()


DEMO_DIR = Path(os.environ.get("TRILLM_DEMO_DIR", ROOT / "build" / "demo-model"))


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    from trillm.demo_model import build_demo_model

    return Path(build_demo_model(DEMO_DIR))


@pytest.fixture(scope="session")
def demo_model_v2_dir() -> Path:
    """Version 2 of the demo model (same tokenizer, other weights), beside version 1."""
    from trillm.demo_model import build_demo_model

    return Path(build_demo_model(DEMO_DIR.with_name(DEMO_DIR.name + "-v2"), version=2))


@pytest.fixture(scope="session")
def served_version() -> str:
    """The version unpinned requests get from the session server (the default policy's)."""
    from trillm.versions import VersionPolicy, pipeline_versions

    return str(VersionPolicy().default(pipeline_versions(ROOT / "model_repository")))


@pytest.fixture(scope="session")
def triton_server(demo_model_dir, demo_model_v2_dir, tmp_path_factory):
    """A real tritonserver serving model_repository/ with the demo model, as `make serve` does."""
    from trillm.launcher import free_port, running
    from trillm.serve import ServeConfig, prepare

    work = tmp_path_factory.mktemp("triton")
    config = ServeConfig(
        checkpoint_dir=demo_model_dir,
        version_checkpoints={2: demo_model_v2_dir},
        model_repository=ROOT / "model_repository",
        work_dir=work,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        max_model_len=1024,
        max_input_len=512,
        # The exactness checks (every transport and a request alone or under traffic give the same
        # text) rest on batch invariance, which the engine guarantees on its float32 path; dtype auto
        # picks bf16 on AMX CPUs and says it is then not batch-invariant (tests/engine covers auto).
        dtype="float32",
        # scripts/gpu_check.sh runs the same server tests on a TensorRT-LLM engine.
        engine_kind=os.environ.get("TRILLM_TEST_ENGINE", "torch"),
        engine_dir=os.environ.get("TRILLM_TEST_ENGINE_DIR", ""),
    )
    options = prepare(config)
    options.exit_timeout = 5
    with running(options, ready_timeout=600) as server:
        yield server
