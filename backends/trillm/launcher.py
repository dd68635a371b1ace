"""Find a tritonserver, assemble its Python backend, start it and wait for it.

Two places a tritonserver comes from:
- ``tritonserver`` on PATH (NVIDIA's container images), with its backends in
  /opt/tritonserver/backends;
- the ``nvidia-pytriton`` wheel, which ships the 2.51 binary, its shared
  libraries and the Python backend with a stub per Python version.
``TRITONSERVER`` in the environment overrides both.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


class LaunchError(RuntimeError):
    pass


@dataclass
class TritonInstall:
    binary: Path
    backend_dir: Path  # folder that holds python/ (libtriton_python.so, utils, stub)
    lib_dirs: list[Path] = field(default_factory=list)


def _pytriton_install() -> TritonInstall | None:
    site = Path(sysconfig.get_paths()["purelib"])
    root = site / "pytriton" / "tritonserver"
    binary = root / "bin" / "tritonserver"
    if not binary.exists():
        return None
    return TritonInstall(binary=binary, backend_dir=root / "backends", lib_dirs=[site / "nvidia_pytriton.libs"])


def find_tritonserver() -> TritonInstall:
    override = os.environ.get("TRITONSERVER")
    if override:
        binary = Path(override)
        return TritonInstall(binary=binary, backend_dir=binary.parent.parent / "backends")
    on_path = shutil.which("tritonserver")
    if on_path:
        binary = Path(on_path).resolve()
        return TritonInstall(binary=binary, backend_dir=binary.parent.parent / "backends")
    found = _pytriton_install()
    if found:
        return found
    raise LaunchError(
        "no tritonserver found: install the wheel that ships one "
        "(pip install 'nvidia-pytriton==0.7.0', included in `make install`), "
        "run inside NVIDIA's tritonserver image, or set TRITONSERVER=/path/to/tritonserver"
    )


def assemble_backend_dir(install: TritonInstall, work: Path) -> Path:
    """A backend directory whose python backend runs models in *this* Python.

    The wheel keeps one stub per Python version apart from the backend; the
    server wants them side by side in ``<dir>/python/``.
    """
    stubs = install.binary.parent.parent / "python_backend_stubs"
    if not stubs.is_dir():
        return install.backend_dir  # a container install is already complete
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = stubs / version / "triton_python_backend_stub"
    if not stub.exists():
        raise LaunchError(f"the tritonserver wheel has no Python backend stub for Python {version}")
    out = work / "backends" / "python"
    out.mkdir(parents=True, exist_ok=True)
    for source in (
        install.backend_dir / "python" / "libtriton_python.so",
        install.backend_dir / "python" / "triton_python_backend_utils.py",
        stub,
    ):
        target = out / source.name
        if not target.exists() or target.stat().st_size != source.stat().st_size:
            shutil.copy2(source, target)
    (out / stub.name).chmod(0o755)
    return out.parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class ServerOptions:
    model_repository: Path
    work_dir: Path
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    log_file: Path | None = None
    # How long shutdown waits for in-flight requests and connections.
    exit_timeout: int = 30
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


class TritonServer:
    """A tritonserver process; a context manager that always shuts it down."""

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.process: subprocess.Popen | None = None
        self.log_path = options.log_file or (options.work_dir / "tritonserver.log")

    @property
    def http_url(self) -> str:
        return f"{self.options.host}:{self.options.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.options.host}:{self.options.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.options.host}:{self.options.metrics_port}/metrics"

    def command(self, install: TritonInstall, backend_dir: Path) -> list[str]:
        o = self.options
        return [
            str(install.binary),
            f"--model-repository={o.model_repository}",
            f"--backend-directory={backend_dir}",
            f"--http-address={o.host}",
            f"--grpc-address={o.host}",
            f"--metrics-address={o.host}",
            f"--http-port={o.http_port}",
            f"--grpc-port={o.grpc_port}",
            f"--metrics-port={o.metrics_port}",
            "--allow-metrics=true",
            "--exit-on-error=true",
            "--log-info=true",
            f"--exit-timeout-secs={o.exit_timeout}",
            *o.extra_args,
        ]

    def start(self) -> "TritonServer":
        install = find_tritonserver()
        self.options.work_dir.mkdir(parents=True, exist_ok=True)
        backend_dir = assemble_backend_dir(install, self.options.work_dir)
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            [str(p) for p in install.lib_dirs] + [env.get("LD_LIBRARY_PATH", "")]
        ).strip(os.pathsep)
        # The Python stub runs models in the first python3 on PATH: make it ours.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.update(self.options.env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            self.command(install, backend_dir),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # our Ctrl-C handler, not the terminal's, stops it
        )
        log.close()
        return self

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise LaunchError(
                    f"tritonserver exited with code {self.process.returncode} during start-up; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )
            if self.is_ready():
                return
            time.sleep(0.5)
        raise LaunchError(
            f"tritonserver not ready after {timeout:.0f}s; last lines of {self.log_path}:\n{self.log_tail()}"
        )

    def stop(self, grace: float = 30.0) -> None:
        """Terminate, then kill if it has not exited after ``grace`` seconds."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
