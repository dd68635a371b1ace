"""deploy/k8s renders (`kubectl kustomize`, offline) and validates against
Kubernetes' schemas (kubernetes-validate, offline), and its parts agree.

No cluster is reachable here, so nothing is applied. Built-in kinds are
validated strictly (unknown fields are errors, as `kubectl apply` with its
default strict field validation makes them). The custom resources
(ServiceMonitor, KServe's ServingRuntime and InferenceService) have no schema
in kubernetes-validate and no offline package ships their CRDs: the Kubernetes
types they embed (object metadata, containers, resources, label selectors)
are validated strictly against the built-in schemas, and what refers to what
is checked below; the rest of their fields is checked only by a cluster that
has the CRDs installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
# The oldest Kubernetes release still maintained when these were written.
KUBERNETES_VERSION = "1.30"
DEFINITIONS = "https://kubernetes.io/api/_definitions.json#/$defs/"
# Custom resources: where they embed built-in types (path from the object, type).
EMBEDDED = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): [
        (("spec", "selector"), "io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector"),
    ],
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): [
        (("spec", "containers", "*"), "io.k8s.api.core.v1.Container"),
    ],
    ("serving.kserve.io/v1beta1", "InferenceService"): [
        (("spec", "predictor", "model", "resources"), "io.k8s.api.core.v1.ResourceRequirements"),
    ],
}
TARGETS = ("overlays/cpu", "overlays/gpu", "kserve")


def _kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        pytest.skip("kubectl is not installed (it renders Kustomize offline; Debian: kubernetes-client)")
    return found


def render(target: str) -> list[dict]:
    out = subprocess.run([_kubectl(), "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {target}: {out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def _at(obj, path: tuple[str, ...]):
    if not path:
        yield obj
        return
    head, rest = path[0], path[1:]
    if head == "*":
        for item in obj:
            yield from _at(item, rest)
    else:
        assert head in obj, f"missing {head!r}"
        yield from _at(obj[head], rest)


def _validate_embedded(doc: dict) -> None:
    import jsonschema
    import kubernetes_validate.utils as kv
    from referencing import Registry, Resource

    key = (doc["apiVersion"], doc["kind"])
    assert key in EMBEDDED, f"{key} is neither a built-in kind nor a custom resource these tests know"
    version = next(v for v in reversed(kv.all_versions()) if kv.major_minor(v) <= KUBERNETES_VERSION)
    definitions = kv.schema_contents(f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", version)
    registry = Resource.from_contents(definitions) @ Registry()
    checks = [(("metadata",), "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"), *EMBEDDED[key]]
    for path, definition in checks:
        validator = jsonschema.Draft202012Validator({"$ref": DEFINITIONS + definition}, registry=registry)
        for part in _at(doc, path):
            errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(part)]
            assert not errors, f"{doc['kind']} {'.'.join(path)} is not a valid {definition}: {errors}"


@pytest.mark.parametrize("target", TARGETS)
def test_renders_and_validates(target):
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError

    docs = render(target)
    assert docs
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except SchemaNotFoundError:
            _validate_embedded(doc)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(map(str, exc.path))
            pytest.fail(f"{target}: {doc['kind']}/{doc['metadata']['name']} {where}: {exc.message}")


def _matches(selector: dict, labels: dict) -> bool:
    return selector.items() <= labels.items()


def _container(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


@pytest.mark.parametrize("target", ("overlays/cpu", "overlays/gpu"))
def test_service_monitor_hpa_and_pdb_find_the_server(target):
    docs = render(target)
    (deployment,) = of_kind(docs, "Deployment")
    (service,) = of_kind(docs, "Service")
    (monitor,) = of_kind(docs, "ServiceMonitor")
    (hpa,) = of_kind(docs, "HorizontalPodAutoscaler")
    (pdb,) = of_kind(docs, "PodDisruptionBudget")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    container = _container(deployment)
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    assert _matches(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    assert _matches(service["spec"]["selector"], pod_labels)
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(container_ports)
    assert {"http", "grpc", "metrics", "openai"} <= {p["name"] for p in service["spec"]["ports"]}
    env = _env(container)
    for name in ("http", "grpc", "metrics", "openai"):
        assert env[f"{name.upper()}_PORT"] == str(container_ports[name]), f"{name}: env and containerPort differ"
    assert env["TRILLM_HOST"] == "0.0.0.0"
    assert _matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert _matches(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["maxUnavailable"], "a drain must leave a replica serving"


def test_hpa_metrics_come_from_the_adapter_and_the_engine():
    (hpa,) = of_kind(render("overlays/cpu"), "HorizontalPodAutoscaler")
    wanted = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    assert wanted
    rules = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())["rules"]["custom"]
    served = {rule["name"]["as"] for rule in rules}
    assert wanted <= served, f"the adapter serves {served}, the HPA asks for {wanted}"
    series = {re.match(r"(\w+)\{", rule["seriesQuery"]).group(1) for rule in rules}
    exported = set(re.findall(r'"(trillm_\w+)"', (ROOT / "backends" / "trillm" / "triton" / "metrics.py").read_text()))
    assert series <= exported, f"the adapter reads {series - exported}, which the engine does not export"


def _compose_start_period(service: str) -> int:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    healthcheck = services[service]["healthcheck"]
    start = healthcheck.get("start_period") or services["triton"]["healthcheck"]["start_period"]
    return int(str(start).rstrip("s"))


@pytest.mark.parametrize("target, compose_service", [("overlays/cpu", "triton"), ("overlays/gpu", "triton-gpu")])
def test_probes_and_grace_period_fit_model_load_and_drain(target, compose_service):
    (deployment,) = of_kind(render(target), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = _container(deployment)
    startup = container["startupProbe"]
    # The same load time the compose health check allows.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= _compose_start_period(compose_service)
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    args = container["args"]
    drain = float(args[args.index("--drain-timeout") + 1])
    assert pod["terminationGracePeriodSeconds"] > float(pre_stop[1]) + drain, (
        "the kubelet would kill the server before its drain ends")


def test_kserve_inference_service_uses_the_trillm_runtime():
    docs = render("kserve")
    (runtime,) = of_kind(docs, "ServingRuntime")
    (service,) = of_kind(docs, "InferenceService")
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    (container,) = runtime["spec"]["containers"]
    assert [p["containerPort"] for p in container["ports"]] == [int(_env(container)["HTTP_PORT"])]
    assert container["args"][container["args"].index("--checkpoint") + 1] == "/mnt/models"  # storageUri's mount
