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
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trillm_client.admin import AdminKey


class LaunchError(RuntimeError):
    pass


MODEL_CONTROL_MODES = ("none", "explicit")
# The endpoints the admin key guards: model control (index, load, unload) and
# the others that change the running server (log and trace settings, which
# name files it writes; shared-memory registration). Health, metadata, model
# config, statistics and inference stay open.
RESTRICTED_APIS = ("model-repository", "logging", "trace", "shared-memory")
ADMIN_HEADER = "admin-key"  # trillm_client.admin sends it (Triton prefixes the gRPC metadata key)
REDACTED = "<admin key>"


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
    # "none": every model loads at start and stays; "explicit": the same at
    # start, then the load/unload API (which needs admin_key) changes it.
    model_control: str = "none"
    # Guards RESTRICTED_APIS when set; required by explicit model control.
    admin_key: AdminKey | None = None
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        if self.model_control not in MODEL_CONTROL_MODES:
            raise LaunchError(f"model control must be one of {MODEL_CONTROL_MODES}, got {self.model_control!r}")
        if self.model_control == "explicit" and self.admin_key is None:
            raise LaunchError(
                "explicit model control needs an admin key, so that only its holder can load and unload "
                "models: set TRILLM_ADMIN_KEY or TRILLM_ADMIN_KEY_FILE (docs/versions.md)"
            )


class TritonServer:
    """A tritonserver process; a context manager that always shuts it down."""

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.process: subprocess.Popen | None = None
        self.log_path = options.log_file or (options.work_dir / "tritonserver.log")
        self._command_line = ""
        self._backend_dir: Path | None = None

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
        """tritonserver's argv. It holds the admin key: show it only through :meth:`redacted`."""
        o = self.options
        control = []
        if o.model_control == "explicit":
            control += ["--model-control-mode=explicit", "--load-model=*"]
        if o.admin_key is not None:
            # tritonserver takes the key only on its command line (no file or env option).
            guard = f"{','.join(RESTRICTED_APIS)}:{ADMIN_HEADER}={o.admin_key.reveal()}"
            control += [f"--http-restricted-api={guard}", f"--grpc-restricted-protocol={guard}"]
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
            *control,
            *o.extra_args,
        ]

    def redacted(self, command: list[str]) -> str:
        """``command`` as a shell line, the admin key replaced."""
        key = self.options.admin_key
        return shlex.join(arg if key is None else arg.replace(key.reveal(), REDACTED) for arg in command)

    def start(self) -> "TritonServer":
        self.options.validate()
        install = find_tritonserver()
        self.options.work_dir.mkdir(parents=True, exist_ok=True)
        backend_dir = assemble_backend_dir(install, self.options.work_dir)
        self._backend_dir = backend_dir
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            [str(p) for p in install.lib_dirs] + [env.get("LD_LIBRARY_PATH", "")]
        ).strip(os.pathsep)
        # The Python stub runs models in the first python3 on PATH: make it ours.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        # The server has the key on its command line; its models need it nowhere.
        for name in ("TRILLM_ADMIN_KEY", "TRILLM_ADMIN_KEY_FILE"):
            env.pop(name, None)
        env.update(self.options.env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        command = self.command(install, backend_dir)
        self._command_line = self.redacted(command)
        self.process = subprocess.Popen(
            command,
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
                    f"tritonserver exited with code {self.process.returncode} during start-up "
                    f"({self._command_line}); last lines of {self.log_path}:\n{self.log_tail()}"
                )
            if self.is_ready():
                return
            time.sleep(0.5)
        raise LaunchError(
            f"tritonserver not ready after {timeout:.0f}s; last lines of {self.log_path}:\n{self.log_tail()}"
        )

    def stop(self, grace: float = 30.0) -> None:
        """Terminate, then kill if it has not exited after ``grace`` seconds; then its stray stubs."""
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=grace)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self._kill_stray_stubs()

    def _kill_stray_stubs(self) -> None:
        """Kills the Python-backend stubs this server started that outlived it.

        A stub still finishing a model's finalize when tritonserver exits waits
        for it forever. Ours are the processes of the server's process group
        running a stub of our backend directory.
        """
        if self._backend_dir is None:
            return
        stub = str(self._backend_dir)
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                group = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[2])
                command = (proc / "cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
            except (OSError, ValueError, IndexError):
                continue
            if group == self.process.pid and command.startswith(stub):
                try:
                    os.kill(int(proc.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextmanager
def running(options: ServerOptions, ready_timeout: float = 300.0) -> Iterator[TritonServer]:
    """A started tritonserver, ready (or LaunchError), stopped however the block ends."""
    server = TritonServer(options)
    server.start()
    try:
        server.wait_ready(ready_timeout)
        yield server
    finally:
        server.stop()
