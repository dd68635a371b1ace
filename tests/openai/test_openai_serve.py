"""`trillm serve` starts the OpenAI API beside tritonserver, ready with it, and stops it on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from trillm.launcher import free_port

pytestmark = pytest.mark.server

TRILLM = Path(sys.executable).parent / "trillm"


def children(pid: int) -> list[int]:
    out = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(proc.name))
        except (OSError, ValueError, IndexError):
            continue
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_serve_runs_the_openai_api_and_stops_it(demo_model_dir, tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    serve = subprocess.Popen(
        [str(TRILLM), "serve", "--checkpoint", str(demo_model_dir), "--work-dir", str(tmp_path / "work"),
         "--http-port", str(free_port()), "--grpc-port", str(free_port()), "--metrics-port", str(free_port()),
         "--openai-port", str(port), "--max-model-len", "512", "--version-policy", "specific:1"],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 600
        while "trillm: ready" not in log.read_text():
            assert serve.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        # The API is healthy before `trillm serve` says it is ready.
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=120) as c:
            assert [m.id for m in c.models.list().data] == ["ensemble", "ensemble:1"]
            chunks = list(c.chat.completions.create(model="ensemble", messages=[{"role": "user", "content": "Hi"}],
                                                    max_tokens=4, stream=True))
            assert chunks[-1].choices[0].finish_reason == "length"
        api = [pid for pid in children(serve.pid) if b"trillm.openai" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(api) == 1
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=120) == 0, log.read_text()[-3000:]
        assert not alive(api[0])
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()
