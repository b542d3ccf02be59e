"""Flower, started against the test Redis, lists every job: the row lane's single rows and
bulk chunks as Celery's own path's, with their state, runtime and worker."""

from __future__ import annotations

import json
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from contract.names import TASK_PREDICT, TASK_PREDICT_BATCH, row_queue
from producer.client import Client
from producer.settings import ProducerSettings
from stack.embedded_redis import free_port
from stack.processes import celery_env, flower_process, wait_http, worker_process
from tests.monitoring.support import wait_for
from tests.support import TrainedModel, serving

pytestmark = pytest.mark.integration


def flower_tasks(port: int) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/api/tasks"
    with urllib.request.urlopen(url, timeout=5) as response:
        return dict(json.loads(response.read()))


def test_flower_lists_lane_rows_lane_chunks_and_celery_jobs(
    redis_url: str, trained_model: TrainedModel, tmp_path: Path
) -> None:
    pytest.importorskip("flower", reason="Flower comes with the dev extra")
    queue = f"flower.{uuid.uuid4().hex[:8]}"
    hostname = f"f-{queue}@tests"
    env = celery_env(redis_url, model_dir=trained_model.model_dir, heartbeat_s=0.3)
    # Started without -E: Flower turns task events on at run time (enable_events), in the
    # main process, and the pool processes' row lanes must follow.
    worker = worker_process(env, tmp_path / "worker.log", queue=queue, name=hostname, concurrency=2)
    port = free_port()
    flower = flower_process(env, tmp_path / "flower.log", port)
    rows = trained_model.X_test[:30].astype(float).tolist()
    settings = ProducerSettings(redis_url=redis_url, wait_timeout_s=30)
    with serving(worker, redis_url, hostname, queue, processes=2), Client(settings) as client:
        flower.start()
        try:
            wait_http(flower, f"http://127.0.0.1:{port}/healthcheck", timeout_s=60)

            def probe_listed() -> bool:
                probe = client.submit(rows[0], queue)
                client.wait(probe, timeout=30)
                return probe in flower_tasks(port)

            wait_for("Flower to turn the worker's events on", probe_listed, every=0.5)

            singles = client.submit_many(rows[:20], queue)  # the lane
            bad = client.send(TASK_PREDICT, {"features": [1.0]}, queue)  # the lane, failing
            chunks = [
                client.send(TASK_PREDICT_BATCH, {"rows": rows[i : i + 5]}, row_queue(queue))
                for i in (0, 5)
            ]  # the lane, as the bulk scorer sends them
            batches = [client.submit_batch(rows[:3], queue) for _ in range(2)]  # Celery's path
            sent = [*singles, bad, *chunks, *batches]
            for task_id in sent:
                wait_for(f"{task_id} to end", lambda t=task_id: client.status(t).ready)

            def all_final() -> dict[str, Any] | None:
                tasks = flower_tasks(port)
                ended = {"SUCCESS", "FAILURE"}
                if all(tasks.get(t, {}).get("state") in ended for t in sent):
                    return tasks
                return None

            tasks = wait_for("Flower to list every job", all_final)
        finally:
            flower.stop()
    expected_names = {
        **{t: TASK_PREDICT for t in [*singles, bad]},
        **{t: TASK_PREDICT_BATCH for t in [*chunks, *batches]},
    }
    for task_id, name in expected_names.items():
        task = tasks[task_id]
        assert task["name"] == name, task
        assert task["worker"] == hostname, task
        assert task["state"] == ("FAILURE" if task_id == bad else "SUCCESS"), task
        assert task["received"] is not None and task["started"] is not None, task
        if task_id != bad:
            assert task["runtime"] is not None and task["runtime"] >= 0, task
    assert "FeatureCountMismatch" in tasks[bad]["exception"]
