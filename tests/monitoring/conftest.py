"""The monitoring tests' worker: 2 prefork processes with a metrics port, one per module
(each module counts its own jobs on its own queues)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from stack.embedded_redis import free_port
from stack.processes import celery_env, worker_process
from tests.monitoring.support import MetricsWorker
from tests.support import TrainedModel, serving


@pytest.fixture(scope="module")
def metrics_worker(
    redis_url: str, trained_model: TrainedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MetricsWorker]:
    queue = f"metrics.{uuid.uuid4().hex[:8]}"
    hostname = f"m-{queue}@tests"
    port = free_port()
    env = celery_env(
        redis_url, model_dir=trained_model.model_dir, heartbeat_s=0.3, metrics_port=port,
        metrics_addr="127.0.0.1",
    )  # fmt: skip
    log = tmp_path_factory.mktemp("logs") / "metrics-worker.log"
    proc = worker_process(env, log, queue=queue, name=hostname, concurrency=2)
    with serving(proc, redis_url, hostname, queue, processes=2) as worker:
        yield MetricsWorker(worker, port, queue)
