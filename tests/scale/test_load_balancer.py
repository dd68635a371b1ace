"""Two real trillm replicas behind a real nginx (Debian's), on loopback.

A replica is a tritonserver and the OpenAI server beside it, as `trillm serve`
runs them. The nginx config is the one the compose deployment runs
(trillm.lb). Traffic is trillm_client over HTTP and gRPC, and the openai
client, through nginx; each replica's own metrics port says how much of it
reached that replica. The failover test kills one
replica's tritonserver with SIGKILL (by pid) under load, counts the requests
that failed and when, checks that every request started after it died
succeeded, restarts it on the same ports and waits for nginx to send it
traffic again. Needs nginx (`apt-get install nginx`; .ci/run installs it).
"""

from __future__ import annotations

import json
import os
import pwd
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from trillm import lb
from trillm.launcher import TritonServer, free_port
from trillm.openai.process import OpenAIOptions, OpenAIProcess
from trillm.serve import ServeConfig, prepare
from trillm_client import Client

pytestmark = pytest.mark.scale

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "The capital of France is"
READY_TIMEOUT = 600.0  # two replicas load torch and five models on two shared cores
# Short, so that the restarted replica is probed again soon; the compose
# deployment uses lb.BalancerConfig's default.
FAIL_TIMEOUT = 2
CLIENT_TIMEOUT = 120.0


def _skip_without_nginx() -> None:
    try:
        lb.find_nginx()
    except lb.BalancerError as exc:
        pytest.skip(f"{exc} (.ci/run installs it)")


class Replicas:
    """The replicas' tritonservers and OpenAI servers; :meth:`restart` replaces
    one tritonserver on the same ports (its OpenAI server reconnects)."""

    def __init__(self, servers: list[TritonServer], openai: list[OpenAIProcess]) -> None:
        self.servers = servers
        self.openai = openai

    def restart(self, index: int) -> TritonServer:
        old = self.servers[index]
        old.stop()  # reaps it and kills the stubs it left
        self.servers[index] = TritonServer(old.options).start()
        self.servers[index].wait_ready(READY_TIMEOUT)
        return self.servers[index]

    def stop(self) -> None:
        for process in self.openai:
            process.stop()
        for server in self.servers:
            server.stop()


@pytest.fixture(scope="module")
def replicas(demo_model_dir, demo_model_v2_dir, tmp_path_factory):
    _skip_without_nginx()
    servers = []
    for index in range(2):
        config = ServeConfig(
            checkpoint_dir=demo_model_dir,
            version_checkpoints={2: demo_model_v2_dir},
            model_repository=ROOT / "model_repository",
            work_dir=tmp_path_factory.mktemp(f"replica{index}"),
            http_port=free_port(),
            grpc_port=free_port(),
            metrics_port=free_port(),
            max_model_len=1024,
            max_input_len=512,
            num_threads=1,  # two replicas share two cores
        )
        options = prepare(config)
        options.exit_timeout = 5
        servers.append(TritonServer(options))
    openai = [OpenAIProcess(OpenAIOptions(s.grpc_url, s.options.host, free_port(), drain_timeout=5,
                                          log_file=s.options.work_dir / "openai.log")) for s in servers]
    group = Replicas(servers, openai)
    try:
        for server in servers:  # both load at once
            server.start()
        for server, process in zip(servers, openai):
            server.wait_ready(READY_TIMEOUT)
            process.start().wait_ready()
        yield group
    finally:
        group.stop()


@pytest.fixture(scope="module")
def balancer(replicas, tmp_path_factory):
    work = tmp_path_factory.mktemp("nginx")
    config = lb.BalancerConfig(
        replicas=[lb.Replica(s.options.host, s.options.http_port, s.options.grpc_port, o.options.port)
                  for s, o in zip(replicas.servers, replicas.openai)],
        work_dir=work,
        http_port=free_port(),
        grpc_port=free_port(),
        openai_port=free_port(),
        fail_timeout=FAIL_TIMEOUT,
        # Workers run as the test's own user, so that they can use its temporary dir.
        user=pwd.getpwuid(os.geteuid()).pw_name if os.geteuid() == 0 else None,
    )
    with lb.running(config):
        yield config


def inference_count(server: TritonServer) -> int:
    """Requests the replica's ensemble has served (all versions), from its metrics port."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    pattern = re.compile(r'^nv_inference_count\{model="ensemble",version="\d+"\} (\d+)', re.MULTILINE)
    return sum(int(n) for n in pattern.findall(text))


def settled_counts(servers: list[TritonServer], before: list[int], expected: int,
                   timeout: float = 15.0) -> list[int]:
    """Each replica's requests served since `before`, read once their sum reaches
    `expected` or `timeout` passes. Triton counts an ensemble request when it
    releases it, which can be just after the client has its final response, so
    a count read at once can miss the last request; a count above `expected`
    is returned at once (nothing takes it back down)."""
    deadline = time.monotonic() + timeout
    while True:
        served = [inference_count(s) - b for s, b in zip(servers, before)]
        if sum(served) >= expected or time.monotonic() > deadline:
            return served
        time.sleep(0.2)


def passed_on(config: lb.BalancerConfig) -> int:
    """Requests in nginx's access log that tried more than one replica."""
    lines = Path(config.log_paths()[1]).read_text().splitlines()
    return sum(", " in re.search(r"upstream=(\S+(, \S+)*) upstream_status=", line).group(1) for line in lines)


def _http(url: str, body: dict | None = None) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _client(config: lb.BalancerConfig | lb.Replica, protocol: str):
    """trillm_client for "http" and "grpc", the openai client for "openai": to nginx, or to one replica."""
    host = config.listen_host if isinstance(config, lb.BalancerConfig) else config.host
    if protocol == "openai":
        from openai import OpenAI

        # No retries of its own: every failure nginx lets through is counted.
        return OpenAI(base_url=f"http://{host}:{config.openai_port}/v1", api_key="unused",
                      max_retries=0, timeout=CLIENT_TIMEOUT)
    port = config.http_port if protocol == "http" else config.grpc_port
    return Client(f"{host}:{port}", protocol=protocol, timeout=CLIENT_TIMEOUT)


def _one_request(client, kind: str, max_tokens: int) -> str:
    if isinstance(client, Client):
        if kind == "stream":
            with client.stream(PROMPT, max_tokens=max_tokens) as stream:
                return "".join(stream)
        return client.generate(PROMPT, max_tokens=max_tokens).text
    answer = client.completions.create(model="ensemble", prompt=PROMPT, max_tokens=max_tokens,
                                       stream=kind == "stream")
    if kind == "stream":
        return "".join(chunk.choices[0].text for chunk in answer if chunk.choices)
    return answer.choices[0].text


def test_traffic_through_nginx_reaches_both_replicas(replicas, balancer):
    before = [inference_count(s) for s in replicas.servers]
    sent = 0
    for protocol in ("http", "grpc", "openai"):
        with _client(balancer, protocol) as client:
            for kind in ("generate", "stream", "generate", "stream"):
                assert _one_request(client, kind, 8)
                sent += 1
    served = settled_counts(replicas.servers, before, sent)
    assert sum(served) == sent, f"replicas served {served} of {sent} requests sent through nginx"
    assert all(n > 0 for n in served), f"least_conn sent {served} requests to the two replicas"


def _stream_arrivals(client, max_tokens: int) -> list[float]:
    """Seconds from sending to each streamed piece of text."""
    started = time.monotonic()
    arrivals = []
    if isinstance(client, Client):
        with client.stream(PROMPT, max_tokens=max_tokens, min_tokens=max_tokens) as stream:
            arrivals = [time.monotonic() - started for _ in stream]
    else:  # the demo model never ends early: max_tokens are generated
        for chunk in client.completions.create(model="ensemble", prompt=PROMPT, max_tokens=max_tokens, stream=True):
            if chunk.choices and chunk.choices[0].text:
                arrivals.append(time.monotonic() - started)
    return arrivals


@pytest.mark.parametrize("protocol", ["http", "grpc", "openai"])
def test_streamed_events_pass_nginx_as_they_are_generated(balancer, protocol):
    """Buffered, every event would arrive when the last one does: the events through nginx
    must be spread over as long as the same stream's events sent to a replica directly
    (measured in the test, so no assumption about how fast this CPU generates; a fast
    one generated 64 tokens in less time than the first event's connection took)."""
    with _client(balancer, protocol) as client:
        through = _stream_arrivals(client, 64)
    with _client(balancer.replicas[0], protocol) as client:
        direct = _stream_arrivals(client, 64)
    assert len(through) > 8 and len(direct) > 8
    spread, direct_spread = through[-1] - through[0], direct[-1] - direct[0]
    assert spread > direct_spread / 3, (f"through nginx the events arrived within {spread:.3f}s, "
                                        f"directly over {direct_spread:.3f}s")


@pytest.mark.parametrize("path, body", [
    ("/v2/repository/index", {}),
    ("/v2/repository/models/ensemble/unload", {}),
    ("/v2/repository/models/ensemble/load", {}),
    ("/v2//repository/index", {}),
    ("/v2/%72epository/index", {}),
    ("/v2/logging", None),
    ("/v2/trace/setting", None),
    ("/v2/models/ensemble/trace/setting", None),
    ("/v2/systemsharedmemory/status", None),
])
def test_admin_http_endpoints_are_refused_by_nginx(replicas, balancer, path, body):
    status, text = _http(f"http://{balancer.listen_host}:{balancer.http_port}{path}", body)
    assert status == 403, text
    assert "admin key" in json.loads(text)["error"]


def test_the_replicas_themselves_serve_what_nginx_refuses(replicas):
    # So the 403s above are nginx's: these replicas run without an admin key.
    status, text = _http(f"http://{replicas.servers[0].http_url}/v2/repository/index", {})
    assert status == 200, text
    assert "ensemble" in {model["name"] for model in json.loads(text)}


def test_paths_outside_the_api_get_404(balancer):
    status, text = _http(f"http://{balancer.listen_host}:{balancer.http_port}/metrics")
    assert status == 404, text
    status, _ = _http(f"http://{balancer.listen_host}:{balancer.http_port}/v2/models/ensemble/config")
    assert status == 200


def test_admin_grpc_methods_are_refused_by_nginx(balancer):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(f"{balancer.listen_host}:{balancer.grpc_port}")
    try:
        for call in (client.get_model_repository_index, lambda: client.unload_model("ensemble"),
                     client.get_log_settings, client.get_trace_settings,
                     client.get_system_shared_memory_status):
            with pytest.raises(InferenceServerException) as refused:
                call()
            assert refused.value.status() == "StatusCode.PERMISSION_DENIED"
            assert "admin key" in refused.value.message()
        assert client.is_model_ready("ensemble")
    finally:
        client.close()


@dataclass
class Outcome:
    kind: str
    started: float
    ended: float
    error: str = ""


@dataclass
class Load:
    """Clients sending requests through nginx in a loop until told to stop."""

    config: lb.BalancerConfig
    outcomes: list[Outcome] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, protocol: str, kind: str) -> None:
        with _client(self.config, protocol) as client:
            while not self.stop.is_set():
                started = time.monotonic()
                error = ""
                try:
                    _one_request(client, kind, 24)
                except Exception as exc:  # noqa: BLE001 - every failure is counted, whatever its type
                    error = f"{type(exc).__name__}: {exc}"
                with self.lock:
                    self.outcomes.append(Outcome(f"{protocol} {kind}", started, time.monotonic(), error))

    def done_after(self, moment: float) -> list[Outcome]:
        with self.lock:
            return [o for o in self.outcomes if o.started > moment]


def test_kill9_of_a_replica_under_load_then_it_rejoins(replicas, balancer, record_property):
    load = Load(balancer)
    workers = [threading.Thread(target=load.run, args=args, daemon=True)
               for args in (("http", "generate"), ("http", "stream"), ("grpc", "stream"), ("grpc", "generate"),
                            ("openai", "stream"))]
    for worker in workers:
        worker.start()
    victim = replicas.servers[1]
    try:
        deadline = time.monotonic() + 120
        while len(load.done_after(0)) < 8:  # both replicas busy
            assert time.monotonic() < deadline, "the load made no progress before the kill"
            time.sleep(0.05)
        killed_at = time.monotonic()
        os.kill(victim.process.pid, signal.SIGKILL)
        victim.process.wait(timeout=30)
        dead_at = time.monotonic()  # its sockets are closed from here on
        while len(load.done_after(dead_at)) < 16:
            assert time.monotonic() < deadline, "too few requests finished after the kill"
            time.sleep(0.05)
    finally:
        load.stop.set()
        for worker in workers:
            worker.join(timeout=CLIENT_TIMEOUT)

    failed = [o for o in load.outcomes if o.error]
    after = load.done_after(dead_at)
    summary = {
        "requests": len(load.outcomes),
        "failed": len(failed),
        "in_flight_at_kill": sum(o.started <= killed_at < o.ended for o in load.outcomes),
        "failures_end_s_after_kill": sorted(round(o.ended - killed_at, 3) for o in failed),
        "started_after_death": len(after),
        "errors": sorted({o.error[:160] for o in failed}),
        # Requests nginx passed on to the other replica after the killed one failed them.
        "passed_on_by_nginx": passed_on(balancer),
    }
    record_property("failover", json.dumps(summary))
    print("failover:", json.dumps(summary, indent=1))
    # A request fails only when it was on the killed replica as it died; every
    # one started after that is served by the other replica (nginx passes a
    # refused connection on, and then marks the replica down).
    assert all(o.started < dead_at for o in failed), summary
    assert not [o for o in after if o.error], summary
    assert summary["failed"] <= summary["in_flight_at_kill"], summary

    restarted = replicas.restart(1)
    assert inference_count(restarted) == 0
    with _client(balancer, "http") as client:
        for _ in range(200):  # nginx probes it again fail_timeout after its last failure
            assert client.generate(PROMPT, max_tokens=4).text
            if inference_count(restarted) > 0:
                break
            time.sleep(0.1)
    assert inference_count(restarted) > 0, "the restarted replica got no traffic through nginx"
