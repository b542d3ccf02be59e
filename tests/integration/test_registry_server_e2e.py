"""Server mode end to end: a real `mlflow server` holds the versions and serves their files,
a real worker process that has neither the model directory nor MLflow's artifact folder
fetches them over HTTP, and an alias moved with MLflow's own client (as in its UI) reaches the
worker through `python -m training sync`, run where MLflow cannot be imported."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.result import AsyncResult

from contract.names import TASK_PREDICT
from stack.processes import celery_env, worker_process
from tests.support import MlflowServer, RunningWorker, SyncCommand, serving
from tests.training.conftest import small
from training import promote
from training.registry import Registry
from training.registry_types import RegistryVersion
from training.settings import RegistrySettings
from training.train import TrainOutcome, run_training

pytestmark = pytest.mark.integration

NAME = f"e2e{uuid.uuid4().hex[:6]}"
QUEUE = f"e2e-{uuid.uuid4().hex[:6]}"
# Jobs sent this long after the sync returned must be the new version's (the worker polls
# the decision every second; its pub/sub notice comes first).
SWITCH_S = 2.0


@dataclass
class Served:
    server: MlflowServer
    registry: Registry
    outcomes: list[TrainOutcome]
    versions: list[RegistryVersion]


@pytest.fixture(scope="module")
def served(
    mlflow_server: MlflowServer, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Served:
    """Two versions trained here, registered on the server (their files uploaded through its
    artifact API), the first promoted."""
    training_dir = tmp_path_factory.mktemp("e2e-training")
    config = small(training_dir).model_copy(update={"name": NAME})
    outcomes = [run_training(config), run_training(config.model_copy(update={"seed": 1}))]
    settings = RegistrySettings(tracking_uri=mlflow_server.url, redis_url=redis_url)
    registry = Registry(settings, training_dir / "unused")
    versions = [registry.register(o.version_dir, o.manifest) for o in outcomes]
    client = redis.Redis.from_url(redis_url)
    promote.promote(registry, client, NAME, versions[0].number)
    client.close()
    return Served(mlflow_server, registry, outcomes, versions)


@pytest.fixture(scope="module")
def worker(
    served: Served, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningWorker]:
    """Its model directory is empty and its cache fresh: the versions reach it over HTTP."""
    own = tmp_path_factory.mktemp("e2e-worker")
    (own / "models").mkdir()
    env = celery_env(
        redis_url,
        model_dir=own / "models",
        model_name=NAME,
        model_cache_dir=own / "cache",
        heartbeat_s=0.5,
        serving_poll_s=1.0,
        warmup_runs=2,
    )
    hostname = f"e2e-{uuid.uuid4().hex[:8]}@tests"
    proc = worker_process(env, own / "worker.log", queue=QUEUE, name=hostname, concurrency=1)
    with serving(proc, redis_url, hostname, QUEUE) as running:
        yield running


@pytest.fixture
def sender(redis_url: str) -> Iterator[Celery]:
    """A stock Celery client with default settings: how another service sends us jobs."""
    app = Celery("e2e-sender", broker=redis_url, backend=redis_url)
    try:
        yield app
    finally:
        app.close()


def _predict(sender: Celery, row: list[float]) -> dict[str, Any]:
    result = sender.send_task(TASK_PREDICT, kwargs={"features": row}, queue=QUEUE)
    value = result.get(timeout=60)
    assert isinstance(value, dict)
    return value


def _alias_moved_by_hand(server: MlflowServer, number: str) -> None:
    """What a person does in MLflow's UI: the champion alias moved with MLflow's own client,
    no decision published."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=server.url, registry_uri=server.url)
    client.set_registered_model_alias(NAME, "champion", number)


def test_an_alias_moved_in_mlflow_reaches_a_worker_over_http(
    served: Served,
    worker: RunningWorker,
    sender: Celery,
    redis_url: str,
    sync_without_mlflow: SyncCommand,
) -> None:
    first, second = (o.manifest.version for o in served.outcomes)
    rows = served.outcomes[0].X_test[:10].tolist()
    before = [_predict(sender, row) for row in rows]
    assert {r["model_version"] for r in before} == {first}

    # Jobs keep coming while the alias moves and the sync publishes: none may fail.
    sent: list[tuple[float, AsyncResult]] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            row = rows[len(sent) % len(rows)]
            sent.append(
                (
                    time.monotonic(),
                    sender.send_task(TASK_PREDICT, kwargs={"features": row}, queue=QUEUE),
                )
            )
            time.sleep(0.02)

    thread = threading.Thread(target=load)
    thread.start()
    try:
        time.sleep(0.5)
        _alias_moved_by_hand(served.server, served.versions[1].number)
        done = sync_without_mlflow(NAME)
        synced_at = time.monotonic()
        time.sleep(SWITCH_S + 2)
    finally:
        stop.set()
        thread.join()
    assert done.returncode == 0, done.stderr
    assert "onnxruntime is not installed here" in done.stderr  # checked by sha256 alone
    assert f"champion {second} (registry {served.versions[1].number})" in done.stdout
    state = redis.Redis.from_url(redis_url)
    decision = promote.read_decision(state, NAME)
    state.close()
    assert decision is not None
    assert decision.champion.version == second
    assert decision.champion.location.startswith(f"{served.server.url}/api/2.0/mlflow-artifacts/")
    assert decision.previous is not None and decision.previous.version == first

    served_by = [(at - synced_at, result.get(timeout=60)["model_version"]) for at, result in sent]
    assert all(result.successful() for _, result in sent)
    assert {v for _, v in served_by} <= {first, second}
    late = [v for t, v in served_by if t >= SWITCH_S]
    assert late and set(late) == {second}, "a job sent after the switch served by the old version"

    again = sync_without_mlflow(NAME)
    assert again.returncode == 0 and "in step with MLflow" in again.stdout
    # Both versions came over HTTP into the worker's cache; its model directory stayed empty.
    cache = Path(worker.process.env["INFERENCE_MODEL_CACHE_DIR"]) / NAME
    assert {first, second} <= {p.name for p in cache.iterdir()}
    assert not any(Path(worker.process.env["INFERENCE_MODEL_DIR"]).iterdir())


def test_sync_refuses_a_tampered_version_and_publishes_nothing(
    served: Served,
    worker: RunningWorker,
    sender: Celery,
    redis_url: str,
    sync_without_mlflow: SyncCommand,
    tmp_path: Path,
) -> None:
    state = redis.Redis.from_url(redis_url)
    before = promote.read_decision(state, NAME)
    assert before is not None
    outcome = run_training(small(tmp_path).model_copy(update={"name": NAME, "seed": 2}))
    tampered = served.registry.register(outcome.version_dir, outcome.manifest)
    model_file = served.server.artifact_dir(tampered.source) / outcome.manifest.files["cpu"].path
    model_file.write_bytes(model_file.read_bytes() + b"\0")

    _alias_moved_by_hand(served.server, tampered.number)
    try:
        done = sync_without_mlflow(NAME)
        assert done.returncode == 1
        assert "sha256" in done.stderr and f"version {tampered.number}" in done.stderr
        after = promote.read_decision(state, NAME)
        assert after == before
        result = _predict(sender, outcome.X_test[0].tolist())
        assert result["model_version"] == before.champion.version
    finally:
        _alias_moved_by_hand(served.server, str(before.champion.registry_version))
        state.close()
