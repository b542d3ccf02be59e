"""docker-compose.yml is consistent with the code it deploys.

Queue names come from contract.names, variable names from the settings
classes: a rename there that the compose file misses fails here.
"""

from __future__ import annotations

import os
import re
from typing import Any

import pytest
from deploy_helpers import (
    REPO_ROOT,
    command_argv,
    interpolated_names,
    option_value,
    resolve_defaults,
    service_environment,
    settings_classes,
)

from contract.names import QUEUE_CPU, QUEUE_GPU

WORKER_SERVICES = ("worker-cpu", "worker-gpu")
# Services that import the Celery app or the producer and so need Redis.
REDIS_CLIENTS = ("worker-cpu", "worker-gpu", "beat", "producer", "exporter", "flower")


def _celery_argv(service: dict[str, Any]) -> list[str]:
    argv = command_argv(resolve_defaults(service.get("command")))
    assert argv[:3] == ["celery", "-A", "worker"], f"not a celery command of the worker app: {argv}"
    return argv


def _volume_mounts(service: dict[str, Any]) -> list[dict[str, Any]]:
    """Volumes in long syntax, the short syntax converted."""
    mounts = []
    for vol in service.get("volumes", []):
        if isinstance(vol, str):
            parts = vol.split(":")
            mounts.append(
                {
                    "type": "volume",
                    "source": parts[0],
                    "target": parts[1],
                    "read_only": len(parts) > 2 and "ro" in parts[2].split(","),
                }
            )
        else:
            mounts.append(vol)
    return mounts


def _mount_at(service: dict[str, Any], target: str) -> dict[str, Any]:
    for mount in _volume_mounts(service):
        if mount["target"] == target:
            return mount
    raise AssertionError(f"nothing mounted at {target}")


# --------------------------------------------------------------------------
# Services present, and the workers' commands
# --------------------------------------------------------------------------


def test_expected_services(services: dict[str, Any]) -> None:
    for name in ("redis", "train", "worker-cpu", "worker-gpu", "beat"):
        assert name in services, f"service {name} is missing"


def test_cpu_worker_consumes_the_cpu_queue(services: dict[str, Any]) -> None:
    argv = _celery_argv(services["worker-cpu"])
    assert argv[3] == "worker"
    assert option_value(argv, "-Q", "--queues") == QUEUE_CPU


def test_gpu_worker_consumes_the_gpu_queue(services: dict[str, Any]) -> None:
    argv = _celery_argv(services["worker-gpu"])
    assert argv[3] == "worker"
    assert option_value(argv, "-Q", "--queues") == QUEUE_GPU


def test_gpu_worker_runs_one_process(services: dict[str, Any]) -> None:
    """A forked child must not inherit a CUDA context: solo (or threads), never prefork."""
    argv = _celery_argv(services["worker-gpu"])
    assert option_value(argv, "-P", "--pool") in ("solo", "threads")


def test_cpu_worker_pool_and_default_concurrency(services: dict[str, Any]) -> None:
    argv = _celery_argv(services["worker-cpu"])
    assert option_value(argv, "-P", "--pool") == "prefork"
    concurrency = option_value(argv, "-c", "--concurrency")
    assert concurrency is not None and concurrency.isdigit() and int(concurrency) >= 1


def test_concurrency_is_tunable(services: dict[str, Any]) -> None:
    raw = command_argv(services["worker-cpu"]["command"])
    concurrency = option_value(raw, "-c", "--concurrency")
    assert concurrency is not None and concurrency.startswith("${"), (
        "the CPU worker's concurrency should come from ${VAR:-default}"
    )


def test_beat_schedule_is_writable_and_beat_is_single(services: dict[str, Any]) -> None:
    beat = services["beat"]
    argv = _celery_argv(beat)
    assert argv[3] == "beat"
    schedule = option_value(argv, "-s", "--schedule")
    assert schedule is not None and schedule.startswith("/tmp/"), (
        "the non-root image can only write the beat schedule under /tmp"
    )
    assert beat.get("deploy", {}).get("replicas", 1) == 1, "a second beat doubles every schedule"
    # The image's health check pings a worker node, which beat is not.
    assert beat.get("healthcheck", {}).get("disable") is True


# --------------------------------------------------------------------------
# GPU service
# --------------------------------------------------------------------------


def test_gpu_worker_is_behind_the_gpu_profile(services: dict[str, Any]) -> None:
    assert services["worker-gpu"].get("profiles") == ["gpu"]
    for name, service in services.items():
        if name != "worker-gpu":
            assert "gpu" not in service.get("profiles", []), f"{name} must start without a GPU"


def test_gpu_worker_reserves_an_nvidia_gpu(services: dict[str, Any]) -> None:
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia"
        and "gpu" in d.get("capabilities", [])
        and (d.get("count") == 1 or len(d.get("device_ids", [])) == 1)
        for d in devices
    ), f"no reservation of exactly one nvidia GPU: {devices}"


def test_worker_providers(services: dict[str, Any]) -> None:
    gpu_env = resolve_defaults(service_environment(services["worker-gpu"]))
    cpu_env = resolve_defaults(service_environment(services["worker-cpu"]))
    assert gpu_env.get("INFERENCE_PROVIDER") == "cuda"
    assert cpu_env.get("INFERENCE_PROVIDER", "cpu") == "cpu"


def test_workers_build_from_the_right_dockerfile(services: dict[str, Any]) -> None:
    assert services["worker-cpu"]["build"]["dockerfile"] == "Dockerfile.worker"
    assert services["worker-gpu"]["build"]["dockerfile"] == "Dockerfile.worker-gpu"
    assert services["train"]["build"]["dockerfile"] == "Dockerfile.worker"


def test_build_targets_exist(services: dict[str, Any], cpu_dockerfile, gpu_dockerfile) -> None:
    dockerfiles = {"Dockerfile.worker": cpu_dockerfile, "Dockerfile.worker-gpu": gpu_dockerfile}
    for name, service in services.items():
        build = service.get("build")
        if build is None:
            continue
        assert build.get("context", ".") == "."
        dockerfile = dockerfiles[build["dockerfile"]]
        assert (REPO_ROOT / build["dockerfile"]).is_file()
        target = build.get("target")
        if target is not None:
            assert target in dockerfile.stage_names, f"{name}: no stage {target!r}"
    assert services["train"]["build"]["target"] == "trainer"


# --------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------


def test_redis_persists_with_aof(compose: dict[str, Any], services: dict[str, Any]) -> None:
    redis = services["redis"]
    argv = command_argv(redis["command"])
    assert argv[0] == "redis-server"
    assert option_value(argv, "--appendonly") == "yes"
    assert option_value(argv, "--appendfsync") in ("everysec", "always")
    data = _mount_at(redis, "/data")
    assert data["type"] == "volume" and data["source"] in compose.get("volumes", {}), (
        "Redis data must live in a named volume"
    )


def test_redis_healthcheck_pings(services: dict[str, Any]) -> None:
    test = services["redis"]["healthcheck"]["test"]
    text = test if isinstance(test, str) else " ".join(test)
    assert "redis-cli" in text and "ping" in text


def test_redis_port_is_not_published_to_all_interfaces(services: dict[str, Any]) -> None:
    """Redis runs without a password here: publish it on loopback only."""
    for port in services["redis"].get("ports", []):
        text = (
            port if isinstance(port, str) else f"{port.get('host_ip', '')}:{port.get('published')}"
        )
        assert text.startswith("127.0.0.1:"), f"Redis published beyond loopback: {port}"


def test_redis_url_is_set_in_one_place(compose_text: str, services: dict[str, Any]) -> None:
    definitions = re.findall(r"^\s*-?\s*REDIS_URL\s*[:=]", compose_text, flags=re.MULTILINE)
    assert len(definitions) == 1, "REDIS_URL should be defined once and shared by anchor"
    urls = set()
    for name in REDIS_CLIENTS:
        if name not in services:
            continue
        env = service_environment(services[name])
        assert "REDIS_URL" in env, f"{name} gets no REDIS_URL"
        urls.add(env["REDIS_URL"])
    assert len(urls) == 1, urls
    resolved = resolve_defaults(urls.pop())
    assert resolved.startswith(("redis://redis:", "rediss://redis:")), (
        f"the default REDIS_URL should point at the redis service: {resolved}"
    )


# --------------------------------------------------------------------------
# Start order, models volume, scaling
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", WORKER_SERVICES)
def test_workers_wait_for_redis_and_the_model(services: dict[str, Any], name: str) -> None:
    depends = services[name]["depends_on"]
    assert depends["redis"]["condition"] == "service_healthy"
    assert depends["train"]["condition"] == "service_completed_successfully"


@pytest.mark.parametrize("name", WORKER_SERVICES)
def test_workers_read_the_models_volume_read_only(services: dict[str, Any], name: str) -> None:
    service = services[name]
    env = resolve_defaults(service_environment(service))
    model_dir = env.get("INFERENCE_MODEL_DIR")
    assert model_dir == "/models"
    mount = _mount_at(service, model_dir)
    assert mount["source"] == "models" and mount.get("read_only") is True


def test_train_writes_the_models_volume_and_is_idempotent(
    compose: dict[str, Any], services: dict[str, Any]
) -> None:
    train = services["train"]
    assert "models" in compose.get("volumes", {})
    mount = _mount_at(train, "/models")
    assert mount["source"] == "models" and not mount.get("read_only", False)
    script = " ".join(command_argv(train["command"]))
    assert "python -m training" in script and "--model-dir /models" in script
    assert "--no-benchmark" in script
    # Skips training when a model is already there, so `up` does not retrain.
    skip = re.search(r"test -[ef] /models/(?P<name>[^ /]+)/CURRENT \|\|", script)
    assert skip, script
    # It trains, and checks for, the model the workers serve.
    served = {
        resolve_defaults(service_environment(services[w]).get("INFERENCE_MODEL_NAME", "friedman1"))
        for w in WORKER_SERVICES
    }
    argv = command_argv(resolve_defaults(script))
    trained = option_value(argv, "--name") or "friedman1"
    assert {resolve_defaults(skip["name"]), trained} == served, (served, trained, skip["name"])
    assert train.get("restart", "no") == "no"


@pytest.mark.parametrize("name", [*WORKER_SERVICES, "beat"])
def test_services_can_scale(services: dict[str, Any], name: str) -> None:
    """`docker compose up --scale worker-cpu=N` needs no fixed container name."""
    assert "container_name" not in services[name]
    if name != "beat":
        assert "replicas" not in services[name].get("deploy", {}), (
            "a fixed replica count fights --scale"
        )


def test_depends_on_known_services(services: dict[str, Any]) -> None:
    for name, service in services.items():
        depends = service.get("depends_on", {})
        for dep in depends if isinstance(depends, list) else depends.keys():
            assert dep in services, f"{name} depends on unknown service {dep}"


# --------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------


def test_inference_variables_are_real_settings(compose_text: str, services, env_names) -> None:
    named = {n for n in interpolated_names(compose_text) if n.startswith("INFERENCE_")}
    for service in services.values():
        named |= {k for k in service_environment(service) if k.startswith("INFERENCE_")}
    assert named, "expected INFERENCE_* settings in the compose file"
    unknown = sorted(n for n in named if n.upper() not in env_names)
    assert not unknown, f"not fields of {[c.__name__ for c in settings_classes()]}: {unknown}"


def test_tunables_are_interpolated(compose_text: str) -> None:
    names = interpolated_names(compose_text)
    for name in ("REDIS_URL", "INFERENCE_INTRA_OP_THREADS", "WORKER_CONCURRENCY"):
        assert name in names, f"{name} should be tunable through ${{{name}:-default}}"


@pytest.mark.parametrize("name", [*WORKER_SERVICES, "beat"])
def test_worker_environment_validates(
    services: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The defaults the compose file passes are accepted by WorkerSettings."""
    from worker.settings import WorkerSettings

    for key in list(os.environ):
        if key.startswith("INFERENCE_") or key == "REDIS_URL":
            monkeypatch.delenv(key)
    for key, value in resolve_defaults(service_environment(services[name])).items():
        monkeypatch.setenv(key, value)
    settings = WorkerSettings()
    assert settings.redis_url.startswith("redis")
    if name == "worker-gpu":
        assert settings.provider == "cuda"


# --------------------------------------------------------------------------
# Monitoring profile
# --------------------------------------------------------------------------

MONITORING_SERVICES = ("exporter", "prometheus", "grafana", "flower")


def test_monitoring_services_are_behind_their_profile(services: dict[str, Any]) -> None:
    for name in MONITORING_SERVICES:
        assert services[name].get("profiles") == ["monitoring"], name
    for name in ("redis", "train", "worker-cpu", "beat"):
        assert not services[name].get("profiles"), f"{name} must start without a profile"


def test_published_ports_are_loopback_only(services: dict[str, Any]) -> None:
    """Nothing here has a login worth the name: every published port is on 127.0.0.1."""
    for name, service in services.items():
        for port in service.get("ports", []):
            text = (
                port
                if isinstance(port, str)
                else f"{port.get('host_ip', '')}:{port.get('published')}"
            )
            assert text.startswith("127.0.0.1:"), f"{name} published beyond loopback: {port}"


@pytest.mark.parametrize("name", WORKER_SERVICES)
def test_workers_serve_metrics(services: dict[str, Any], name: str) -> None:
    env = resolve_defaults(service_environment(services[name]))
    port = env.get("INFERENCE_METRICS_PORT", "")
    assert port.isdigit() and 1024 < int(port) < 65536, port
    assert port in [str(p) for p in services[name].get("expose", [])]


def test_beat_serves_no_metrics(services: dict[str, Any]) -> None:
    """Only workers are scraped; beat would bind a port nobody reads."""
    assert "INFERENCE_METRICS_PORT" not in service_environment(services["beat"])


def test_flower_image_carries_the_monitoring_extra(
    services: dict[str, Any], cpu_dockerfile
) -> None:
    build = services["flower"]["build"]
    assert build["dockerfile"] == "Dockerfile.worker"
    stage = cpu_dockerfile.stage(build["target"])
    installs = [
        inst.args
        for s in cpu_dockerfile.lineage(stage)
        for inst in s.all("RUN")
        if "pip install" in inst.args
    ]
    sources = {inst.flags().get("from") for inst in stage.all("COPY")} - {None}
    for source in sources:
        for s in cpu_dockerfile.lineage(cpu_dockerfile.stage(source)):
            installs += [inst.args for inst in s.all("RUN") if "pip install" in inst.args]
    assert any(re.search(r"\.\[[^\]]*\bmonitoring\b", args) for args in installs), installs
    argv = command_argv(services["flower"]["command"])
    assert argv[:4] == ["celery", "-A", "worker", "flower"]
