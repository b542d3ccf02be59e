"""A real worker (2 prefork processes) with INFERENCE_METRICS_PORT: its counts equal the
jobs sent, per outcome and path, also after a pool process is killed and replaced."""

from __future__ import annotations

import socket
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from celery import Celery

from contract.metrics import (
    COMPUTE_SECONDS,
    JOBS_TOTAL,
    LANE_BATCH_SIZE,
    MODEL_INFO,
    MODEL_LOAD_SECONDS,
    MODEL_WARMUP_SECONDS,
    QUEUE_WAIT_SECONDS,
    ROWS_TOTAL,
    TASK_SECONDS,
)
from contract.names import TASK_NOOP, TASK_PREDICT, TASK_PREDICT_BATCH
from producer.client import Client
from producer.settings import ProducerSettings
from stack.processes import celery_env, worker_process
from tests.monitoring.support import (
    MetricsWorker,
    by,
    child_pids,
    kill_child_and_wait_replaced,
    promtool_check_metrics,
    samples,
    scrape,
    total,
    wait_for,
)
from tests.support import TrainedModel, serving

pytestmark = pytest.mark.integration


def send_mix(client: Client, sender: Celery, mw: MetricsWorker, rows: list[list[float]]) -> dict:
    """Jobs of every outcome on both paths; what each should count, once they have ended."""
    ids = client.submit_many(rows, queue=mw.queue)  # lane: success
    bad_row = client.send(TASK_PREDICT, {"features": [1.0]}, mw.queue)  # lane: failure
    ids.append(bad_row)
    batch = client.submit_batch(rows[:7], queue=mw.queue)  # Celery's path: success
    bad_batch = client.send(TASK_PREDICT_BATCH, {"rows": [[1.0]]}, mw.queue)  # failure
    chunk = client.send(TASK_PREDICT_BATCH, {"rows": rows[:5]}, mw.rows)  # lane: success
    ids += [batch, bad_batch, chunk]
    # Expired before it is taken: revoked, on either path.
    gone = datetime.now(UTC) - timedelta(minutes=1)
    lane_expired = sender.send_task(
        TASK_PREDICT, kwargs={"features": rows[0]}, queue=mw.rows, expires=gone
    )
    celery_expired = sender.send_task(TASK_NOOP, queue=mw.queue, expires=gone)
    # A task the row queue does not take: refused, unread.
    refused = sender.send_task(TASK_NOOP, queue=mw.rows)
    # Refused by the checks in front of Celery's handler (worker.guards), in the main process.
    celery_refused = sender.send_task(TASK_NOOP, kwargs={"self": 1}, queue=mw.queue)
    noop = sender.send_task(TASK_NOOP, queue=mw.queue)  # Celery's path: success
    for task_id in ids:
        wait_for(f"job {task_id}", lambda t=task_id: client.status(t).ready, timeout_s=60)
    for result in (lane_expired, celery_expired, refused, celery_refused, noop):
        wait_for(f"job {result.id}", lambda r=result: client.status(r.id).ready, timeout_s=60)
    n = len(rows)
    return {
        "jobs": {
            (mw.rows, TASK_PREDICT, "success"): n,
            (mw.rows, TASK_PREDICT, "failure"): 1,
            (mw.rows, TASK_PREDICT, "revoked"): 1,
            (mw.rows, TASK_NOOP, "refused"): 1,
            (mw.rows, TASK_PREDICT_BATCH, "success"): 1,
            (mw.queue, TASK_PREDICT_BATCH, "success"): 1,
            (mw.queue, TASK_PREDICT_BATCH, "failure"): 1,
            (mw.queue, TASK_NOOP, "revoked"): 1,
            (mw.queue, TASK_NOOP, "success"): 1,
            (mw.queue, TASK_NOOP, "refused"): 1,
        },
        "rows": {
            (mw.rows, "success"): n + 5,
            (mw.rows, "failure"): 1,  # a single row counts whatever its outcome
            (mw.rows, "revoked"): 1,
            (mw.queue, "success"): 7,  # a batch's rows, once it succeeded
        },
    }


def add(a: dict, b: dict) -> dict:
    return {k: a.get(k, 0) + b.get(k, 0) for k in {*a, *b}}


def test_counts_equal_jobs_sent_per_outcome_also_after_a_process_is_killed(
    metrics_worker: MetricsWorker,
    redis_url: str,
    trained_model: TrainedModel,
    celery_sender: Celery,
    redis_client: redis.Redis,
) -> None:
    mw = metrics_worker
    rows = trained_model.X_test[:40].astype(float).tolist()
    settings = ProducerSettings(redis_url=redis_url, wait_timeout_s=30)
    with Client(settings) as client:
        first = send_mix(client, celery_sender, mw, rows)
        text = scrape(mw.port)
        assert by(text, JOBS_TOTAL, ("queue", "task", "outcome")) == first["jobs"]
        assert by(text, ROWS_TOTAL, ("queue", "outcome")) == first["rows"]

        # Both pool processes served lane jobs; kill one: its counts must stay, once.
        victim = min(child_pids(redis_client, mw.worker.hostname))
        kill_child_and_wait_replaced(redis_client, mw.worker.hostname, victim, 2)
        after_kill = scrape(mw.port)
        assert by(after_kill, JOBS_TOTAL, ("queue", "task", "outcome")) == first["jobs"]

        second = send_mix(client, celery_sender, mw, rows)
    text = scrape(mw.port)
    expected = add(first["jobs"], second["jobs"])
    assert by(text, JOBS_TOTAL, ("queue", "task", "outcome")) == expected
    assert by(text, ROWS_TOTAL, ("queue", "outcome")) == add(first["rows"], second["rows"])

    # Labels: the model served, never a task id.
    (labels, _), *_ = samples(text, JOBS_TOTAL)
    assert set(labels) == {"queue", "task", "model", "version", "device", "outcome"}
    assert labels["model"] == trained_model.manifest.name
    assert labels["version"] == trained_model.manifest.version
    assert labels["device"] == "cpu"

    # Histograms: a lane job's whole task, every job with a header's queue wait.
    lane_jobs = sum(v for (q, _, _), v in expected.items() if q == mw.rows)
    assert total(text, f"{TASK_SECONDS}_count", queue=mw.rows) == lane_jobs
    waited = total(text, f"{QUEUE_WAIT_SECONDS}_count", queue=mw.rows)
    assert waited == 2 * (len(rows) + 2)  # the client's jobs carry enqueued_at; stock ones not
    assert total(text, f"{LANE_BATCH_SIZE}_sum", queue=mw.rows) >= lane_jobs
    assert total(text, f"{COMPUTE_SECONDS}_count", queue=mw.queue) == 2  # the good batches
    assert total(text, f"{COMPUTE_SECONDS}_count", queue=mw.rows) >= 4  # >= 1 a mix per path

    # Gauges: live processes only; the killed one's dropped, its replacement's there.
    info = samples(text, MODEL_INFO, hostname=mw.worker.hostname)
    assert [v for _, v in info] == [1.0]
    assert info[0][0]["provider"] == "CPUExecutionProvider"
    assert total(text, MODEL_LOAD_SECONDS) > 0
    assert total(text, MODEL_WARMUP_SECONDS) > 0


def test_exposition_passes_promtool(metrics_worker: MetricsWorker) -> None:
    checked = promtool_check_metrics(scrape(metrics_worker.port))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_inspect_sees_the_row_queues_and_counts_lane_jobs(
    metrics_worker: MetricsWorker, redis_url: str, trained_model: TrainedModel
) -> None:
    mw = metrics_worker
    with Client(ProducerSettings(redis_url=redis_url, wait_timeout_s=30)) as client:
        ids = client.submit_many(trained_model.X_test[:5].astype(float).tolist(), mw.queue)
        for task_id in ids:
            client.wait(task_id, timeout=30)
    app = Celery("tests-inspect", broker=redis_url)
    try:
        inspect = app.control.inspect(destination=[mw.worker.hostname], timeout=5)
        queues = inspect.active_queues()[mw.worker.hostname]
        stats = inspect.stats()[mw.worker.hostname]
    finally:
        app.close()
    assert {q["name"] for q in queues} == {mw.queue, mw.rows}
    lane_total = total(scrape(mw.port), JOBS_TOTAL, queue=mw.rows, task=TASK_PREDICT)
    assert stats["row_lanes"]["total"][TASK_PREDICT] == lane_total >= 5
    assert stats["total"][TASK_PREDICT] == lane_total


def test_unset_port_serves_nothing_and_counts_nothing(
    redis_url: str, trained_model: TrainedModel, tmp_path: Path
) -> None:
    queue = f"nometrics.{uuid.uuid4().hex[:8]}"
    hostname = f"n-{queue}@tests"
    env = celery_env(redis_url, model_dir=trained_model.model_dir, heartbeat_s=0.3)
    env.pop("INFERENCE_METRICS_PORT", None)
    proc = worker_process(env, tmp_path / "w.log", queue=queue, name=hostname)
    settings = ProducerSettings(redis_url=redis_url, wait_timeout_s=30)
    with serving(proc, redis_url, hostname, queue), Client(settings) as client:
        client.wait(client.submit(trained_model.X_test[0].tolist(), queue), timeout=30)
    log = (tmp_path / "w.log").read_text()
    assert "metrics on http" not in log
    assert "could not record" not in log


def test_a_taken_metrics_port_refuses_to_start(
    redis_url: str, trained_model: TrainedModel, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = celery_env(
            redis_url, model_dir=trained_model.model_dir, metrics_port=port,
            metrics_addr="127.0.0.1",
        )  # fmt: skip
        name = f"taken-{uuid.uuid4().hex[:8]}@tests"
        proc = worker_process(env, tmp_path / "w.log", queue="taken.q", name=name).start()
        try:
            code = proc.wait(60)
        finally:
            proc.stop()
    assert code not in (None, 0)
    assert f"cannot serve metrics on port {port}" in proc.log_tail()
