"""``trillm serve``: render the model repository for a checkpoint and run tritonserver."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from trillm.launcher import EngineWatchdog, LaunchError, ServerOptions, TritonServer
from trillm.openai.process import OpenAIOptions, OpenAIProcess
from trillm.options import OPTIONS, RENDERED_MODELS, first_problem, option_fields, parameters_pbtxt, pbtxt_value
from trillm.templates import render_repository, repository_placeholders
from trillm.versions import (
    VERSION_PLACEHOLDER,
    VersionError,
    VersionPolicy,
    checkpoint_versions,
    pipeline_versions,
)

if TYPE_CHECKING:
    from trillm_client.admin import AdminKey

DEFAULT_MAX_MODEL_LEN_CAP = 4096


# ServeConfig's options: all but the two paths, which it declares itself (a checkpoint is resolved here).
SERVE_OPTIONS = tuple(option for option in OPTIONS if option.kind is not Path)


@dataclass
@option_fields(SERVE_OPTIONS)
class ServeConfig:
    """Everything that goes into the rendered config.pbtxt files (README "Configuration").

    Its own fields, then one per option of trillm.options but the paths.
    """

    checkpoint_dir: Path
    model_repository: Path = Path("model_repository")
    work_dir: Path = Path("build/serve")
    tokenizer_dir: Path | None = None  # None: the checkpoint's
    preprocessing_instances: int = 1
    postprocessing_instances: int = 1
    bls_instances: int = 1
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    # Which versions load (trillm.versions); the ensemble serves the default one.
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    # Checkpoint of a version whose parameters.json asks for one (default: checkpoint_dir).
    version_checkpoints: dict[int, Path] = field(default_factory=dict)
    # SIGTERM: readiness false and new requests refused at once, in-flight requests get this long.
    drain_timeout: float = 20.0
    model_control: str = "none"  # or "explicit" (launcher.ServerOptions)
    admin_key: AdminKey | None = None
    extra_args: list[str] = field(default_factory=list)
    # The OpenAI-compatible server (trillm.openai) beside tritonserver, on the same host.
    openai_enabled: bool = True
    openai_port: int = 9000

    def checkpoint_of(self, version: int) -> Path:
        return self.version_checkpoints.get(version, self.checkpoint_dir)

    def tokenizer_of(self, version: int) -> Path:
        if version in self.version_checkpoints:
            return self.version_checkpoints[version]
        return self.tokenizer_dir or self.checkpoint_dir

    def version_values(self) -> dict[str, object]:
        """The values of the version placeholders: policy, pinned ensemble version, per-version paths."""
        versions = pipeline_versions(self.model_repository)
        values: dict[str, object] = {
            "version_policy": self.version_policy.pbtxt(),
            "pipeline_version": self.version_policy.default(versions),
        }
        for name in repository_placeholders(self.model_repository):
            match = VERSION_PLACEHOLDER.match(name)
            if match:
                kind, version = match.group(1), int(match.group(2))
                of = {"checkpoint_dir": self.checkpoint_of, "tokenizer_dir": self.tokenizer_of}[kind]
                values[name] = of(version).resolve()
        taking = checkpoint_versions(self.model_repository)
        unused = sorted(set(self.version_checkpoints) - taking)
        if unused:
            raise VersionError(
                f"a checkpoint was given for version(s) {', '.join(map(str, unused))}, but no parameters.json of "
                f"those versions in {self.model_repository} takes one (versions with a checkpoint: "
                f"{', '.join(map(str, sorted(taking))) or 'none'})"
            )
        return values

    def resolved_max_model_len(self) -> int:
        if self.max_model_len:
            return self.max_model_len
        config = json.loads((self.checkpoint_dir / "config.json").read_text())
        return min(int(config.get("max_position_embeddings", 2048)), DEFAULT_MAX_MODEL_LEN_CAP)

    def option_values(self) -> dict[str, object]:
        """Every option's value as the models take it: paths resolved, max_model_len derived."""
        values: dict[str, object] = {option.name: getattr(self, option.name) for option in SERVE_OPTIONS}
        values.update(
            checkpoint_dir=self.checkpoint_dir.resolve(),
            tokenizer_dir=(self.tokenizer_dir or self.checkpoint_dir).resolve(),
            max_model_len=self.resolved_max_model_len(),
        )
        return {name: pbtxt_value(value) for name, value in values.items()}

    def template_values(self) -> dict[str, object]:
        values = self.option_values()
        return {
            **{option.name: values[option.name] for option in OPTIONS if option.placeholder},
            **{f"{model}_parameters": parameters_pbtxt(model, values) for model in RENDERED_MODELS},
            "preprocessing_instances": self.preprocessing_instances,
            "postprocessing_instances": self.postprocessing_instances,
            "bls_instances": self.bls_instances,
            **self.version_values(),
        }


def check_checkpoint(path: Path) -> None:
    missing = [name for name in ("config.json", "tokenizer.json") if not (path / name).exists()]
    if missing:
        raise LaunchError(
            f"{path} is not a Hugging Face checkpoint directory we can serve: missing {', '.join(missing)} "
            "(a Llama-style model saved with save_pretrained, including its fast tokenizer)"
        )


def prepare(config: ServeConfig) -> ServerOptions:
    """Render the repository into the work dir; return the server options."""
    broken = first_problem(config, SERVE_OPTIONS)
    if broken:
        name, problem = broken
        raise LaunchError(f"{name}: {problem}")
    for checkpoint in {config.checkpoint_dir, *config.version_checkpoints.values()}:
        check_checkpoint(checkpoint)
    rendered = config.work_dir / "model_repository"
    try:
        render_repository(config.model_repository, rendered, config.template_values())
    except VersionError as exc:
        raise LaunchError(str(exc)) from None
    return ServerOptions(
        model_repository=rendered.resolve(),
        work_dir=config.work_dir.resolve(),
        host=config.host,
        http_port=config.http_port,
        grpc_port=config.grpc_port,
        metrics_port=config.metrics_port,
        model_control=config.model_control,
        admin_key=config.admin_key,
        extra_args=list(config.extra_args),
        drain_timeout=config.drain_timeout,
    )


WATCH_PERIOD_S = 0.25  # how often the launcher checks tritonserver and its model stubs
MAX_RESTARTS = 5  # tritonserver restarts after faults within RESTART_WINDOW_S before giving up
RESTART_WINDOW_S = 600.0


def serve(config: ServeConfig, ready_timeout: float = 600.0) -> int:
    """Run until Ctrl-C / SIGTERM; returns the process exit code."""
    server = TritonServer(prepare(config))
    openai: OpenAIProcess | None = None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    try:
        print(f"trillm: starting tritonserver (log: {server.log_path})", flush=True)
        versions = pipeline_versions(config.model_repository)
        print(
            f"trillm: versions {', '.join(map(str, versions))} in the repository; policy {config.version_policy} "
            f"loads {', '.join(map(str, config.version_policy.served(versions)))}, unpinned requests get "
            f"{config.version_policy.default(versions)}; model control {config.model_control}"
            + (f", admin key from {config.admin_key.source}" if config.admin_key else ""),
            flush=True,
        )
        server.wait_ready(ready_timeout)
        # Which stubs are alive, before "ready" is printed: a stub dead before this is not seen.
        watchdog = EngineWatchdog(server)
        watchdog.reset()
        if config.openai_enabled:
            openai = OpenAIProcess(OpenAIOptions(server.grpc_url, config.host, config.openai_port,
                                                 log_file=config.work_dir / "openai.log",
                                                 drain_timeout=config.drain_timeout)).start()
            openai.wait_ready()
            print(f"trillm: OpenAI API {openai.url}/v1 (log: {openai.options.log_file})", flush=True)
        print(
            f"trillm: ready. HTTP http://{server.http_url}  gRPC {server.grpc_url}  metrics {server.metrics_url}\n"
            f"  try: curl -s -X POST http://{server.http_url}/v2/models/ensemble/generate "
            "-d '{\"text_input\": \"Hello\", \"max_tokens\": 32}'\n"
            "  Ctrl-C stops the server.",
            flush=True,
        )
        restarts: list[float] = []
        while not stop.wait(WATCH_PERIOD_S):
            fault = (f"tritonserver exited with {server.process.returncode}" if server.process.poll() is not None
                     else watchdog.crashed())
            if fault:
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < RESTART_WINDOW_S] + [now]
                if len(restarts) > MAX_RESTARTS:
                    print(f"trillm: {fault}; {MAX_RESTARTS} restarts within {RESTART_WINDOW_S:.0f}s already, "
                          f"giving up. Last lines of {server.log_path}:\n{server.log_tail()}", flush=True)
                    return 1
                print(f"trillm: {fault}; restarting tritonserver (not ready until it is back)", flush=True)
                server.kill()
                server.start()
                server.wait_ready(ready_timeout, abort=stop)
                watchdog.reset()
                print(f"trillm: tritonserver is back ({time.monotonic() - now:.1f}s after the fault)", flush=True)
                continue
            if openai is not None and openai.process.poll() is not None:
                print(f"trillm: the OpenAI server exited with {openai.process.returncode} "
                      f"(log: {openai.options.log_file})", flush=True)
                return 1
        return 0
    except LaunchError as exc:
        print(f"trillm: {exc}", flush=True)
        return 1
    finally:
        # Both drain at once, so the whole stop takes drain_timeout (+4 s at most), not the sum.
        stopping = []
        if openai is not None:
            print("trillm: stopping the OpenAI server (it lets requests in flight finish)", flush=True)
            stopping.append(threading.Thread(target=openai.stop, name="trillm-openai-stop"))
            stopping[-1].start()
        print(f"trillm: stopping tritonserver (requests in flight get {config.drain_timeout:g}s)", flush=True)
        server.stop(config.drain_timeout)
        for thread in stopping:
            thread.join()


def env_port(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default
