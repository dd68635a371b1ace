"""The OpenAI server as a child process of ``trillm serve``.

It runs ``python -m trillm.openai`` (its own process, so its event loop and
the launcher's do not share a GIL), dies with its parent (PR_SET_PDEATHSIG),
is ready when its ``/health`` answers 200, and stops with SIGTERM (it drains
its requests in flight), then SIGKILL after the drain timeout and a grace.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from trillm.launcher import LaunchError
from trillm.openai.options import DEFAULT_PORT, DRAIN_TIMEOUT_S, MODELS

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """preexec_fn: the kernel sends us SIGTERM when the process that started us exits."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class OpenAIOptions:
    triton_url: str  # gRPC host:port
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    model: str = MODELS[0]
    drain_timeout: float = DRAIN_TIMEOUT_S
    log_file: Path | None = None
    env: dict[str, str] = field(default_factory=dict)  # on top of ours (e.g. TRILLM_API_KEY)


class OpenAIProcess:
    """``start()``, ``wait_ready()``, ``stop()``; a context manager that always stops it."""

    def __init__(self, options: OpenAIOptions) -> None:
        self.options = options
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.options.host}:{self.options.port}"

    def command(self) -> list[str]:
        o = self.options
        return [sys.executable, "-m", "trillm.openai", "--triton", o.triton_url, "--host", o.host,
                "--port", str(o.port), "--model", o.model, "--drain-timeout", str(o.drain_timeout)]

    def start(self) -> OpenAIProcess:
        log = open(self.options.log_file, "ab") if self.options.log_file else subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, **self.options.env},
                                            preexec_fn=_die_with_parent, start_new_session=True)
        finally:
            if log is not subprocess.DEVNULL:
                log.close()
        return self

    def is_healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until ``/health`` is 200 (which needs the pipeline ready too); LaunchError if it exits or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise LaunchError(f"the OpenAI server exited with code {self.process.returncode} during start-up"
                                   + (f" (log: {self.options.log_file})" if self.options.log_file else ""))
            if self.is_healthy():
                return
            time.sleep(0.2)
        raise LaunchError(f"the OpenAI server at {self.url} was not healthy after {timeout:.0f}s")

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM (drain), then SIGKILL after drain_timeout + grace; returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            try:
                os.kill(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=self.options.drain_timeout + grace)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode

    def __enter__(self) -> OpenAIProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
