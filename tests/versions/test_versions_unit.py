"""Versions without a server: policies, the repository's version layout and
per-version parameters, the admin key, the rollout steps on a fake server, the
A/B split on fake clients."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

import fake_pb_utils as pb
from trillm.launcher import RESTRICTED_APIS, LaunchError, ServerOptions, TritonInstall, TritonServer
from trillm.serve import ServeConfig
from trillm.templates import render_repository
from trillm.triton.errors import ConfigError
from trillm.triton.params import model_parameters
from trillm.triton.sender import GuardedSender
from trillm.versions import VersionError, VersionPolicy, add_pipeline_version, model_versions, pipeline_versions
from trillm_client.ab import TrafficSplit, check_weights, parse_split
from trillm_client.admin import GRPC_HEADER, HTTP_HEADER, AdminKey, refused_error
from trillm_client.completion import ModelInfo
from trillm_client.errors import InvalidInputError, ModelNotFoundError, UnavailableError
from trillm_client.rollout import Canary, Pipeline, Rollout, RolloutError

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
REPOSITORY = ROOT / "model_repository"
KEY = "0123456789abcdef-not-a-real-key"
# What the shipped version 2 changes besides its checkpoint: weight-only int4, groups of 32.
V2_QUANTIZATION = {"quantization": "int4", "quant_group_size": "32"}


# --- version policies ------------------------------------------------------------

@pytest.mark.parametrize("text,served,default,pbtxt", [
    ("latest", [3], 3, "{ latest: { num_versions: 1 } }"),
    ("latest:2", [2, 3], 3, "{ latest: { num_versions: 2 } }"),
    ("all", [1, 2, 3], 3, "{ all: { } }"),
    ("specific:1", [1], 1, "{ specific: { versions: [ 1 ] } }"),
    ("specific:3,1", [1, 3], 3, "{ specific: { versions: [ 1, 3 ] } }"),
])
def test_a_policy_says_what_loads_and_what_unpinned_requests_get(text, served, default, pbtxt):
    policy = VersionPolicy.parse(text)
    assert policy.served([1, 2, 3]) == served and policy.default([1, 2, 3]) == default
    assert policy.pbtxt() == pbtxt
    assert VersionPolicy.parse(str(policy)) == policy


@pytest.mark.parametrize("text", ["newest", "latest:0", "latest:x", "all:2", "specific:", "specific:0", "specific:a"])
def test_a_bad_policy_is_refused_with_the_syntax(text):
    with pytest.raises(VersionError, match="latest, latest:N, all or specific"):
        VersionPolicy.parse(text)


def test_a_specific_version_that_is_not_there_is_named():
    with pytest.raises(VersionError, match=r"version\(s\) 4 not in the repository \(it has 1, 2\)"):
        VersionPolicy.parse("specific:1,4").served([1, 2])


# --- the repository's versions -------------------------------------------------------

def test_every_model_of_the_shipped_repository_has_versions_1_and_2():
    assert model_versions(REPOSITORY) == {m: [1, 2] for m in Pipeline().models}
    assert pipeline_versions(REPOSITORY) == [1, 2]
    ensemble = (REPOSITORY / "ensemble/config.pbtxt").read_text()
    assert ensemble.count("model_version: ${pipeline_version}") == 3 and "model_version: -1" not in ensemble
    assert "versions: [ ${pipeline_version} ]" in ensemble
    for model in ("preprocessing", "tensorrt_llm", "postprocessing"):
        assert json.loads((REPOSITORY / model / "2/parameters.json").read_text())["tokenizer_dir"] == "${tokenizer_dir_v2}"
        assert not (REPOSITORY / model / "1/parameters.json").exists()


def test_a_version_missing_from_one_model_is_named(tmp_path):
    for model, versions in {"a": [1, 2], "b": [1]}.items():
        (tmp_path / model).mkdir()
        (tmp_path / model / "config.pbtxt").write_text(f'name: "{model}"\n')
        for v in versions:
            (tmp_path / model / str(v)).mkdir()
    with pytest.raises(VersionError, match="b lacks 2"):
        pipeline_versions(tmp_path)


def test_a_new_pipeline_version_copies_the_shims_but_not_the_overrides(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(REPOSITORY, repo)
    created = add_pipeline_version(repo, 3)
    assert set(created) == set(Pipeline().models)
    assert (repo / "tensorrt_llm/3/model.py").read_text() == (repo / "tensorrt_llm/1/model.py").read_text()
    assert (repo / "ensemble/3/.gitkeep").exists() and not (repo / "tensorrt_llm/3/parameters.json").exists()
    assert pipeline_versions(repo) == [1, 2, 3]
    with pytest.raises(VersionError, match="already exists"):
        add_pipeline_version(repo, 2)


# --- rendering -------------------------------------------------------------------------

def fake_checkpoint(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"max_position_embeddings": 2048}))
    (path / "tokenizer.json").write_text("{}")
    return path


def render(tmp_path: Path, **kwargs) -> Path:
    config = ServeConfig(checkpoint_dir=fake_checkpoint(tmp_path / "v1"), model_repository=REPOSITORY,
                         work_dir=tmp_path / "work", **kwargs)
    out = tmp_path / "rendered"
    render_repository(REPOSITORY, out, config.template_values())
    return out


def policy_of(config: str) -> str:
    return re.search(r"^version_policy: (.*)$", config, re.MULTILINE).group(1)


@pytest.mark.parametrize("policy,pinned", [("latest", 2), ("all", 2), ("specific:1", 1), ("latest:2", 2)])
def test_the_ensemble_serves_the_default_version_with_every_step_pinned_to_it(tmp_path, policy, pinned):
    out = render(tmp_path, version_policy=VersionPolicy.parse(policy))
    ensemble = (out / "ensemble/config.pbtxt").read_text()
    assert re.findall(r"model_version: (\S+)", ensemble) == [str(pinned)] * 3
    assert policy_of(ensemble) == f"{{ specific: {{ versions: [ {pinned} ] }} }}"
    for model in ("preprocessing", "tensorrt_llm", "postprocessing", "tensorrt_llm_bls"):
        assert policy_of((out / model / "config.pbtxt").read_text()) == VersionPolicy.parse(policy).pbtxt()


def test_version_2_gets_its_own_checkpoint_and_tokenizer(tmp_path):
    v2 = fake_checkpoint(tmp_path / "v2")
    out = render(tmp_path, version_checkpoints={2: v2})
    assert json.loads((out / "tensorrt_llm/2/parameters.json").read_text()) == {
        "checkpoint_dir": str(v2.resolve()), "tokenizer_dir": str(v2.resolve()), **V2_QUANTIZATION}
    assert json.loads((out / "preprocessing/2/parameters.json").read_text()) == {"tokenizer_dir": str(v2.resolve())}
    assert f'string_value: "{(tmp_path / "v1").resolve()}"' in (out / "tensorrt_llm/config.pbtxt").read_text()
    assert list(out.glob("*/[12]/__pycache__/model.*.pyc")), "the shims are compiled at render time"


def test_without_a_version_checkpoint_every_version_serves_the_checkpoint(tmp_path):
    out = render(tmp_path)
    assert json.loads((out / "tensorrt_llm/2/parameters.json").read_text())["checkpoint_dir"] == str(
        (tmp_path / "v1").resolve())


def test_shipped_version_2_is_the_int4_build_of_version_1(tmp_path):
    """What `make serve` renders (no --version-checkpoint): version 2's engine loads version 1's
    checkpoint quantised to int4 in groups of 32; version 1 keeps the config's parameters."""
    from trillm.triton.engine_host import EngineHostParams

    out = render(tmp_path)
    v1 = str((tmp_path / "v1").resolve())
    config = (out / "tensorrt_llm/config.pbtxt").read_text()
    parameters = {key: value for key, value in re.findall(r'key: "(\w+)"\s*value: \{ string_value: "([^"]*)" \}',
                                                           config)}
    assert (parameters["quantization"], parameters["checkpoint_dir"]) == ("none", v1)

    def loaded(version: str) -> EngineHostParams:
        args = {"model_config": json.dumps({"name": "tensorrt_llm", "parameters": {
            k: {"string_value": v} for k, v in parameters.items()}}),
            "model_repository": str(out / "tensorrt_llm"), "model_version": version}
        return model_parameters(args, EngineHostParams)

    first, second = loaded("1"), loaded("2")
    assert (first.checkpoint_dir, first.quantization) == (v1, "none")
    assert (second.checkpoint_dir, second.tokenizer_dir, second.quantization, second.quant_group_size) == (
        v1, v1, "int4", 32)


def test_a_checkpoint_for_a_version_that_takes_none_is_refused(tmp_path):
    with pytest.raises(VersionError, match="version\\(s\\) 3"):
        render(tmp_path, version_checkpoints={3: fake_checkpoint(tmp_path / "v3")})


# --- per-version parameters ----------------------------------------------------------------

@pytest.fixture
def version_args(tmp_path):
    def make(overrides: object | None, **config_params) -> dict:
        (tmp_path / "m" / "2").mkdir(parents=True, exist_ok=True)
        path = tmp_path / "m" / "2" / "parameters.json"
        path.unlink(missing_ok=True)
        if overrides is not None:
            path.write_text(overrides if isinstance(overrides, str) else json.dumps(overrides))
        config = {"name": "m", "parameters": {k: {"string_value": str(v)} for k, v in config_params.items()}}
        return {"model_config": json.dumps(config), "model_repository": str(tmp_path / "m"), "model_version": "2"}

    return make


def test_a_versions_parameters_override_the_config(version_args):
    from trillm.triton.engine_host import EngineHostParams

    args = version_args({"checkpoint_dir": "/ckpt/v2", "max_num_seqs": 8, "enable_prefix_caching": False},
                        checkpoint_dir="/ckpt/v1", max_num_seqs=4, block_size=32)
    params = model_parameters(args, EngineHostParams)
    assert (params.checkpoint_dir, params.max_num_seqs, params.enable_prefix_caching, params.block_size) == (
        "/ckpt/v2", 8, False, 32)
    assert model_parameters(version_args(None, checkpoint_dir="/ckpt/v1"), EngineHostParams).checkpoint_dir == (
        "/ckpt/v1")


@pytest.mark.parametrize("overrides,message", [
    ({"chekpoint_dir": "/x"}, r"unknown parameter\(s\) \['chekpoint_dir'\] in .*2/parameters.json"),
    ("{not json", "not valid JSON"),
    ([1, 2], "must be a JSON object"),
    ({"max_num_seqs": [8]}, "'max_num_seqs' must be a string, number or boolean"),
    ({"max_num_seqs": "many"}, "parameter 'max_num_seqs': expected int"),
])
def test_a_bad_parameters_json_fails_the_load_naming_it(version_args, overrides, message):
    from trillm.triton.engine_host import EngineHostParams

    with pytest.raises(ConfigError, match=message):
        model_parameters(version_args(overrides, checkpoint_dir="/c"), EngineHostParams)


def test_demo_version_2_is_the_same_model_with_weights_from_another_seed():
    import torch

    import trillm.demo_model as demo

    first, second = (demo._weights(demo.DEMO_SEEDS[v]) for v in (1, 2))
    assert {k: v.shape for k, v in first.items()} == {k: v.shape for k, v in second.items()}
    assert not torch.equal(first["lm_head.weight"], second["lm_head.weight"])
    assert demo.demo_dir(2) == demo.DEFAULT_DEMO_DIR.with_name("demo-model-v2")
    with pytest.raises(ValueError, match="versions \\[1, 2\\]"):
        demo.demo_dir(3)


# --- the admin key -------------------------------------------------------------------------------

def test_the_key_comes_from_the_environment_or_a_file(tmp_path):
    assert AdminKey.from_env({}) is None
    assert AdminKey.from_env({"TRILLM_ADMIN_KEY": KEY}).reveal() == KEY
    path = tmp_path / "key"
    path.write_text(KEY + "\n")
    key = AdminKey.from_env({"TRILLM_ADMIN_KEY_FILE": str(path)})
    assert key.reveal() == KEY and key.source == f"file {path}"
    with pytest.raises(ValueError, match="not both"):
        AdminKey.from_env({"TRILLM_ADMIN_KEY": KEY, "TRILLM_ADMIN_KEY_FILE": str(path)})
    with pytest.raises(ValueError, match="cannot read the admin key file"):
        AdminKey.from_env({"TRILLM_ADMIN_KEY_FILE": str(tmp_path / "missing")})


@pytest.mark.parametrize("value,message", [("k3y-x9", "shorter than 16"), ("has a space in it here", "visible ASCII"),
                                           ("", "visible ASCII"), ("line\nbreak-0123456789", "visible ASCII")])
def test_a_weak_or_unusable_key_is_refused_without_echoing_it(value, message):
    with pytest.raises(ValueError, match=message) as err:
        AdminKey(value, "TRILLM_ADMIN_KEY")
    assert not value or value not in str(err.value)


def test_the_key_never_shows(tmp_path):
    key = AdminKey(KEY, "TRILLM_ADMIN_KEY")
    assert KEY not in repr(key) and KEY not in str(key) and KEY not in f"{key}"
    assert key.headers("http") == {HTTP_HEADER: KEY} and key.headers("grpc") == {GRPC_HEADER: KEY}
    assert KEY not in refused_error("This API is restricted, expecting header 'admin-key'", key).message
    options = ServerOptions(model_repository=tmp_path, work_dir=tmp_path, model_control="explicit", admin_key=key)
    assert KEY not in repr(options)
    server = TritonServer(options)
    command = server.command(TritonInstall(binary=Path("/bin/tritonserver"), backend_dir=tmp_path), tmp_path)
    guard = f"{','.join(RESTRICTED_APIS)}:admin-key={KEY}"
    assert f"--http-restricted-api={guard}" in command and f"--grpc-restricted-protocol={guard}" in command
    assert "--model-control-mode=explicit" in command and "--load-model=*" in command
    shown = server.redacted(command)
    assert KEY not in shown and "admin-key=<admin key>" in shown


def test_explicit_model_control_without_a_key_is_refused(tmp_path):
    options = ServerOptions(model_repository=tmp_path, work_dir=tmp_path, model_control="explicit")
    with pytest.raises(LaunchError, match="TRILLM_ADMIN_KEY"):
        TritonServer(options).start()


# --- the guarded response sender -----------------------------------------------------------------

class FreeingSender(pb.ResponseSender):
    """Like the Python backend: is_cancelled after the final response reads freed memory (here: raises)."""

    def is_cancelled(self) -> bool:
        if self.done.is_set():
            raise AssertionError("is_cancelled() after the final response")
        return super().is_cancelled()


def test_no_is_cancelled_reaches_the_server_after_the_final_response():
    raw = FreeingSender()
    sender = GuardedSender(raw)
    assert sender.is_cancelled() is False
    sender.send(pb.InferenceResponse([]), flags=0)
    sender.send(flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
    assert sender.is_cancelled() is False and raw.done.is_set()


def test_a_watcher_thread_never_asks_after_the_final_response():
    for _ in range(50):
        raw = FreeingSender()
        sender = GuardedSender(raw)
        errors = []

        def watch():
            try:
                while not raw.done.is_set():
                    sender.is_cancelled()
                sender.is_cancelled()
            except AssertionError as exc:
                errors.append(exc)

        watcher = threading.Thread(target=watch)
        watcher.start()
        for _ in range(20):
            sender.send(pb.InferenceResponse([]), flags=0)
        sender.send(flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        watcher.join()
        assert not errors


# --- rollout on a fake server ---------------------------------------------------------------------

COMPOSING = Pipeline().composing


class FakeControl:
    """Triton's model control in memory: what a load does to versions, and the ensemble's pins."""

    url, protocol = "fake:8001", "grpc"

    def __init__(self, serving: int, composing: list[int], fail: set[tuple[str, int]] = frozenset(),
                 on_disk: tuple[int, ...] = (1, 2)):
        self.states = {m: {v: "READY" for v in composing} for m in COMPOSING}
        self.states["tensorrt_llm_bls"] = {serving: "READY"}
        self.states["ensemble"] = {serving: "READY"}
        self.configs = {m: {"name": m, "version_policy": {"latest": {"num_versions": 1}}} for m in self.states}
        self.configs["ensemble"]["ensemble_scheduling"] = {
            "step": [{"model_name": m, "model_version": str(serving)} for m in COMPOSING]}
        self.fail = fail
        self.on_disk = on_disk
        self.loads: list[tuple[str, list[int]]] = []
        self.unloads: list[str] = []

    def index(self):
        return [ModelInfo(m, str(v), s) for m, versions in self.states.items() for v, s in versions.items()]

    def config(self, model):
        if model not in self.configs:
            raise ModelNotFoundError(f"Request for unknown model: '{model}' is not found")
        return copy.deepcopy(self.configs[model])

    def load(self, model, config=None, files=None):
        versions = config["version_policy"]["specific"]["versions"]
        self.loads.append((model, versions))
        if files is None:  # like Triton: a specific policy loads the named versions that exist
            versions = [v for v in versions if v in self.on_disk]
            if not versions:
                raise InvalidInputError(f"at least one version must be available under the version policy of "
                                        f"model '{model}'")
        if any((model, v) in self.fail for v in versions):
            raise InvalidInputError(f"load failed for model '{model}': version {versions[-1]} is broken")
        for step in config.get("ensemble_scheduling", {}).get("step", []):
            if self.states[step["model_name"]].get(int(step["model_version"])) != "READY":
                raise InvalidInputError(f"ensemble '{model}' depends on '{step['model_name']}' whose required "
                                        f"version {step['model_version']} is not loaded")
        old = self.states.get(model, {})
        self.states[model] = {**{v: "UNAVAILABLE" for v in old}, **{v: "READY" for v in versions}}
        self.configs[model] = copy.deepcopy(config)

    def unload(self, model):
        self.unloads.append(model)
        self.states[model] = {v: "UNAVAILABLE" for v in self.states[model]}

    def serving(self):
        return Rollout(self).state().serving(Pipeline())


class Probe:
    def __init__(self, failing: set[tuple[str, int]] = frozenset()):
        self.failing = failing
        self.calls: list[tuple[str, int]] = []

    def __call__(self, model, version, canary):
        self.calls.append((model, version))
        return ["the text was empty"] if (model, version) in self.failing else []


def rollout(control, probe):
    lines = []
    return Rollout(control, probe=probe, say=lines.append, drain_timeout=1), lines


def test_rollout_stages_canaries_promotes_and_keeps_the_old_version_loaded():
    control, probe = FakeControl(serving=1, composing=[1]), Probe()
    report = rollout(control, probe)[0].to(2)
    assert (report.from_version, report.to_version, report.staged) == (1, 2, list(COMPOSING))
    assert control.serving() == 2
    assert all(control.states[m] == {1: "READY", 2: "READY"} for m in COMPOSING)
    assert control.states["tensorrt_llm_bls"] == {1: "UNAVAILABLE", 2: "READY"}
    assert [s["model_version"] for s in control.configs["ensemble"]["ensemble_scheduling"]["step"]] == [2, 2, 2]
    assert probe.calls == [("ensemble_canary", 2), ("ensemble", 2), ("tensorrt_llm_bls", 2)]
    canary = control.configs["ensemble_canary"]
    assert canary["name"] == "ensemble_canary" and canary["version_policy"] == {"specific": {"versions": [2]}}
    assert control.unloads == ["ensemble_canary"]
    # frontends reloaded only after the canary passed
    assert [m for m, _ in control.loads].index("ensemble_canary") < [m for m, _ in control.loads].index("ensemble")


def test_a_failed_canary_unloads_the_new_version_and_keeps_the_old_default():
    control, probe = FakeControl(serving=1, composing=[1]), Probe({("ensemble_canary", 2)})
    with pytest.raises(RolloutError, match="canary of version 2 failed .*empty.*version 1 is still the default"):
        rollout(control, probe)[0].to(2)
    assert control.serving() == 1 and control.unloads == ["ensemble_canary"]
    assert all(control.states[m][1] == "READY" and control.states[m][2] == "UNAVAILABLE" for m in COMPOSING)
    assert not any(m in ("ensemble", "tensorrt_llm_bls") for m, _ in control.loads)


def test_a_version_that_fails_to_load_is_named_and_the_others_are_put_back():
    control = FakeControl(serving=1, composing=[1], fail={("tensorrt_llm", 2)})
    with pytest.raises(RolloutError, match="tensorrt_llm: load failed.*version 1 is still the default"):
        rollout(control, Probe())[0].to(2)
    assert control.serving() == 1
    assert {m: sorted(v for v, s in control.states[m].items() if s == "READY") for m in COMPOSING} == {
        m: [1] for m in COMPOSING}


def test_a_version_missing_from_the_servers_repository_is_named():
    control = FakeControl(serving=2, composing=[1, 2])
    with pytest.raises(RolloutError, match="version 9 did not load.*version 2 is still the default"):
        rollout(control, Probe())[0].to(9)
    assert control.serving() == 2
    assert all(sorted(v for v, s in control.states[m].items() if s == "READY") == [1, 2] for m in COMPOSING)


def test_a_failure_after_promotion_puts_the_frontends_back():
    control, probe = FakeControl(serving=1, composing=[1]), Probe({("tensorrt_llm_bls", 2)})
    with pytest.raises(RolloutError, match="failed after promotion.*version 1 is the default again"):
        rollout(control, probe)[0].to(2)
    assert control.serving() == 1 and control.states["tensorrt_llm_bls"][1] == "READY"


def test_rollback_goes_to_the_loaded_earlier_version_without_staging():
    control = FakeControl(serving=2, composing=[1, 2])
    report = rollout(control, Probe())[0].back()
    assert (report.from_version, report.to_version, report.staged) == (2, 1, [])
    assert control.serving() == 1 and not any(m in COMPOSING for m, _ in control.loads)


def test_rollback_without_an_earlier_version_loaded_says_so():
    with pytest.raises(RolloutError, match="no version before 1 is loaded"):
        rollout(FakeControl(serving=1, composing=[1, 2]), Probe())[0].back()


def test_rolling_out_the_default_version_does_nothing():
    control = FakeControl(serving=1, composing=[1])
    assert rollout(control, Probe())[0].to(1).staged == [] and control.loads == []


def test_a_mixed_pipeline_is_reported_not_rolled_out():
    control = FakeControl(serving=1, composing=[1, 2])
    control.configs["ensemble"]["ensemble_scheduling"]["step"][1]["model_version"] = "2"
    with pytest.raises(RolloutError, match="mixed pipeline"):
        rollout(control, Probe())[0].to(2)


# --- A/B split ------------------------------------------------------------------------------------

class FakeClient:
    def __init__(self, version, fail_every=0):
        self.version, self.fail_every, self.calls = version, fail_every, 0

    def generate(self, prompt, max_tokens, **sampling):
        self.calls += 1
        if self.fail_every and self.calls % self.fail_every == 0:
            raise UnavailableError("connection reset")
        return type("Done", (), {"model_version": self.version, "text": f"v{self.version}"})()

    def close(self):
        pass


def split(weights, seed=7, fail=None):
    clients = {}

    def make(version):
        clients[version] = FakeClient(version, (fail or {}).get(version, 0))
        return clients[version]

    return TrafficSplit(weights, seed=seed, make_client=make), clients


def test_the_split_follows_the_weights_and_repeats_with_a_seed():
    a, b, other = (split({"1": 0.9, 2: 0.1}, seed=seed)[0] for seed in (7, 7, 8))
    picks = [a.choose() for _ in range(5000)]
    assert picks == [b.choose() for _ in range(5000)] != [other.choose() for _ in range(5000)]
    assert 0.87 < picks.count("1") / len(picks) < 0.93 and set(picks) == {"1", "2"}


def test_a_zero_weight_version_gets_nothing():
    s, clients = split({"1": 0, "2": 1, "3": 0})
    assert {s.choose() for _ in range(1000)} == {"2"} and set(clients) == {"2"}


def test_per_version_stats_count_requests_errors_and_latency():
    s, clients = split({"1": 1, "2": 1}, fail={"2": 3})
    results = s.generate_many(["hi"] * 40, 4, concurrency=4)
    stats = s.stats()
    assert sum(st.requests for st in stats.values()) == 40
    assert stats["1"].error_count == 0 and stats["2"].errors == {"UnavailableError": clients["2"].calls // 3}
    for result in results:
        if not isinstance(result, UnavailableError):
            version, completion = result
            assert completion.model_version == version
    assert len(stats["1"].latencies) == stats["1"].requests and stats["1"].quantile(0.95) >= stats["1"].quantile(0.5)
    report = s.report()
    assert report.splitlines()[0].split()[:4] == ["VERSION", "WEIGHT", "REQUESTS", "ERRORS"] and "50%" in report


@pytest.mark.parametrize("weights,message", [({}, "at least one version"), ({"x": 1}, "positive integer"),
                                             ({"1": -1}, ">= 0"), ({"1": 0}, "one weight must be > 0"),
                                             ({"1": float("nan")}, "finite")])
def test_bad_weights_are_named(weights, message):
    with pytest.raises(ValueError, match=message):
        check_weights(weights)


def test_a_split_parses_from_the_command_line():
    assert parse_split("1=90,2=10") == {"1": 90.0, "2": 10.0}
    with pytest.raises(ValueError, match="VERSION=WEIGHT"):
        parse_split("1:90")


def test_canary_defaults_are_short():
    assert Canary().max_tokens <= 32 and len(Canary().prompts) >= 2


# --- stopping leaves no stub behind ---------------------------------------------------------------

def test_stop_kills_a_stub_that_outlived_its_server(tmp_path):
    """A stub stuck in its model's finalize when tritonserver exits would run forever."""
    backend_dir = tmp_path / "backends"
    stub = backend_dir / "python" / "triton_python_backend_stub"
    server = TritonServer(ServerOptions(model_repository=tmp_path, work_dir=tmp_path))
    # A "server" that starts a "stub" in its process group and exits at once.
    server.process = subprocess.Popen(
        ["bash", "-c", f"(exec -a {stub} sleep 300) & echo $!"], stdout=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    straggler = int(server.process.stdout.readline())
    server.process.wait(timeout=10)
    server._backend_dir = backend_dir
    os.kill(straggler, 0)  # alive, its server gone
    started = time.monotonic()  # the background subshell may not have exec'd as the stub yet
    while not Path(f"/proc/{straggler}/cmdline").read_bytes().startswith(str(stub).encode()):
        assert time.monotonic() - started < 10, "the fake stub never started"
        time.sleep(0.01)
    server.stop()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(straggler, 0)
        except ProcessLookupError:
            break
        if Path(f"/proc/{straggler}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            break  # killed, waiting for its parent (init) to reap it
        time.sleep(0.05)
    else:
        os.kill(straggler, 9)
        pytest.fail("the stray stub outlived stop()")
