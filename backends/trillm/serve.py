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


@dataclass
class ServeConfig:
    """Everything that goes into the rendered config.pbtxt files (README "Configuration")."""

    checkpoint_dir: Path
    model_repository: Path = Path("model_repository")
    work_dir: Path = Path("build/serve")
    tokenizer_dir: Path | None = None
    engine_kind: str = "torch"
    engine_dir: str = ""
    dtype: str = "auto"  # auto: measured per matmul on this CPU (trillm.engine.precision)
    quantization: str = "none"  # none, int8, int4: weight-only, every linear and the LM head
    quant_group_size: int = 32  # int4: inputs per scale and zero (32, 64, 128)
    max_batch_size: int = 64
    max_model_len: int = 0  # 0 = min(max_position_embeddings, 4096)
    max_input_len: int = 0  # 0 = max_model_len - 1
    max_num_seqs: int = 0
    max_num_batched_tokens: int = 0
    kv_cache_blocks: int = 0
    block_size: int = 16
    num_threads: int = 0
    enable_prefix_caching: bool = True
    add_special_tokens: bool = True
    skip_special_tokens: bool = True
    default_exclude_input_in_output: bool = True
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
                path = self.checkpoint_of(version) if kind == "checkpoint_dir" else self.tokenizer_of(version)
                values[name] = path.resolve()
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

    def template_values(self) -> dict[str, object]:
        b = lambda v: "true" if v else "false"  # noqa: E731
        return {
            "checkpoint_dir": self.checkpoint_dir.resolve(),
            "tokenizer_dir": (self.tokenizer_dir or self.checkpoint_dir).resolve(),
            "engine_kind": self.engine_kind,
            "engine_dir": self.engine_dir,
            "dtype": self.dtype,
            "quantization": self.quantization,
            "quant_group_size": self.quant_group_size,
            "max_batch_size": self.max_batch_size,
            "max_model_len": self.resolved_max_model_len(),
            "max_input_len": self.max_input_len,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "kv_cache_blocks": self.kv_cache_blocks,
            "block_size": self.block_size,
            "num_threads": self.num_threads,
            "enable_prefix_caching": b(self.enable_prefix_caching),
            "add_special_tokens": b(self.add_special_tokens),
            "skip_special_tokens": b(self.skip_special_tokens),
            "default_exclude_input_in_output": b(self.default_exclude_input_in_output),
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
