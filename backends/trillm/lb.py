"""nginx in front of trillm replicas: one generator for every place that runs it.

``render(BalancerConfig)`` writes the whole ``nginx.conf``: the compose
deployment (deploy/nginx/entrypoint.sh runs this file as a script, so it
imports nothing outside the standard library) and the failover tests
(tests/scale) use the same text, so they cannot drift apart.

What the config does (docs/scale.md):
- HTTP (Triton's ``/v2`` API), gRPC (``grpc_pass``) and the OpenAI API, each an
  upstream of every replica, least connections: an LLM request holds its
  connection for the whole generation, so open connections are the load.
- Server-sent events (``generate_stream``, OpenAI ``stream: true``) pass
  unbuffered, one event as soon as the replica writes it.
- Health, as far as open-source nginx goes: passive. A connection error, a
  connect timeout, or a 502/503 answer counts as a failure; ``max_fails`` of
  them within ``fail_timeout`` take the replica out for ``fail_timeout``, after
  which one request probes it again. A request whose replica refused or dropped
  it before answering is passed to the next replica (generation changes no
  state, so resending one is safe); a stream that has begun cannot be moved.
  Active checks of ``/v2/health/ready`` need NGINX Plus (``health_check``) or
  another balancer (HAProxy ``option httpchk``, Envoy); on Kubernetes the
  readiness probe does it (deploy/k8s).
- Model control and server settings (repository index/load/unload, log, trace,
  shared memory) are refused here (HTTP 403, gRPC PERMISSION_DENIED): admins
  use a replica's own address with the admin key. Paths outside Triton's API
  get 404. Metrics are not proxied: Prometheus scrapes each replica.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# Triton's HTTP endpoints that change the server or read its model repository.
ADMIN_HTTP_PATHS = (
    r"^/v2/(repository|logging|systemsharedmemory|cudasharedmemory)(/|$)",
    r"^/v2/(models/[^/]+/(versions/[^/]+/)?)?trace/setting$",
)
# The same on gRPC (inference.GRPCInferenceService methods).
ADMIN_GRPC_METHODS = (
    "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload", "LogSettings", "TraceSetting",
    r"SystemSharedMemory\w+", r"CudaSharedMemory\w+",
)
ADMIN_REFUSAL = (
    "model control and server settings are not served through the load balancer: "
    "send them to a replica's own address, with the admin key"
)
NO_REPLICA = "no trillm replica is available"
GRPC_PERMISSION_DENIED = 7


class BalancerError(ValueError):
    pass


@dataclass(frozen=True)
class Replica:
    """One trillm server: its address and ports (``openai_port`` 0: it serves no OpenAI API)."""

    host: str
    http_port: int
    grpc_port: int
    openai_port: int = 0

    @classmethod
    def parse(cls, text: str) -> Replica:
        """``HOST:HTTP:GRPC[:OPENAI]``, e.g. ``127.0.0.1:8100:8101:9100``."""
        parts = text.strip().split(":")
        if len(parts) not in (3, 4) or not parts[0] or not all(p.isdigit() for p in parts[1:]):
            raise BalancerError(f"a replica is HOST:HTTP_PORT:GRPC_PORT[:OPENAI_PORT], got {text!r}")
        return cls(parts[0], *(int(p) for p in parts[1:]))


@dataclass
class BalancerConfig:
    replicas: list[Replica]
    # Where nginx writes its pid, logs and temporary files.
    work_dir: Path
    listen_host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    openai_port: int = 9000  # proxied when every replica has an OpenAI port
    # Passive health: this many failures within fail_timeout take a replica
    # out for fail_timeout. One: a replica that refused a connection is
    # almost always down (killed, restarting, draining).
    max_fails: int = 1
    fail_timeout: int = 10
    connect_timeout: int = 2
    # A non-streamed generate answers only at its end: allow a long one.
    read_timeout: int = 600
    # A request may be passed to the next replica only this long after it
    # arrived (covers refused connections and connect timeouts, never a
    # generation that ran into read_timeout).
    retry_window: int = 10
    worker_processes: int = 1
    # Workers' user when nginx starts as root (nginx ignores it otherwise).
    user: str | None = None
    # "stderr" (containers) or a file in work_dir.
    error_log: str = ""
    access_log: str = ""

    def validate(self) -> None:
        if not self.replicas:
            raise BalancerError("the balancer needs at least one replica")
        if len(set(self.replicas)) != len(self.replicas):
            raise BalancerError("a replica is listed twice")
        ports = [self.http_port, self.grpc_port] + ([self.openai_port] if self.serves_openai else [])
        if len(set(ports)) != len(ports) or not all(0 < p < 65536 for p in ports):
            raise BalancerError(f"the balancer's ports must be distinct and in 1..65535, got {ports}")
        for name in ("max_fails", "fail_timeout", "connect_timeout", "read_timeout", "retry_window",
                     "worker_processes"):
            if getattr(self, name) < 1:
                raise BalancerError(f"{name} must be at least 1, got {getattr(self, name)}")

    @property
    def serves_openai(self) -> bool:
        return self.openai_port > 0 and all(r.openai_port for r in self.replicas)

    def log_paths(self) -> tuple[str, str]:
        return (self.error_log or str(self.work_dir / "error.log"),
                self.access_log or str(self.work_dir / "access.log"))


def _quote(text: str) -> str:
    """An nginx string literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _upstream(name: str, config: BalancerConfig, port_of) -> str:
    servers = "".join(
        f"        server {r.host}:{port_of(r)} max_fails={config.max_fails} fail_timeout={config.fail_timeout}s;\n"
        for r in config.replicas
    )
    return f"    upstream {name} {{\n        least_conn;\n{servers}        keepalive 32;\n    }}\n"


def _proxy_common(config: BalancerConfig, prefix: str, retry_on: str) -> str:
    """Timeouts and passing a failed request on, for proxy_* or grpc_* (same names)."""
    tries = len(config.replicas)
    return (
        f"        {prefix}_connect_timeout {config.connect_timeout}s;\n"
        f"        {prefix}_read_timeout {config.read_timeout}s;\n"
        f"        {prefix}_send_timeout {config.read_timeout}s;\n"
        f"        {prefix}_next_upstream {retry_on} non_idempotent;\n"
        f"        {prefix}_next_upstream_tries {tries};\n"
        f"        {prefix}_next_upstream_timeout {config.retry_window}s;\n"
    )


def _http_server_head(config: BalancerConfig, port: int) -> str:
    """The opening of an HTTP server block proxying to replicas (the Triton and OpenAI ports share it)."""
    return (
        "    server {\n"
        f"        listen {config.listen_host}:{port};\n"
        "        default_type application/json;\n"
        "        client_max_body_size 16m;\n"
        "        proxy_http_version 1.1;\n"
        '        proxy_set_header Connection "";\n'
        "        proxy_set_header Host $host;\n"
        "        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n"
    )


def _http_server(config: BalancerConfig) -> str:
    admin = "".join(
        f"        location ~ {path} {{\n            return 403 {_quote(_json_error(ADMIN_REFUSAL))};\n        }}\n"
        for path in ADMIN_HTTP_PATHS
    )
    return (
        _http_server_head(config, config.http_port)
        + _proxy_common(config, "proxy", "error timeout http_502 http_503")
        + "        error_page 502 504 = @no_replica;\n"
        + admin
        + "        location ~ ^/v2/models/[^/]+/(versions/[^/]+/)?generate_stream$ {\n"
        "            proxy_buffering off;\n"
        "            proxy_pass http://trillm_http;\n"
        "        }\n"
        "        location /v2 {\n"
        "            proxy_pass http://trillm_http;\n"
        "        }\n"
        "        location / {\n"
        f"            return 404 {_quote(_json_error('not a path of the trillm API'))};\n"
        "        }\n"
        "        location @no_replica {\n"
        f"            return 503 {_quote(_json_error(NO_REPLICA))};\n"
        "        }\n"
        "    }\n"
    )


def _grpc_refusal(message: str) -> str:
    # A trailers-only gRPC answer: the status travels in the response headers.
    return (
        "            default_type application/grpc;\n"
        f"            add_header grpc-status {GRPC_PERMISSION_DENIED} always;\n"
        f"            add_header grpc-message {_quote(message)} always;\n"
        "            return 200;\n"
    )


def _grpc_server(config: BalancerConfig) -> str:
    methods = "|".join(ADMIN_GRPC_METHODS)
    return (
        "    server {\n"
        f"        listen {config.listen_host}:{config.grpc_port} http2;\n"
        # One bidirectional stream carries a whole generation, and a client
        # may keep it open across requests: no body size or idle limit short
        # of the generation's own.
        "        client_max_body_size 0;\n"
        f"        client_body_timeout {config.read_timeout}s;\n"
        + _proxy_common(config, "grpc", "error timeout http_502 http_503")
        + f"        location ~ ^/inference\\.GRPCInferenceService/({methods})$ {{\n"
        + _grpc_refusal(ADMIN_REFUSAL)
        + "        }\n"
        "        location /inference.GRPCInferenceService/ {\n"
        "            grpc_pass grpc://trillm_grpc;\n"
        "        }\n"
        "        location /grpc.health.v1.Health/ {\n"
        "            grpc_pass grpc://trillm_grpc;\n"
        "        }\n"
        "    }\n"
    )


def _openai_server(config: BalancerConfig) -> str:
    return (
        _http_server_head(config, config.openai_port)
        # stream: true answers are server-sent events.
        + "        proxy_buffering off;\n"
        + _proxy_common(config, "proxy", "error timeout http_502 http_503")
        + "        error_page 502 504 = @no_replica;\n"
        "        location /v1/ {\n"
        "            proxy_pass http://trillm_openai;\n"
        "        }\n"
        "        location / {\n"
        f"            return 404 {_quote(_openai_error('not a path of the OpenAI API', 404))};\n"
        "        }\n"
        "        location @no_replica {\n"
        f"            return 503 {_quote(_openai_error(NO_REPLICA, 503))};\n"
        "        }\n"
        "    }\n"
    )


def _json_error(message: str) -> str:
    return json.dumps({"error": message})  # Triton's error shape


def _openai_error(message: str, status: int) -> str:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}})


def render(config: BalancerConfig) -> str:
    """The whole nginx.conf for ``config`` (validated first)."""
    config.validate()
    work = config.work_dir
    error_log, access_log = config.log_paths()
    temp = "".join(f"    {kind}_temp_path {work / 'tmp' / kind};\n"
                   for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    upstreams = _upstream("trillm_http", config, lambda r: r.http_port) + _upstream(
        "trillm_grpc", config, lambda r: r.grpc_port)
    servers = _http_server(config) + _grpc_server(config)
    if config.serves_openai:
        upstreams += _upstream("trillm_openai", config, lambda r: r.openai_port)
        servers += _openai_server(config)
    return (
        "# Generated by trillm.lb (backends/trillm/lb.py); edit that, not this file.\n"
        + (f"user {config.user};\n" if config.user else "")
        + f"worker_processes {config.worker_processes};\n"
        f"pid {work / 'nginx.pid'};\n"
        f"error_log {error_log} warn;\n"
        "events {\n    worker_connections 1024;\n}\n"
        "http {\n"
        # $upstream_addr lists every replica a request tried; $msec dates it.
        "    log_format trillm '$msec $request_time $status $server_port \"$request_method $uri\" "
        "upstream=$upstream_addr upstream_status=$upstream_status';\n"
        f"    access_log {access_log} trillm;\n"
        + temp
        + "    server_tokens off;\n"
        + upstreams
        + servers
        + "}\n"
    )


def write(config: BalancerConfig, path: Path) -> Path:
    """Render into ``path`` and create the dirs nginx writes to."""
    text = render(config)
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (config.work_dir / "tmp" / kind).mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def find_nginx() -> str:
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
    if found is None:
        raise BalancerError("nginx is not installed: apt-get install nginx (Debian's package proxies gRPC too)")
    return found


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@contextmanager
def running(config: BalancerConfig, ready_timeout: float = 30.0) -> Iterator[subprocess.Popen]:
    """nginx in the foreground on ``config``, listening (or BalancerError); stopped however the block ends."""
    conf = write(config, config.work_dir / "nginx.conf")
    error_log, _ = config.log_paths()
    command = [find_nginx(), "-p", str(config.work_dir), "-c", str(conf), "-e", error_log, "-g", "daemon off;"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        ports = [config.http_port, config.grpc_port] + ([config.openai_port] if config.serves_openai else [])
        deadline = time.monotonic() + ready_timeout
        while not all(_accepts(config.listen_host, port) for port in ports):
            if process.poll() is not None:
                raise BalancerError(f"nginx exited with {process.returncode}: {process.stderr.read().decode()}"
                                    f"{Path(error_log).read_text() if Path(error_log).exists() else ''}")
            if time.monotonic() > deadline:
                raise BalancerError(f"nginx does not listen on {config.listen_host}:{ports} after {ready_timeout}s")
            time.sleep(0.1)
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGQUIT)  # graceful: finish the requests in flight
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # its own session: the master and its workers
                process.wait(timeout=10)
        process.stderr.close()


def main(argv: list[str] | None = None) -> int:
    d = BalancerConfig(replicas=[], work_dir=Path("."))
    parser = argparse.ArgumentParser(prog="trillm-lb-config", description="Write nginx.conf for trillm replicas.")
    parser.add_argument("--replica", action="append", required=True, metavar="HOST:HTTP:GRPC[:OPENAI]",
                        help="a replica (repeat; commas also separate)")
    parser.add_argument("--work-dir", type=Path, required=True, help="nginx's pid, logs and temporary files")
    parser.add_argument("--out", type=Path, required=True, help="the nginx.conf to write")
    parser.add_argument("--listen-host", default=d.listen_host)
    for name in ("http_port", "grpc_port", "openai_port", "max_fails", "fail_timeout", "connect_timeout",
                 "read_timeout", "retry_window", "worker_processes"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    parser.add_argument("--user", default=None, help="workers' user when started as root")
    parser.add_argument("--error-log", default="", help="file or stderr (default: WORK_DIR/error.log)")
    parser.add_argument("--access-log", default="", help="file or /dev/stdout (default: WORK_DIR/access.log)")
    args = parser.parse_args(argv)
    try:
        replicas = [Replica.parse(text) for item in args.replica for text in item.split(",") if text.strip()]
        options = {k: v for k, v in vars(args).items() if k not in ("replica", "out")}
        write(BalancerConfig(replicas=replicas, **options), args.out)
    except BalancerError as exc:
        print(f"trillm-lb-config: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
