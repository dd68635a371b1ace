"""Shared fixtures: the demo model (built once per session) and one real
tritonserver per test session on free loopback ports."""

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


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    from trillm.demo_model import build_demo_model

    return Path(build_demo_model(Path(os.environ.get("TRILLM_DEMO_DIR", ROOT / "build" / "demo-model"))))


@pytest.fixture(scope="session")
def triton_server(demo_model_dir, tmp_path_factory):
    """A real tritonserver serving model_repository/ with the demo model."""
    from trillm.launcher import TritonServer, free_port
    from trillm.serve import ServeConfig, prepare

    work = tmp_path_factory.mktemp("triton")
    config = ServeConfig(
        checkpoint_dir=demo_model_dir,
        model_repository=ROOT / "model_repository",
        work_dir=work,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        max_model_len=1024,
        max_input_len=512,
        # scripts/gpu_check.sh runs the same server tests on a TensorRT-LLM engine.
        engine_kind=os.environ.get("TRILLM_TEST_ENGINE", "torch"),
        engine_dir=os.environ.get("TRILLM_TEST_ENGINE_DIR", ""),
    )
    options = prepare(config)
    options.exit_timeout = 5
    server = TritonServer(options)
    server.start()
    try:
        server.wait_ready(timeout=600)
        yield server
    finally:
        server.stop()
