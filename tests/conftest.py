"""Shared fixtures: a real Redis server, a trained model, real worker processes.

Redis: the server at REDIS_URL when that is set, otherwise a private
redis-server started for the session. Tests never flush it: each one works
under its own task ids, worker names and keys.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import redis
from celery import Celery

from producer.settings import ProducerSettings
from stack.embedded_redis import EmbeddedRedis
from stack.processes import celery_env, worker_process
from tests.support import TEST_MAX_BATCH_ROWS, RunningWorker, TrainedModel, serving
from training.artifact import load_manifest


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    external = os.environ.get("REDIS_URL")
    if external:
        yield external
        return
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory: pytest.TempPathFactory) -> TrainedModel:
    from training.train import TrainConfig, run_training

    model_dir = tmp_path_factory.mktemp("models")
    outcome = run_training(TrainConfig(model_dir=model_dir, n_samples=3_000, n_jobs=1))
    version_dir, manifest = load_manifest(model_dir, outcome.manifest.name)
    return TrainedModel(model_dir, version_dir, manifest, outcome.X_test)


@pytest.fixture(scope="session")
def cpu_worker(
    redis_url: str, trained_model: TrainedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningWorker]:
    """One prefork worker (2 processes) on inference.cpu, shared by the integration tests."""
    hostname = f"cpu-{uuid.uuid4().hex[:8]}@tests"
    env = celery_env(
        redis_url,
        model_dir=trained_model.model_dir,
        max_batch_rows=TEST_MAX_BATCH_ROWS,
        heartbeat_s=0.5,
    )
    log = tmp_path_factory.mktemp("logs") / "cpu-worker.log"
    proc = worker_process(env, log, queue="inference.cpu", name=hostname, concurrency=2)
    with serving(proc, redis_url, hostname, "inference.cpu", processes=2) as worker:
        yield worker


@pytest.fixture
def producer_settings(redis_url: str) -> ProducerSettings:
    return ProducerSettings(redis_url=redis_url, wait_timeout_s=30)


@pytest.fixture
def celery_sender(redis_url: str) -> Iterator[Celery]:
    """A stock Celery client app: what a hand-written producer sends, with no checks of ours."""
    app = Celery("tests-sender", broker=redis_url)
    app.conf.update(task_serializer="json", accept_content=["json"])
    try:
        yield app
    finally:
        app.close()
