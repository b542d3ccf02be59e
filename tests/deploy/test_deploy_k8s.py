"""deploy/k8s: the core kinds pass kubernetes-validate (strict: unknown fields fail), and the
manifests agree with the code: the queues each worker consumes (contract.names), the queues
KEDA scales on, the settings names, the images, the metrics port.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from deploy_helpers import K8S_DIR, load_yaml_documents, option_value

from contract.names import QUEUE_CPU, QUEUE_GPU, row_queue
from worker.lane.transport import priority_lists

KUSTOMIZATION = K8S_DIR / "kustomization.yaml"
# The oldest Kubernetes release the manifests are meant for, and the newest the validator knows.
K8S_VERSIONS = ("1.30.0", "latest")
KEDA_API = "keda.sh/v1alpha1"
WORKER_QUEUES = {"worker-cpu": QUEUE_CPU, "worker-gpu": QUEUE_GPU}


@pytest.fixture(scope="module")
def kustomization() -> dict[str, Any]:
    return yaml.safe_load(KUSTOMIZATION.read_text())


@pytest.fixture(scope="module")
def documents(kustomization: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        doc for name in kustomization["resources"] for doc in load_yaml_documents(K8S_DIR / name)
    ]


@pytest.fixture(scope="module")
def by_kind(documents: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for doc in documents:
        name = doc["metadata"]["name"]
        assert name not in out.setdefault(doc["kind"], {}), f"two {doc['kind']}s named {name}"
        out[doc["kind"]][name] = doc
    return out


def _core(documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in documents if d["apiVersion"] != KEDA_API]


def _container(deployment: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    if name is None:
        [container] = containers
        return container
    return next(c for c in containers if c["name"] == name)


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def _pod_specs(documents: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (d["metadata"]["name"], d["spec"]["template"]["spec"])
        for d in documents
        if d["kind"] in ("Deployment", "Job")
    ]


# --------------------------------------------------------------------------
# Schema validation
# --------------------------------------------------------------------------


def _validator() -> Any:
    return pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (dev extra)"
    )


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_kinds_validate(documents: list[dict[str, Any]], version: str) -> None:
    kv = _validator()
    target = kv.latest_version() if version == "latest" else version
    core = _core(documents)
    assert {d["kind"] for d in core} >= {"Deployment", "Service", "ConfigMap", "Job"}
    for doc in core:
        kv.validate(doc, target, strict=True)


def test_validation_is_strict(by_kind: dict[str, dict[str, dict[str, Any]]]) -> None:
    """A misspelt field fails validation rather than being dropped by the API server."""
    kv = _validator()
    broken = yaml.safe_load(yaml.safe_dump(by_kind["Deployment"]["worker-cpu"]))
    broken["spec"]["replica"] = 2
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, kv.latest_version(), strict=True)


def test_kustomization_lists_every_manifest(kustomization: dict[str, Any]) -> None:
    files = {p.name for p in K8S_DIR.glob("*.yaml")} - {KUSTOMIZATION.name}
    assert sorted(kustomization["resources"]) == sorted(files)
    assert kustomization["namespace"]


def test_every_image_is_set_by_the_kustomization(
    kustomization: dict[str, Any], documents: list[dict[str, Any]]
) -> None:
    images = {i["name"] for i in kustomization["images"]}
    ours = set()
    for _, spec in _pod_specs(documents):
        for c in spec.get("initContainers", []) + spec["containers"]:
            name = c["image"].split(":")[0]
            if name.startswith("queue-inference"):
                ours.add(name)
    assert ours == images


# --------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(WORKER_QUEUES))
def test_worker_consumes_its_queue(
    by_kind: dict[str, dict[str, dict[str, Any]]], name: str
) -> None:
    argv = _container(by_kind["Deployment"][name], "worker")["command"]
    assert argv[:4] == ["celery", "-A", "worker", "worker"]
    assert option_value(argv, "-Q", "--queues") == WORKER_QUEUES[name]


def test_gpu_worker_has_one_gpu_and_one_process(
    by_kind: dict[str, dict[str, dict[str, Any]]],
) -> None:
    deployment = by_kind["Deployment"]["worker-gpu"]
    container = _container(deployment, "worker")
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert option_value(container["command"], "-P", "--pool") == "solo"
    assert container["image"].startswith("queue-inference-worker-gpu:")
    env = _env(container)
    assert env["INFERENCE_PROVIDER"] == "cuda"
    assert env["INFERENCE_ALLOW_CPU_FALLBACK"] == "false"


def test_cpu_worker_uses_the_cpu_image(by_kind: dict[str, dict[str, dict[str, Any]]]) -> None:
    container = _container(by_kind["Deployment"]["worker-cpu"], "worker")
    assert container["image"].startswith("queue-inference-worker:")
    assert option_value(container["command"], "-P", "--pool") == "prefork"
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})


@pytest.mark.parametrize("name", sorted(WORKER_QUEUES))
def test_worker_serves_metrics_on_its_port(
    by_kind: dict[str, dict[str, dict[str, Any]]], name: str
) -> None:
    deployment = by_kind["Deployment"][name]
    container = _container(deployment, "worker")
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"]
    assert _env(container)["INFERENCE_METRICS_PORT"] == str(port)
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)
    # The headless Service that lists the worker pods selects this one.
    service = by_kind["Service"]["worker-metrics"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["clusterIP"] == "None"


def test_beat_is_single(by_kind: dict[str, dict[str, dict[str, Any]]]) -> None:
    beat = by_kind["Deployment"]["beat"]
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"]["type"] == "Recreate", "a rolling update runs two beats"
    assert _container(beat)["command"][:4] == ["celery", "-A", "worker", "beat"]
    assert "beat" not in by_kind.get("ScaledObject", {})


def test_exporter_is_single_and_served(by_kind: dict[str, dict[str, dict[str, Any]]]) -> None:
    exporter = by_kind["Deployment"]["exporter"]
    assert exporter["spec"]["replicas"] == 1
    argv = _container(exporter)["command"]
    assert argv[:4] == ["python", "-m", "producer", "metrics"]
    port = int(option_value(argv, "--port") or 0)
    [service_port] = by_kind["Service"]["exporter"]["spec"]["ports"]
    assert service_port["port"] == port


def test_pods_run_as_the_images_user(documents: list[dict[str, Any]]) -> None:
    for name, spec in _pod_specs(documents):
        if name == "redis":
            continue
        context = spec["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] == 10001, name


def test_settings_names_are_real(documents: list[dict[str, Any]], env_names: set[str]) -> None:
    named = set()
    for doc in documents:
        if doc["kind"] == "ConfigMap":
            named |= set(doc["data"])
    for _, spec in _pod_specs(documents):
        for c in spec["containers"]:
            named |= set(_env(c))
    inference = {n for n in named if n.startswith("INFERENCE_")}
    assert inference
    assert not inference - env_names, sorted(inference - env_names)


# --------------------------------------------------------------------------
# KEDA
# --------------------------------------------------------------------------


def _redis_address(by_kind: dict[str, dict[str, dict[str, Any]]], namespace: str) -> str:
    [service_port] = by_kind["Service"]["redis"]["spec"]["ports"]
    return f"redis.{namespace}.svc.cluster.local:{service_port['port']}"


@pytest.mark.parametrize("name", sorted(WORKER_QUEUES))
def test_scaled_object_per_worker_on_its_queues(
    by_kind: dict[str, dict[str, dict[str, Any]]], kustomization: dict[str, Any], name: str
) -> None:
    """Each worker Deployment scales on the lengths of the lists its workers consume: the
    queue of its -Q and that queue's row queue (contract.names), each with kombu's lists
    for jobs sent with a priority."""
    scaled = by_kind["ScaledObject"][name]
    assert scaled["apiVersion"] == KEDA_API
    assert scaled["spec"]["scaleTargetRef"]["name"] in by_kind["Deployment"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == name
    queue = WORKER_QUEUES[name]
    triggers = scaled["spec"]["triggers"]
    assert {t["type"] for t in triggers} == {"redis"}
    expected = priority_lists(queue) + priority_lists(row_queue(queue))
    assert [t["metadata"]["listName"] for t in triggers] == expected
    config = by_kind["ConfigMap"]["inference-config"]["data"]
    broker_db = urlparse(config["REDIS_URL"]).path.lstrip("/") or "0"
    for trigger in triggers:
        meta = trigger["metadata"]
        # KEDA's operator runs in another namespace: the address is fully qualified.
        assert meta["address"] == _redis_address(by_kind, kustomization["namespace"])
        assert meta["databaseIndex"] == broker_db
        assert int(meta["listLength"]) >= 1
    spec = scaled["spec"]
    assert 0 <= spec.get("minReplicaCount", 0) <= spec["maxReplicaCount"]


def test_every_worker_deployment_is_scaled(by_kind: dict[str, dict[str, dict[str, Any]]]) -> None:
    workers = {
        name
        for name, d in by_kind["Deployment"].items()
        if any(
            c.get("command", [])[:4] == ["celery", "-A", "worker", "worker"]
            for c in d["spec"]["template"]["spec"]["containers"]
        )
    }
    assert workers == set(WORKER_QUEUES) == set(by_kind["ScaledObject"])


def test_the_cpu_queue_keeps_a_worker(by_kind: dict[str, dict[str, dict[str, Any]]]) -> None:
    """The health task goes to the CPU queue: its workers never scale to zero."""
    assert by_kind["ScaledObject"]["worker-cpu"]["spec"]["minReplicaCount"] >= 1


def test_a_worker_scaled_to_zero_wakes_on_any_job(
    by_kind: dict[str, dict[str, dict[str, Any]]],
) -> None:
    """Where the replicas may go to zero, one waiting job on any list brings a worker back."""
    for name, scaled in by_kind["ScaledObject"].items():
        if scaled["spec"].get("minReplicaCount", 0) == 0:
            for trigger in scaled["spec"]["triggers"]:
                assert trigger["metadata"].get("activationListLength") == "0", name
