"""Model versions on a real tritonserver in explicit model-control mode (one per
module, on free loopback ports): the admin key, pinning and version policies, a
rollout and a rollback under continuous traffic, the A/B split.

The server starts serving version 1 only (policy specific:1). The tests run in
file order on it; each one says the state it needs and leaves.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from trillm.launcher import free_port, running
from trillm.serve import ServeConfig, prepare
from trillm.versions import VersionPolicy
from trillm_client import AdminKey, AdminKeyError, Client, ModelControl, TrafficSplit, TrillmError
from trillm_client.rollout import Pipeline, Rollout, RolloutError, with_versions

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[2]
PROMPT = "The quick brown fox"
MAX_TOKENS = 12
FRONTENDS = ("ensemble", "tensorrt_llm_bls")


@pytest.fixture(scope="module")
def admin_key() -> AdminKey:
    return AdminKey(secrets.token_hex(16), "the test")


@pytest.fixture(scope="module")
def server(demo_model_dir, demo_model_v2_dir, admin_key, tmp_path_factory):
    config = ServeConfig(
        checkpoint_dir=demo_model_dir,
        version_checkpoints={2: demo_model_v2_dir},
        model_repository=ROOT / "model_repository",
        work_dir=tmp_path_factory.mktemp("versions"),
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        max_model_len=512,
        max_input_len=256,
        # The exactness checks (every transport and a request alone or under traffic give the same
        # text) rest on batch invariance, which the engine guarantees on its float32 path; dtype auto
        # picks bf16 on AMX CPUs and says it is then not batch-invariant (tests/engine covers auto).
        dtype="float32",
        version_policy=VersionPolicy.parse("specific:1"),
        model_control="explicit",
        admin_key=admin_key,
    )
    options = prepare(config)
    options.exit_timeout = 5
    with running(options, ready_timeout=600) as server:
        yield server


@pytest.fixture(scope="module")
def control(server, admin_key):
    with ModelControl(server.grpc_url, "grpc", admin_key, timeout=600) as c:
        yield c


def generate(server, model: str, version: str = "", protocol: str = "grpc", stream: bool = False):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    with Client(url, protocol=protocol, model=model, version=version or None, timeout=300) as client:
        if stream:
            s = client.stream(PROMPT, MAX_TOKENS)
            s.text()
            return s.completion
        return client.generate(PROMPT, MAX_TOKENS)


@pytest.fixture(scope="module")
def texts(server) -> dict[str, str]:
    """The greedy text of each version (filled in as versions get loaded)."""
    return {"1": generate(server, "tensorrt_llm_bls", "1").text}


def http_post(url: str, headers: dict[str, str]) -> tuple[int, str]:
    request = urllib.request.Request(url, data=b"{}", headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def trillm(*args: str, key: AdminKey | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRILLM_ADMIN_KEY")}
    if key is not None:
        env["TRILLM_ADMIN_KEY"] = key.reveal()
    script = Path(sys.executable).with_name("trillm")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "trillm.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


# --- the admin key ---------------------------------------------------------------------

def test_model_control_is_refused_without_the_key_and_inference_is_not(server, admin_key, texts):
    base = f"http://{server.http_url}/v2"
    wrong = {"admin-key": secrets.token_hex(16)}
    for path in ("repository/index", "repository/models/ensemble/load", "repository/models/ensemble/unload",
                 "logging"):
        for headers in ({}, wrong):
            status, body = http_post(f"{base}/{path}", headers)
            assert status == 403 and "restricted" in body, (path, headers, status, body)
    assert http_post(f"{base}/repository/index", {"admin-key": admin_key.reveal()})[0] == 200
    for key in (None, AdminKey(secrets.token_hex(16), "a wrong key")):
        with ModelControl(server.grpc_url, "grpc", key) as refused:
            for call, args in (("index", ()), ("unload", ("ensemble",)), ("load", ("ensemble",))):
                with pytest.raises(AdminKeyError, match="model control refused"):
                    getattr(refused, call)(*args)
    # nothing was unloaded, and inference needs no key
    assert generate(server, "ensemble").text == texts["1"]
    leaked = [p for p in server.options.work_dir.rglob("*") if p.is_file() and admin_key.reveal().encode() in
              p.read_bytes()]
    assert leaked == [], "the admin key was written to the server's log or repository"


# --- pinning ----------------------------------------------------------------------------------

def test_unpinned_requests_get_the_policys_version_and_pinned_ones_exactly_theirs(server, texts):
    for model in FRONTENDS:
        assert generate(server, model).model_version == "1"
        pinned = generate(server, model, "1", protocol="http")
        assert (pinned.model_version, pinned.text) == ("1", texts["1"])
        for version in ("2", "9"):  # 2 is on disk but not loaded; 9 is nowhere
            with pytest.raises(TrillmError) as err:
                generate(server, model, version)
            assert f"'{model}' version {version}" in err.value.message, err.value.message


# --- rollout and rollback under traffic ---------------------------------------------------------

class Traffic:
    """Client threads sending unpinned requests until stopped (each at most ``limit``):
    successes by (model, version) with their texts, and every failure."""

    ROUTES = [("ensemble", "grpc", True), ("ensemble", "http", False), ("tensorrt_llm_bls", "grpc", False)]

    def __init__(self, server, limit: int = 5000) -> None:
        self.server, self.limit = server, limit
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.served: Counter[tuple[str, str]] = Counter()
        self.texts: dict[str, set[str]] = {}
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=route, daemon=True) for route in self.ROUTES]

    def _run(self, model: str, protocol: str, stream: bool) -> None:
        url = self.server.grpc_url if protocol == "grpc" else self.server.http_url
        with Client(url, protocol=protocol, model=model, timeout=120) as client:
            for _ in range(self.limit):
                if self.stop.is_set():
                    return
                try:
                    if stream:
                        s = client.stream(PROMPT, MAX_TOKENS)
                        s.text()
                        done = s.completion
                    else:
                        done = client.generate(PROMPT, MAX_TOKENS)
                except TrillmError as exc:
                    with self.lock:
                        self.failures.append(f"{model} {protocol}: {type(exc).__name__}: {exc.message}")
                    continue
                with self.lock:
                    self.served[(model, done.model_version)] += 1
                    self.texts.setdefault(done.model_version, set()).add(done.text)

    def wait_for(self, version: str, timeout: float = 120.0) -> None:
        """Until every route has had an answer from ``version`` (or ``timeout`` seconds pass)."""
        deadline = threading.Event()
        timer = threading.Timer(timeout, deadline.set)
        timer.start()
        try:
            while not deadline.wait(0.1):
                with self.lock:
                    if all(self.served[(model, version)] for model, _, _ in self.ROUTES):
                        return
        finally:
            timer.cancel()

    def __enter__(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=300)


def test_rollout_and_rollback_under_traffic_fail_no_request(server, control, texts):
    lines: list[str] = []
    rollout = Rollout(control, say=lines.append)
    with Traffic(server) as traffic:
        report = rollout.to(2)
        assert (report.from_version, report.to_version) == (1, 2)
        texts["2"] = generate(server, "tensorrt_llm_bls", "2").text
        assert texts["2"] != texts["1"], "versions 1 and 2 should not write the same text"
        for model in FRONTENDS:  # afterwards, unpinned traffic gets version 2
            done = generate(server, model)
            assert (done.model_version, done.text) == ("2", texts["2"]), lines
        traffic.wait_for("2")

        report = rollout.back()
        assert (report.from_version, report.to_version, report.staged) == (2, 1, [])
        for model in FRONTENDS:
            done = generate(server, model, protocol="http")
            assert (done.model_version, done.text) == ("1", texts["1"]), lines
    assert traffic.failures == [], (
        f"{len(traffic.failures)} failed requests: {traffic.failures[:5]}\nrollout: {lines}\n{server.log_tail(40)}")
    assert {v for (_, v) in traffic.served} == {"1", "2"}, f"traffic did not span the switches: {traffic.served}"
    # every answer came from one whole pipeline: version N's text, never a mix
    assert traffic.texts == {"1": {texts["1"]}, "2": {texts["2"]}}, traffic.texts


def test_a_version_that_cannot_load_aborts_and_the_default_stays(server, control, texts):
    rollout = Rollout(control)
    assert rollout.state().serving(Pipeline()) == 1
    with pytest.raises(RolloutError, match="stage of version 9 failed.*did not load.*version 1 is still the default"):
        rollout.to(9)
    assert rollout.state().serving(Pipeline()) == 1
    assert generate(server, "ensemble").text == texts["1"]


def test_the_cli_shows_versions_and_needs_the_key(server, admin_key):
    shown = trillm("versions", "--url", server.grpc_url, key=admin_key)
    assert shown.returncode == 0, shown.stderr
    assert "unpinned requests get version 1" in shown.stdout and "steps pinned to 1" in shown.stdout
    assert all(model in shown.stdout for model in Pipeline().models)
    same = trillm("rollout", "ensemble", "1", "--url", server.http_url, "--protocol", "http", key=admin_key)
    assert same.returncode == 0 and "already the default" in same.stdout, same.stderr
    refused = trillm("versions", "--url", server.grpc_url)
    assert refused.returncode == 5 and "TRILLM_ADMIN_KEY" in refused.stderr
    unknown = trillm("rollout", "no_such_model", "2", "--url", server.grpc_url, key=admin_key)
    assert unknown.returncode == 2 and "not a model of the pipeline" in unknown.stderr
    for result in (shown, same, refused, unknown):
        assert admin_key.reveal() not in result.stdout + result.stderr


# --- policies and the A/B split (versions 1 and 2 side by side) -----------------------------------

def side_by_side(control) -> None:
    """The composing models hold versions 1 and 2 (the rollout left them so; loaded here otherwise)."""
    for model in Pipeline().composing:
        ready = sorted(int(i.version) for i in control.index() if i.name == model and i.state == "READY")
        if ready != [1, 2]:
            control.load(model, with_versions(control.config(model), [1, 2]))


def bls_policy(control, policy: str) -> None:
    config = control.config("tensorrt_llm_bls")
    config["version_policy"] = VersionPolicy.parse(policy).as_config()
    control.load("tensorrt_llm_bls", config)


def both_texts(server, control, texts) -> dict[str, str]:
    """``texts`` with version 2's (known once the rollout has run; found here otherwise)."""
    if "2" not in texts:
        side_by_side(control)
        bls_policy(control, "all")
        texts["2"] = generate(server, "tensorrt_llm_bls", "2").text
    return texts


@pytest.mark.parametrize("policy,unpinned,loaded", [
    ("all", "2", {"1", "2"}),
    ("latest", "2", {"2"}),
    ("specific:1", "1", {"1"}),
])
def test_a_policy_decides_what_unpinned_and_pinned_requests_get(server, control, texts, policy, unpinned, loaded):
    side_by_side(control)
    texts = both_texts(server, control, texts)
    bls_policy(control, policy)
    done = generate(server, "tensorrt_llm_bls")
    assert done.model_version == unpinned
    for version in ("1", "2"):
        if version in loaded:
            pinned = generate(server, "tensorrt_llm_bls", version, protocol="http")
            assert (pinned.model_version, pinned.text) == (version, texts[version])
        else:
            with pytest.raises(TrillmError) as err:
                generate(server, "tensorrt_llm_bls", version)
            assert f"version {version}" in err.value.message
    assert done.text == texts[unpinned]


def test_the_ab_split_sends_each_version_its_share(server, control, texts):
    side_by_side(control)
    texts = both_texts(server, control, texts)
    bls_policy(control, "all")
    try:
        with TrafficSplit({"1": 1, "2": 1}, url=server.grpc_url, seed=11, timeout=300) as split:
            results = split.generate_many([PROMPT] * 12, MAX_TOKENS, concurrency=3)
            stats = split.stats()
    finally:
        bls_policy(control, "specific:1")
    assert all(not isinstance(r, Exception) for r in results), results
    for version, completion in results:
        assert (completion.model_version, completion.text) == (version, texts[version])
    assert {v: (s.requests, s.error_count) for v, s in stats.items()} == {
        v: (n, 0) for v, n in Counter(version for version, _ in results).items()}
    assert stats["1"].requests > 0 and stats["2"].requests > 0
    assert all(len(s.latencies) == s.requests and s.quantile(0.5) > 0 for s in stats.values())
