"""Find a tritonserver, assemble its Python backend, start it and wait for it.

Two places a tritonserver comes from:
- ``tritonserver`` on PATH (NVIDIA's container images), with its backends in
  /opt/tritonserver/backends;
- the ``nvidia-pytriton`` wheel, which ships the 2.51 binary, its shared
  libraries and the Python backend with a stub per Python version.
``TRITONSERVER`` in the environment overrides both.
"""

from __future__ import annotations

import ctypes
import math
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

from trillm.triton.lifecycle import DRAIN_FILE_ENV, WATCH_PARENT_ENV, drained_marker, write_drain_file

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
    # Graceful stop (SIGTERM): readiness false and new requests refused at once;
    # requests in flight get this long, then end with "server shutting down".
    drain_timeout: float = 20.0
    # tritonserver's own wait for in-flight requests on exit; 0 = drain_timeout + 3
    # (it must outlast the drain, or tritonserver cuts the streams first).
    exit_timeout: int = 0
    # "none": every model loads at start and stays; "explicit": the same at
    # start, then the load/unload API (which needs admin_key) changes it.
    model_control: str = "none"
    # Guards RESTRICTED_APIS when set; required by explicit model control.
    admin_key: AdminKey | None = None
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def drain_file(self) -> Path:
        return self.work_dir / "drain.json"

    @property
    def resolved_exit_timeout(self) -> int:
        return self.exit_timeout or int(math.ceil(self.drain_timeout)) + 3

    def validate(self) -> None:
        if not (isinstance(self.drain_timeout, (int, float)) and 0 <= self.drain_timeout <= 3600):
            raise LaunchError(f"drain timeout must be in [0, 3600] seconds, got {self.drain_timeout!r}")
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
            f"--exit-timeout-secs={o.resolved_exit_timeout}",
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
        # The models watch for their server's death and for the launcher's drain request (lifecycle.py).
        self.options.drain_file.unlink(missing_ok=True)
        env[DRAIN_FILE_ENV] = str(self.options.drain_file)
        env[WATCH_PARENT_ENV] = "1"
        # OpenMP's wait policy is left to libgomp (spin a while, then sleep) or the user. Passive
        # waiting (OMP_WAIT_POLICY=PASSIVE, this launcher's default until the engine released its
        # loading thread's OpenMP team) wakes the engine's workers from sleep at every parallel
        # region; measured with `make bench-peers` (SmolLM2, 2-vCPU Xeon, GOMP_SPINCOUNT 0 / 10000 /
        # libgomp's 300000): 31 / 42 / 44 tok/s at 1 stream, 142 / 177 / 210 at 8, 293 / 310 / 326 at 32.
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
            preexec_fn=_die_with_parent,  # SIGKILL of the launcher must not leave a server behind
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

    def wait_ready(self, timeout: float = 300.0, abort=None) -> None:
        """Until /v2/health/ready answers 200; ``abort`` (an Event) ends the wait early."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not (abort is not None and abort.is_set()):
            if self.process is not None and self.process.poll() is not None:
                raise LaunchError(
                    f"tritonserver exited with code {self.process.returncode} during start-up "
                    f"({self._command_line}); last lines of {self.log_path}:\n{self.log_tail()}"
                )
            if self.is_ready():
                return
            time.sleep(0.5)
        if abort is not None and abort.is_set():
            return
        raise LaunchError(
            f"tritonserver not ready after {timeout:.0f}s; last lines of {self.log_path}:\n{self.log_tail()}"
        )

    def stop(self, drain_timeout: float | None = None) -> None:
        """Graceful stop, as Kubernetes expects it.

        The engine hosts are told to drain (lifecycle.py: new requests refused
        at once, those still running after ``drain_timeout`` end with "server
        shutting down"); when every host reports none left (or the timeout
        has passed and a second more), tritonserver gets SIGTERM and exits with
        nothing in flight. Killed if it has not exited 5 s after the drain
        timeout; then its stray stubs.
        """
        if self.process is None:
            return
        drain = self.options.drain_timeout if drain_timeout is None else drain_timeout
        if self.process.poll() is None:
            started = time.monotonic()
            hosts = [pid for pid, (model, _) in self.stub_processes().items() if model == "tensorrt_llm"]
            markers = [drained_marker(self.options.drain_file, pid) for pid in hosts]
            for marker in markers:
                marker.unlink(missing_ok=True)
            write_drain_file(self.options.drain_file, drain)
            while (time.monotonic() - started < drain + 1 and self.process.poll() is None
                   and not all(m.exists() or not Path(f"/proc/{pid}").exists() for m, pid in zip(markers, hosts))):
                time.sleep(0.05)
            try:
                os.kill(self.process.pid, signal.SIGTERM)  # not the group: the stubs are tritonserver's to stop
                # Nothing is left to finish. tritonserver 2.51 still counts an ensemble request whose
                # step ended with an error as in flight and would wait its whole exit timeout for it.
                self.process.wait(timeout=POST_DRAIN_EXIT_S)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                self.kill()
        self._kill_stray_stubs()

    def kill(self) -> None:
        """SIGKILL tritonserver and everything in its process group (its stubs); no drain."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)
        self._kill_stray_stubs()

    def stub_processes(self) -> dict[int, tuple[str, str]]:
        """This server's Python-backend stubs: pid -> (model, version), from their command lines
        (the stub's first argument is the model's ``<repository>/<model>/<version>/model.py``)."""
        stubs: dict[int, tuple[str, str]] = {}
        if self._backend_dir is None or self.process is None:
            return stubs
        for pid, argv in self._group_processes():
            if argv[0].startswith(str(self._backend_dir)) and len(argv) > 1:
                model_file = Path(argv[1])
                stubs[pid] = (model_file.parent.parent.name, model_file.parent.name)
        return stubs

    def model_ready(self, model: str, version: str) -> bool | None:
        """Whether tritonserver calls this model version ready; None when it did not answer."""
        url = f"http://{self.http_url}/v2/models/{model}/versions/{version}/ready"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200
        except urllib.error.HTTPError:
            return False
        except (urllib.error.URLError, OSError):
            return None

    def _group_processes(self) -> Iterator[tuple[int, list[str]]]:
        """(pid, argv) of the live processes in the server's process group."""
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                if int(stat[2]) != self.process.pid or stat[0] == "Z":
                    continue
                # Only our own group's command lines: reading one takes the target's memory-map
                # lock, which another process tearing down a large address space can hold.
                argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except (OSError, ValueError, IndexError):
                continue
            if argv[0]:
                yield int(proc.name), argv

    def _kill_stray_stubs(self) -> None:
        """Kills the Python-backend stubs this server started that outlived it.

        A stub still finishing a model's finalize when tritonserver exits waits
        for it forever. Ours are the processes of the server's process group
        running a stub of our backend directory.
        """
        for pid in self.stub_processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


PR_SET_PDEATHSIG = 1
POST_DRAIN_EXIT_S = 3.0  # how long tritonserver gets to exit once drained, before SIGKILL


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the launcher dies (Linux prctl; elsewhere a no-op).

    The signal fires when the *thread* that started the child exits, so start
    servers from a thread that lives as long as they should (serve() does, from
    the main thread).
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


class EngineWatchdog:
    """Finds a model stub that died while tritonserver still calls its model ready.

    tritonserver 2.51 does not restart a crashed Python-backend stub and keeps
    answering ready for it, while every request fails "Stub process ... is not
    healthy". A stub that exits because its model was unloaded is no crash:
    its model is no longer ready, or a new stub serves it (a reload). A stub
    gone is watched until one of those is seen, so a slow answer from
    tritonserver cannot make a crash pass unnoticed; it is a crash once its
    model is still ready, with no stub, on two checks in a row.
    """

    def __init__(self, server: TritonServer) -> None:
        self.server = server
        # Without explicit model control nothing unloads a model while the server runs, so a stub
        # gone is a crash at once (tritonserver may even be restarting it itself, answering 400s
        # meanwhile: restarting the server turns that into refused connections, UNAVAILABLE).
        self.unloads_possible = server.options.model_control == "explicit"
        self.known: dict[int, tuple[str, str]] = {}
        self.suspects: dict[int, tuple[tuple[str, str], int]] = {}  # pid -> (model, version), checks seen ready

    def reset(self) -> None:
        self.known = self.server.stub_processes()
        self.suspects = {}

    def crashed(self) -> str | None:
        """A description of a crashed stub, or None. Call it periodically."""
        current = self.server.stub_processes()
        for pid, model_version in self.known.items():
            if pid not in current:
                self.suspects[pid] = (model_version, 0)
        self.known = current
        if not self.unloads_possible:
            for pid, ((model, version), _) in self.suspects.items():
                return f"the stub of model {model!r} version {version} (pid {pid}) died"
        serving = set(current.values())
        for pid, (model_version, seen) in list(self.suspects.items()):  # explicit control: unload or crash?
            ready = None if model_version in serving else self.server.model_ready(*model_version)
            if model_version in serving or ready is False:
                del self.suspects[pid]  # reloaded, or unloaded
            elif ready:
                if seen + 1 >= 2:
                    model, version = model_version
                    return f"the stub of model {model!r} version {version} (pid {pid}) died"
                self.suspects[pid] = (model_version, seen + 1)
        return None


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
