"""A real worker (2 prefork processes) with a metrics port through a hot swap: every job is
counted under the version that computed it, and the model info, load and warm-up gauges
name the version each process holds, the swapped-out one gone."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from contract.metrics import (
    APPLIED,
    DECISION_REFUSED,
    JOBS_TOTAL,
    MODEL_INFO,
    MODEL_LOAD_SECONDS,
    MODEL_WARMUP_SECONDS,
    SERVING_DECISIONS_TOTAL,
)
from contract.names import TASK_EXPLAIN, TASK_PREDICT, row_queue
from contract.schemas import ServedVersion, ServingDecision
from producer.client import Client
from producer.settings import ProducerSettings
from stack.embedded_redis import free_port
from stack.processes import celery_env, worker_process
from tests.monitoring.support import MetricsWorker, by, samples, scrape, wait_for
from tests.support import served_version, serving
from training.promote import publish_decision
from training.train import TrainConfig, TrainOutcome, run_training
from worker.health import live_states

pytestmark = pytest.mark.integration

NAME = f"mswap-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> list[TrainOutcome]:
    model_dir = tmp_path_factory.mktemp("mswap-models")
    config = TrainConfig(model_dir=model_dir, name=NAME, n_samples=1500, n_estimators=10, n_jobs=1)
    return [run_training(config), run_training(config.model_copy(update={"seed": 1}))]


@pytest.fixture(scope="module")
def served(versions: list[TrainOutcome]) -> list[ServedVersion]:
    return [served_version(v.version_dir, str(i + 1)) for i, v in enumerate(versions)]


def _publish(redis_url: str, generation: int, champion: ServedVersion) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        publish_decision(
            client,
            ServingDecision(
                name=NAME, generation=generation, champion=champion, decided_at=time.time()
            ),
        )
    finally:
        client.close()


@pytest.fixture(scope="module")
def swap_worker(
    redis_url: str,
    versions: list[TrainOutcome],
    served: list[ServedVersion],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[MetricsWorker]:
    _publish(redis_url, 0, served[0])
    queue = f"mswap.{uuid.uuid4().hex[:8]}"
    hostname = f"ms-{queue}@tests"
    port = free_port()
    logs = tmp_path_factory.mktemp("mswap-logs")
    env = celery_env(
        redis_url, model_dir=versions[0].version_dir.parent.parent, model_name=NAME,
        model_cache_dir=logs / "cache", heartbeat_s=0.3, serving_poll_s=0.5, warmup_runs=2,
        metrics_port=port, metrics_addr="127.0.0.1",
    )  # fmt: skip
    proc = worker_process(env, logs / "worker.log", queue=queue, name=hostname, concurrency=2)
    with serving(proc, redis_url, hostname, queue, processes=2) as worker:
        yield MetricsWorker(worker, port, queue)


def _serve(client: Client, mw: MetricsWorker, rows: list[list[float]]) -> list[dict[str, Any]]:
    """Single rows on the lane, an explain job on each path; their results."""
    ids = client.submit_many(rows, queue=mw.queue)
    ids.append(client.send(TASK_EXPLAIN, {"rows": rows[:3]}, mw.queue))
    ids.append(client.send(TASK_EXPLAIN, {"rows": rows[:2]}, row_queue(mw.queue)))
    return [client.wait(i) for i in ids]


def _generation(redis_url: str, hostname: str) -> set[int]:
    client = redis.Redis.from_url(redis_url)
    try:
        states = live_states(client, hostname=hostname)
    finally:
        client.close()
    return {s.serving.generation for s in states if s.serving is not None} | (
        {-2} if len(states) < 2 else set()
    )


def _counted(mw: MetricsWorker, version: str, rows: int) -> str | None:
    """The scrape, once it counts the jobs _serve sent to `version`."""
    text = scrape(mw.port)
    jobs = by(text, JOBS_TOTAL, ("task", "version", "outcome"))
    done = jobs.get((TASK_PREDICT, version, "success")) == rows
    return text if done and jobs.get((TASK_EXPLAIN, version, "success")) == 2 else None


def _count(mw: MetricsWorker, task: str, version: str) -> int:
    jobs = by(scrape(mw.port), JOBS_TOTAL, ("task", "version", "outcome"))
    return jobs.get((task, version, "success"), 0)


def _info_is(mw: MetricsWorker, versions: set[str]) -> str | None:
    """The scrape, once inference_model_info lists exactly `versions`."""
    text = scrape(mw.port)
    return text if _versions(text, MODEL_INFO) == versions else None


def _versions(text: str, name: str) -> set[str]:
    return {labels["version"] for labels, value in samples(text, name) if value > 0}


def test_jobs_and_model_gauges_follow_a_hot_swap(
    swap_worker: MetricsWorker, redis_url: str, served: list, versions: list
) -> None:
    mw = swap_worker
    one, two = served[0].version, served[1].version
    rows = versions[0].X_test[:12].astype(float).tolist()
    with Client(ProducerSettings(redis_url=redis_url, wait_timeout_s=60)) as client:
        before = _serve(client, mw, rows)
        assert {r["model_version"] for r in before} == {one}
        text = wait_for("the first jobs counted", lambda: _counted(mw, one, len(rows)))
        assert _versions(text, MODEL_INFO) == {one}

        applied = _decisions(mw).get((NAME, APPLIED), 0)
        _publish(redis_url, 1, served[1])
        hostname = mw.worker.hostname
        wait_for("both processes on generation 1", lambda: _generation(redis_url, hostname) == {1})
        assert _decisions(mw).get((NAME, APPLIED)) == applied + 2  # one per process
        after = _serve(client, mw, rows)
        assert {r["model_version"] for r in after} == {two}
        _after_swap(mw, rows, one, two)
        # A job pinned to the old version loads it again, as a pinned version: listed anew.
        pinned = client.wait(client.submit_explain(rows[:1], mw.queue, model_version=one))
    assert (pinned["model_version"], pinned["arm"]) == (one, "pinned")
    text = wait_for("the pinned version's model info", lambda: _info_is(mw, {one, two}), 20)
    wait_for("the pinned job counted", lambda: _count(mw, TASK_EXPLAIN, one) == 3)
    assert {labels["version"] for labels, _ in samples(text, MODEL_LOAD_SECONDS)} == {one, two}


def _decisions(mw: MetricsWorker) -> dict[tuple[str, ...], float]:
    return by(scrape(mw.port), SERVING_DECISIONS_TOTAL, ("model", "outcome"))


def test_a_refused_decision_is_counted_and_the_old_version_keeps_serving(
    swap_worker: MetricsWorker, redis_url: str, served: list, versions: list
) -> None:
    mw = swap_worker
    _publish(redis_url, 6, served[1])
    hostname = mw.worker.hostname
    wait_for("both processes on generation 6", lambda: _generation(redis_url, hostname) == {6})
    before = _decisions(mw)
    # A decision whose manifest hash matches no copy of the version: a tampered artifact.
    tampered = served[0].model_copy(
        update={"sha256": {**served[0].sha256, "manifest.json": "0" * 64}}
    )
    _publish(redis_url, 7, tampered)
    wait_for(
        "both processes refusing generation 7",
        lambda: (
            _decisions(mw).get((NAME, DECISION_REFUSED), 0)
            == before.get((NAME, DECISION_REFUSED), 0) + 2
        ),
    )
    rows = versions[0].X_test[:5].astype(float).tolist()
    with Client(ProducerSettings(redis_url=redis_url, wait_timeout_s=60)) as client:
        results = [client.wait(i) for i in client.submit_many(rows, queue=mw.queue)]
    assert {r["model_version"] for r in results} == {served[1].version}
    assert _generation(redis_url, hostname) == {6}
    assert _decisions(mw).get((NAME, APPLIED)) == before.get((NAME, APPLIED))


def _after_swap(mw: MetricsWorker, rows: list[list[float]], one: str, two: str) -> None:
    """The scrape after the swap: every job under the version that computed it, the model
    gauges of the new version only."""
    wait_for("the jobs of version 2 counted", lambda: _counted(mw, two, len(rows)))
    text = wait_for("the model info of version 2 only", lambda: _info_is(mw, {two}), 20)
    assert by(text, JOBS_TOTAL, ("task", "version", "outcome")) == {
        (TASK_PREDICT, one, "success"): len(rows),
        (TASK_EXPLAIN, one, "success"): 2,
        (TASK_PREDICT, two, "success"): len(rows),
        (TASK_EXPLAIN, two, "success"): 2,
    }
    info = samples(text, MODEL_INFO)
    assert [(labels["version"], labels["hostname"]) for labels, _ in info] == [
        (two, mw.worker.hostname)
    ]
    # The new version's own load and warm-up, and nothing left of the old one's.
    assert {labels["version"] for labels, _ in samples(text, MODEL_LOAD_SECONDS)} == {two}
    assert {labels["version"] for labels, _ in samples(text, MODEL_WARMUP_SECONDS)} == {two}
    assert all(value > 0 for _, value in samples(text, MODEL_LOAD_SECONDS))
