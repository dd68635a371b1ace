"""The compose deployment end to end: `up -d`, requests through the published
ports, Prometheus scraping trillm, `down`.

Needs a docker daemon, `docker compose` or `docker-compose`, and the images
(`make docker-build`); CI runs docker/ensure_docker.sh first. The stack runs
as its own compose project on free loopback ports with its own env file, so a
deployment of yours (`make up`) is left alone.
"""

from __future__ import annotations

import ipaddress
import json
import queue
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ("trillm/triton-cpu:latest", "trillm/prometheus:latest")
SERVICES = ("triton", "prometheus")
HEALTHY_TIMEOUT = 600.0  # the server loads torch, five models and the demo checkpoint
SCRAPE_TIMEOUT = 60.0
PROMPT = "The capital of France is"


def _run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def _compose_tool() -> list[str] | None:
    if shutil.which("docker") and _run(["docker", "compose", "version"]).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def _why_docker_cannot_run() -> str | None:
    if shutil.which("docker") is None:
        return "no docker CLI on PATH (docker/ensure_docker.sh installs docker.io and starts dockerd)"
    info = _run(["docker", "info", "--format", "{{.ServerVersion}}"], timeout=30)
    if info.returncode != 0:
        reason = (info.stderr.strip().splitlines() or ["no output"])[-1]
        return f"no docker daemon answers ({reason}); docker/ensure_docker.sh starts one"
    if _compose_tool() is None:
        return "neither `docker compose` nor `docker-compose` is installed (docker/ensure_docker.sh installs one)"
    return None


def _free_port() -> int:
    from trillm.launcher import free_port

    return free_port()


def _http(url: str, body: dict | None = None, headers: dict | None = None, timeout: float = 60) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@dataclass
class Deployment:
    compose: list[str]  # the compose tool with -f/-p/--env-file: append a subcommand
    project: str
    http_port: int
    grpc_port: int
    metrics_port: int
    prometheus_port: int
    admin_key: str

    def __call__(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return _run([*self.compose, *args], timeout=timeout)

    def container(self, service: str) -> str:
        return self("ps", "-q", service).stdout.strip()

    def health(self, service: str) -> str:
        """healthy, starting, unhealthy; or why it is not running: absent, exited, restarted (a crash)."""
        container = self.container(service)
        if not container:
            return "absent"
        state = _run(["docker", "inspect", "--format",
                      "{{.State.Status}} {{.RestartCount}} {{.State.Health.Status}}", container])
        status, restarts, health = state.stdout.split()
        if int(restarts):
            return "restarted"
        return health if status == "running" else status

    def containers_left(self) -> list[str]:
        listed = _run(["docker", "ps", "-a", "-q", "--filter", f"label=com.docker.compose.project={self.project}"])
        return listed.stdout.split()

    def logs(self) -> str:
        return self("logs", "--no-color", "--tail=60").stdout


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> Iterator[Deployment]:
    reason = _why_docker_cannot_run()
    if reason:
        pytest.skip(reason)
    missing = [image for image in IMAGES if _run(["docker", "image", "inspect", image]).returncode != 0]
    if missing:
        pytest.fail(f"images {', '.join(missing)} are not built: run `make docker-build` first")

    work = tmp_path_factory.mktemp("compose")
    checkpoints = work / "checkpoints"
    checkpoints.mkdir()
    # Every published port free, the OpenAI API's too (host networking: a fixed 9000 could be taken).
    ports = {name: _free_port()
             for name in ("HTTP_PORT", "GRPC_PORT", "METRICS_PORT", "PROMETHEUS_PORT", "OPENAI_PORT")}
    admin_key = uuid.uuid4().hex
    env_file = work / "env"
    env_file.write_text(
        "".join(f"{name}={port}\n" for name, port in ports.items())
        + f"TRITON_ADMIN_KEY={admin_key}\nTRILLM_CHECKPOINTS={checkpoints}\n"
    )
    project = f"trillm-test-{uuid.uuid4().hex[:8]}"
    deployment = Deployment(
        compose=[*_compose_tool(), "--project-directory", str(ROOT), "-f", str(ROOT / "docker-compose.yml"),
                 "-p", project, "--env-file", str(env_file)],
        project=project,
        http_port=ports["HTTP_PORT"],
        grpc_port=ports["GRPC_PORT"],
        metrics_port=ports["METRICS_PORT"],
        prometheus_port=ports["PROMETHEUS_PORT"],
        admin_key=admin_key,
    )
    try:
        up = deployment("up", "-d", "--no-build", *SERVICES)
        assert up.returncode == 0, f"compose up failed:\n{up.stdout}\n{up.stderr}"
        yield deployment
    finally:
        deployment("down", "-v", "--remove-orphans", timeout=180)


def _wait_healthy(deployment: Deployment, service: str) -> None:
    deadline = time.monotonic() + HEALTHY_TIMEOUT
    while (health := deployment.health(service)) != "healthy":
        if health not in ("starting", "running") or time.monotonic() > deadline:
            pytest.fail(f"{service} is {health}, not healthy; last log lines:\n{deployment.logs()}")
        time.sleep(2)


def test_up_brings_triton_and_prometheus_to_healthy(deployment):
    for service in SERVICES:
        _wait_healthy(deployment, service)
    status, _ = _http(f"http://127.0.0.1:{deployment.http_port}/v2/health/ready")
    assert status == 200


def test_http_generate_through_published_port_returns_text(deployment):
    _wait_healthy(deployment, "triton")
    status, body = _http(f"http://127.0.0.1:{deployment.http_port}/v2/models/ensemble/generate",
                         {"text_input": PROMPT, "max_tokens": 8})
    assert status == 200, body
    text = json.loads(body)["text_output"]
    assert isinstance(text, str) and text.strip()


def test_tritonclient_grpc_stream_through_published_port_returns_text(deployment):
    import tritonclient.grpc as grpcclient

    _wait_healthy(deployment, "triton")

    def tensor(name: str, array: np.ndarray, datatype: str) -> grpcclient.InferInput:
        t = grpcclient.InferInput(name, list(array.shape), datatype)
        t.set_data_from_numpy(array)
        return t

    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{deployment.grpc_port}")
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer("ensemble", [
            tensor("text_input", np.array([[PROMPT.encode()]], dtype=object), "BYTES"),
            tensor("max_tokens", np.array([[8]], dtype=np.int32), "INT32"),
            tensor("stream", np.array([[True]], dtype=bool), "BOOL"),
        ], enable_empty_final_response=True)
        pieces = []
        while True:
            result, error = responses.get(timeout=120)
            assert error is None, error
            response = result.get_response()
            if any(output.name == "text_output" for output in response.outputs):
                pieces.append(result.as_numpy("text_output").reshape(-1)[0].decode())
            if response.parameters["triton_final_response"].bool_param:
                break
    finally:
        client.stop_stream()
        client.close()
    assert "".join(pieces).strip()


def _prometheus_query(deployment: Deployment, query: str) -> list[dict]:
    url = f"http://127.0.0.1:{deployment.prometheus_port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    status, body = _http(url)
    assert status == 200, body
    return json.loads(body)["data"]["result"]


def test_prometheus_scraped_trillm_generation_tokens(deployment):
    _wait_healthy(deployment, "prometheus")
    _wait_healthy(deployment, "triton")
    status, body = _http(f"http://127.0.0.1:{deployment.http_port}/v2/models/ensemble/generate",
                         {"text_input": PROMPT, "max_tokens": 8})
    assert status == 200, body
    deadline = time.monotonic() + SCRAPE_TIMEOUT
    while not _prometheus_query(deployment, "sum(trillm_generation_tokens_total) >= 8"):
        assert time.monotonic() < deadline, (
            "Prometheus has not scraped trillm_generation_tokens_total >= 8 after an 8-token request; "
            f"its targets: {_http(f'http://127.0.0.1:{deployment.prometheus_port}/api/v1/targets')[1]}"
        )
        time.sleep(2)


def test_model_control_needs_the_admin_key(deployment):
    _wait_healthy(deployment, "triton")
    index = f"http://127.0.0.1:{deployment.http_port}/v2/repository/index"
    status, body = _http(index, {})
    assert status == 403, body
    status, body = _http(index, {}, headers={"admin-key": deployment.admin_key})
    assert status == 200, body
    assert {"ensemble", "tensorrt_llm"} <= {model["name"] for model in json.loads(body)}


def _listening_addresses(port: int) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Local addresses of the TCP sockets listening on port, from /proc/net/tcp{,6}.

    Host networking puts the containers' sockets in this network namespace.
    """
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].split(":")
            if fields[3] != "0A" or int(port_hex, 16) != port:  # 0A: LISTEN
                continue
            raw = b"".join(bytes.fromhex(address[i:i + 8])[::-1] for i in range(0, len(address), 8))
            ip = ipaddress.ip_address(raw)
            found.add(getattr(ip, "ipv4_mapped", None) or ip)
    return found


def test_every_port_listens_on_loopback_only(deployment):
    _wait_healthy(deployment, "triton")
    _wait_healthy(deployment, "prometheus")
    ports = {"http": deployment.http_port, "grpc": deployment.grpc_port,
             "metrics": deployment.metrics_port, "prometheus": deployment.prometheus_port}
    for name, port in ports.items():
        addresses = _listening_addresses(port)
        assert addresses, f"nothing listens on the {name} port {port}"
        assert all(address.is_loopback for address in addresses), f"{name} port {port} listens on {addresses}"


def test_down_leaves_nothing_running(deployment):
    down = deployment("down", "-v", "--remove-orphans", timeout=180)
    assert down.returncode == 0, down.stderr
    assert deployment.containers_left() == []
