"""Shadow traffic through a real prefork worker, sent by a stock Celery client: every path
that predicts (single rows on Celery's queue and on the row queue, batch jobs on both) is
shadowed, no result carries anything of the challenger, and the health report's shadow
count is the one a scrape of the worker's metrics port shows, under the right labels."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import redis
from celery import Celery

from contract.metrics import SHADOW_ABS_DIFF, SHADOW_ROWS_TOTAL, SHADOW_SKIPPED_ROWS_TOTAL
from contract.names import TASK_EXPLAIN, TASK_PREDICT, TASK_PREDICT_BATCH
from contract.schemas import BatchResult, PredictResult, ServedVersion, ServingDecision
from producer.client import Client
from producer.settings import ProducerSettings
from stack.embedded_redis import free_port
from stack.processes import celery_env, worker_process
from tests.monitoring.support import MetricsWorker, samples, scrape, total, wait_for
from tests.support import TrainedModel, served_version, serving
from training.promote import publish_decision
from training.train import TrainConfig, TrainOutcome, run_training
from worker.health import build_report

pytestmark = pytest.mark.integration

NAME = f"shadow-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> list[TrainOutcome]:
    model_dir = tmp_path_factory.mktemp("shadow-models")
    config = TrainConfig(model_dir=model_dir, name=NAME, n_samples=1500, n_estimators=10, n_jobs=1)
    return [run_training(config), run_training(config.model_copy(update={"seed": 1}))]


@pytest.fixture(scope="module")
def served(versions: list[TrainOutcome]) -> list[ServedVersion]:
    return [served_version(v.version_dir, str(i + 1)) for i, v in enumerate(versions)]


@pytest.fixture(scope="module")
def shadow_worker(
    redis_url: str,
    versions: list[TrainOutcome],
    served: list[ServedVersion],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[MetricsWorker]:
    """Two processes serving version 2 as champion, version 1 in shadow (no canary), as
    `python -m training promote 1 --shadow` over a champion 2 decides it."""
    client = redis.Redis.from_url(redis_url)
    decision = ServingDecision(
        name=NAME, generation=0, champion=served[1], challenger=served[0], shadow=True,
        decided_at=time.time(),
    )  # fmt: skip
    publish_decision(client, decision)
    client.close()
    queue = f"shadow.{uuid.uuid4().hex[:8]}"
    hostname = f"sh-{queue}@tests"
    port = free_port()
    logs = tmp_path_factory.mktemp("shadow-logs")
    env = celery_env(
        redis_url, model_dir=versions[0].version_dir.parent.parent, model_name=NAME,
        model_cache_dir=logs / "cache", heartbeat_s=0.3, serving_poll_s=0.5, warmup_runs=2,
        metrics_port=port, metrics_addr="127.0.0.1",
    )  # fmt: skip
    proc = worker_process(env, logs / "worker.log", queue=queue, name=hostname, concurrency=2)
    with serving(proc, redis_url, hostname, queue, processes=2) as worker:
        yield MetricsWorker(worker, port, queue)


def _reference(outcome: TrainOutcome, rows: np.ndarray) -> np.ndarray:
    model_dir = outcome.version_dir.parent.parent
    return TrainedModel(model_dir, outcome.version_dir, outcome.manifest, rows).reference(rows)


def _health_rows(redis_url: str, mw: MetricsWorker) -> tuple[int, float | None]:
    probe = redis.Redis.from_url(redis_url)
    try:
        report = build_report(probe, probe, [mw.queue])
    finally:
        probe.close()
    entry = next((w for w in report.workers if w.hostname == mw.worker.hostname), None)
    if entry is None or entry.serving is None:
        return 0, None
    return entry.serving.shadow_rows, entry.serving.shadow_mean_abs_diff


def test_every_path_is_shadowed_off_the_result_and_counted_in_health_and_metrics(
    shadow_worker: MetricsWorker,
    celery_sender: Celery,
    redis_url: str,
    served: list[ServedVersion],
    versions: list[TrainOutcome],
) -> None:
    mw = shadow_worker
    champion, challenger = served[1].version, served[0].version
    rows = versions[0].X_test[:40].astype(np.float32)
    expected = _reference(versions[1], rows)
    assert np.abs(_reference(versions[0], rows) - expected).max() > 1e-3  # they disagree

    def send(task: str, kwargs: dict[str, Any], queue: str) -> str:
        return str(celery_sender.send_task(task, kwargs=kwargs, queue=queue).id)

    singles = [send(TASK_PREDICT, {"features": r}, mw.queue) for r in rows[:10].tolist()]
    singles += [send(TASK_PREDICT, {"features": r}, mw.rows) for r in rows[10:25].tolist()]
    batches = [
        send(TASK_PREDICT_BATCH, {"rows": rows[:7].tolist()}, mw.queue),
        send(TASK_PREDICT_BATCH, {"rows": rows[25:40].tolist()}, mw.rows),
    ]
    # Explain jobs get no shadow run: sent too, they must leave the counts as they are.
    explains = [send(TASK_EXPLAIN, {"rows": rows[:2].tolist()}, q) for q in (mw.queue, mw.rows)]
    shadowed = 10 + 15 + 7 + 15

    with Client(ProducerSettings(redis_url=redis_url, wait_timeout_s=60)) as client:
        one = [client.wait(i) for i in singles]
        many = [client.wait(i) for i in batches]
        explained = [client.wait(i) for i in explains]
    for result in (*one, *many, *explained):
        assert (result["model_version"], result["arm"]) == (champion, "champion")
    # The champion's predictions, and no field beyond the result schemas'.
    assert all(set(r) <= set(PredictResult.model_fields) for r in one)
    assert all(set(r) <= set(BatchResult.model_fields) for r in many)
    got = [r["prediction"] for r in one] + many[0]["predictions"] + many[1]["predictions"]
    want = np.concatenate([expected[:25], expected[:7], expected[25:40]])
    np.testing.assert_allclose(got, want, atol=1e-4)

    rows_seen, mean = wait_for(
        "every shadowed row in the health report",
        lambda: (r := _health_rows(redis_url, mw))[0] >= shadowed and r,
        timeout_s=30,
    )
    assert rows_seen == shadowed
    assert mean is not None and mean > 0

    labels = {"model": NAME, "version": champion, "challenger": challenger, "device": "cpu"}
    text = scrape(mw.port)
    assert total(text, SHADOW_ROWS_TOTAL, **labels) == shadowed
    assert total(text, f"{SHADOW_ABS_DIFF}_count", **labels) == shadowed
    assert total(text, SHADOW_ROWS_TOTAL) == shadowed  # under these labels only
    assert total(text, SHADOW_SKIPPED_ROWS_TOTAL) == 0
    histogram_sum = total(text, f"{SHADOW_ABS_DIFF}_sum", **labels)
    assert histogram_sum / shadowed == pytest.approx(mean, rel=1e-4, abs=1e-6)
    # Every row's difference is in a bucket: the +Inf bucket counts them all.
    inf = [
        v for lab, v in samples(text, f"{SHADOW_ABS_DIFF}_bucket", **labels) if lab["le"] == "+Inf"
    ]
    assert sum(inf) == shadowed
