"""The nginx config generator (trillm.lb) and the compose deployment that runs it.

The compose side cannot start here (no docker engine in `make test`), so these
check what can be checked without one: that docker-compose.yml wires the
balancer to every replica's ports, that the image's entrypoint renders a
config Debian's nginx accepts (`nginx -t`), and `docker-compose config` where
a compose tool is installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from trillm import lb

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
ENTRYPOINT = ROOT / "deploy" / "nginx" / "entrypoint.sh"
DEFAULT = re.compile(r"\$\{(\w+):-([^}]*)\}")


def _config(tmp_path: Path, **overrides) -> lb.BalancerConfig:
    replicas = [lb.Replica("127.0.0.1", 8100, 8101), lb.Replica("127.0.0.1", 8110, 8111)]
    return lb.BalancerConfig(**{"replicas": replicas, "work_dir": tmp_path, **overrides})


@pytest.mark.unit
def test_every_replica_is_in_the_http_and_grpc_upstreams(tmp_path):
    text = lb.render(_config(tmp_path, max_fails=3, fail_timeout=7))
    for port in (8100, 8101, 8110, 8111):
        assert f"server 127.0.0.1:{port} max_fails=3 fail_timeout=7s;" in text
    assert text.count("least_conn;") == 2
    assert "trillm_openai" not in text  # the replicas have no OpenAI port


@pytest.mark.unit
def test_openai_is_proxied_only_when_every_replica_serves_it(tmp_path):
    both = [lb.Replica("127.0.0.1", 8100, 8101, 9100), lb.Replica("127.0.0.1", 8110, 8111, 9110)]
    text = lb.render(_config(tmp_path, replicas=both, openai_port=9000))
    assert "listen 127.0.0.1:9000;" in text and "server 127.0.0.1:9110" in text
    one = [both[0], lb.Replica("127.0.0.1", 8110, 8111)]
    assert "listen 127.0.0.1:9000;" not in lb.render(_config(tmp_path, replicas=one))


@pytest.mark.unit
def test_streams_pass_unbuffered(tmp_path):
    text = lb.render(_config(tmp_path))
    stream = text.index("generate_stream$ {")
    assert "proxy_buffering off;" in text[stream:text.index("}", stream)]


@pytest.mark.unit
@pytest.mark.parametrize("spec, rule", [
    ("127.0.0.1:8100", "HOST:HTTP_PORT:GRPC_PORT"),
    ("127.0.0.1:http:8101", "HOST:HTTP_PORT:GRPC_PORT"),
    (":8100:8101", "HOST:HTTP_PORT:GRPC_PORT"),
])
def test_a_malformed_replica_is_refused_by_its_rule(spec, rule):
    with pytest.raises(lb.BalancerError, match=rule):
        lb.Replica.parse(spec)


@pytest.mark.unit
@pytest.mark.parametrize("overrides, rule", [
    ({"replicas": []}, "at least one replica"),
    ({"replicas": [lb.Replica("127.0.0.1", 1, 2)] * 2}, "listed twice"),
    ({"http_port": 8001, "grpc_port": 8001}, "distinct"),
    ({"fail_timeout": 0}, "fail_timeout must be at least 1"),
])
def test_a_bad_config_is_refused_by_its_rule(tmp_path, overrides, rule):
    with pytest.raises(lb.BalancerError, match=rule):
        lb.render(_config(tmp_path, **overrides))


def _compose_defaults(value: str) -> str:
    """A compose value with each ${VAR:-default} replaced by its default."""
    return DEFAULT.sub(lambda m: m.group(2), str(value))


@pytest.mark.unit
def test_compose_balancer_points_at_every_replica_port():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    balancer = services["lb"]
    replicas = sorted(name for name, s in services.items() if "lb" in s.get("profiles", []) and name != "lb")
    assert replicas == sorted(balancer["depends_on"]), "lb must wait for every replica"
    targets = {lb.Replica.parse(text) for text in
               _compose_defaults(balancer["environment"]["TRILLM_LB_REPLICAS"]).split(",")}
    kinds = ("HTTP_PORT", "GRPC_PORT", "OPENAI_PORT")
    ports = {lb.Replica("127.0.0.1", *(int(_compose_defaults(services[n]["environment"][k])) for k in kinds))
             for n in replicas}
    assert targets == ports
    # The balancer stands in for the single server: the same ports.
    own = {_compose_defaults(balancer["environment"][k]) for k in kinds}
    assert own == {_compose_defaults(services["triton"]["environment"][k]) for k in kinds}


@pytest.mark.scale
def test_image_entrypoint_renders_a_config_nginx_accepts(tmp_path):
    try:
        lb.find_nginx()
    except lb.BalancerError as exc:
        pytest.skip(str(exc))
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    env = {**os.environ, "TRILLM_LB_SCRIPT": str(ROOT / "backends" / "trillm" / "lb.py"),
           "TRILLM_LB_WORK_DIR": str(tmp_path),
           **{k: _compose_defaults(v) for k, v in services["lb"]["environment"].items()}}
    checked = subprocess.run(["sh", str(ENTRYPOINT), "-t"], env=env, capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    assert "test is successful" in checked.stderr
    rendered = (tmp_path / "nginx.conf").read_text()
    assert "upstream trillm_grpc" in rendered and "upstream trillm_openai" in rendered


@pytest.mark.unit
def test_compose_file_is_valid_for_docker_compose(tmp_path):
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.skip("docker-compose is not installed (docker/ensure_docker.sh installs it; no engine is needed)")
    # An empty env file: the defaults in docker-compose.yml, not a local .env.
    (tmp_path / "env").write_text("")
    checked = subprocess.run([tool, "--project-directory", str(ROOT), "-f", str(COMPOSE), "--env-file",
                              str(tmp_path / "env"), "--profile", "lb", "--profile", "gpu", "--profile", "load",
                              "config", "-q"], capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stderr
