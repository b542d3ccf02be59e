"""Limits through a real worker: result TTL, per-task soft time limit, message size,
decompression bombs, and huge shapes refused on their shape."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import numpy as np
import pytest
import redis
from celery import Celery
from kombu import Connection

from contract.names import TASK_PREDICT, TASK_PREDICT_BATCH, model_info_key, row_queue
from producer.client import Client, TaskStatus
from producer.settings import ProducerSettings
from stack.processes import celery_env, worker_process
from tests.support import RunningWorker, TrainedModel, serving

pytestmark = pytest.mark.integration

FIVE = [0.1, 0.2, 0.3, 0.4, 0.5]
RESULT_TTL_S = 120
SOFT_LIMIT_S = 0.35
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# Small integers keep the JSON short: 200,000 rows are ~3.4 MB, under MAX_MESSAGE_BYTES.
# The limit counts from when the pool process takes the job: it unpickles and decodes the
# rows (~0.15-0.3 s), then validates and predicts (~0.45-1.2 s on one core, by machine),
# so SOFT_LIMIT_S falls inside the task. On a slower machine it may fall inside the
# decoding, which surfaces as kombu's DecodeError("SoftTimeLimitExceeded()"): kombu wraps any
# exception raised while decoding. Either way the job fails for its time limit, by name.
SLOW_ROWS = [[1, 2, 3, 4, 5]] * 200_000
# ~4.8 MB of compact JSON (12 bytes a row): over MAX_MESSAGE_BYTES (and over max_batch_rows,
# which is not reached).
OVERSIZED_ROWS = [[1, 2, 3, 4, 5]] * 400_000


@pytest.fixture(scope="module")
def limits_worker(
    redis_url: str, trained_model: TrainedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningWorker]:
    """A prefork worker (time limits need one) on a queue of its own, with tight limits."""
    hostname = f"limits-{uuid.uuid4().hex[:8]}@tests"
    queue = f"limits-{uuid.uuid4().hex[:8]}"
    env = celery_env(
        redis_url,
        model_dir=trained_model.model_dir,
        result_ttl_s=RESULT_TTL_S,
        task_soft_time_limit_s=SOFT_LIMIT_S,
        task_time_limit_s=10,
        visibility_timeout_s=120,
        max_message_bytes=MAX_MESSAGE_BYTES,
        max_batch_rows=len(SLOW_ROWS),
    )
    log = tmp_path_factory.mktemp("logs") / "limits-worker.log"
    proc = worker_process(env, log, queue=queue, name=hostname, concurrency=1)
    with serving(proc, redis_url, hostname, queue) as worker:
        yield worker


@pytest.fixture(scope="module")
def client(redis_url: str) -> Iterator[Client]:
    with Client(ProducerSettings(redis_url=redis_url, wait_timeout_s=30)) as c:
        yield c


def finished(client: Client, task_id: str) -> TaskStatus:
    return next(client.iter_finished([task_id]))


def assert_serves(client: Client, worker: RunningWorker, trained_model: TrainedModel) -> None:
    row = trained_model.X_test[0]
    result = client.wait(client.send(TASK_PREDICT, {"features": row.tolist()}, worker.queue))
    assert result["hostname"] == worker.hostname
    assert result["prediction"] == pytest.approx(
        float(trained_model.reference(row[None])[0]), abs=1e-6
    )


def test_results_expire_after_the_configured_ttl(
    client: Client, limits_worker: RunningWorker, redis_client: redis.Redis
) -> None:
    ok = client.send(TASK_PREDICT, {"features": FIVE}, limits_worker.queue)
    failed = client.send(TASK_PREDICT, {"features": FIVE[:2]}, limits_worker.queue)
    # Failed by the worker's main process, not by a task: stored by another code path.
    refused = str(uuid.uuid4())
    with Connection(client.settings.broker) as conn:
        conn.Producer().publish(
            "garbage", routing_key=limits_worker.queue, exchange="", content_type="text/plain",
            headers={"task": TASK_PREDICT, "id": refused},
        )  # fmt: skip
    states = {s.task_id: s.state for s in client.iter_finished([ok, failed, refused])}
    assert states == {ok: "SUCCESS", failed: "FAILURE", refused: "FAILURE"}
    for task_id in (ok, failed, refused):
        ttl = client.redis.ttl(f"celery-task-meta-{task_id}")
        assert 0 < ttl <= RESULT_TTL_S, (task_id, ttl)


def test_each_queue_has_the_model_info_of_its_own_workers(
    client: Client, limits_worker: RunningWorker, cpu_worker: RunningWorker
) -> None:
    # The shared worker's limit is not this one's: producers validate against the right one.
    mine = client.model_info(limits_worker.queue, refresh=True)
    shared = client.model_info(cpu_worker.queue, refresh=True)
    assert mine is not None and shared is not None
    assert mine.max_batch_rows == len(SLOW_ROWS) != shared.max_batch_rows
    raw = client.redis.get(model_info_key(row_queue(limits_worker.queue)))
    assert raw is not None  # published for its row queue too


def test_a_job_past_the_soft_time_limit_fails_clearly_and_the_worker_goes_on(
    client: Client, limits_worker: RunningWorker, trained_model: TrainedModel
) -> None:
    status = finished(
        client, client.send(TASK_PREDICT_BATCH, {"rows": SLOW_ROWS}, limits_worker.queue)
    )
    assert status.state == "FAILURE"
    assert status.error is not None
    assert "SoftTimeLimitExceeded" in f"{status.error.type}: {status.error.message}", status
    assert_serves(client, limits_worker, trained_model)


def test_an_oversized_message_fails_with_message_too_large(
    client: Client, limits_worker: RunningWorker, trained_model: TrainedModel
) -> None:
    status = finished(
        client, client.send(TASK_PREDICT_BATCH, {"rows": OVERSIZED_ROWS}, limits_worker.queue)
    )
    assert status.state == "FAILURE" and status.error is not None
    assert status.error.type == "MessageTooLarge"
    assert f"exceeds the maximum of {MAX_MESSAGE_BYTES}" in status.error.message
    assert status.error.retryable is False
    assert_serves(client, limits_worker, trained_model)


def test_a_compressed_message_is_inflated_only_up_to_the_limit(
    client: Client,
    limits_worker: RunningWorker,
    trained_model: TrainedModel,
    celery_sender: Celery,
) -> None:
    # ~5 MB of JSON in ~10 KB of zlib: refused once MAX_MESSAGE_BYTES are inflated.
    bomb = celery_sender.send_task(
        TASK_PREDICT_BATCH, kwargs={"rows": OVERSIZED_ROWS}, queue=limits_worker.queue,
        compression="zlib",
    )  # fmt: skip
    status = finished(client, str(bomb.id))
    assert status.error is not None and status.error.type == "MessageTooLarge"
    assert status.error.message == f"message body exceeds the maximum of {MAX_MESSAGE_BYTES} bytes"
    # A compressed message within the limit is served.
    rows = trained_model.X_test[:50]
    small = celery_sender.send_task(
        TASK_PREDICT_BATCH, kwargs={"rows": rows.tolist()}, queue=limits_worker.queue,
        compression="bzip2",
    )  # fmt: skip
    result = client.wait(str(small.id))
    np.testing.assert_allclose(result["predictions"], trained_model.reference(rows), atol=1e-6)


@pytest.mark.parametrize(
    ("task", "kwargs", "exc_type", "text"),
    [
        (TASK_PREDICT, {"features": [0.5] * 200_000}, "FeatureCountMismatch", "200000 features"),
        (
            TASK_PREDICT_BATCH,
            {"rows": [FIVE, "x", [0] * 200_000]},
            "FeatureCountMismatch",
            "row 2",
        ),
    ],
    ids=["200,000 features", "a 200,000-value row after a bad one"],
)
def test_huge_shapes_are_refused_on_their_shape(
    client: Client, cpu_worker: RunningWorker, task: str, kwargs: dict, exc_type: str, text: str
) -> None:
    status = finished(client, client.send(task, kwargs))
    assert status.error is not None and status.error.type == exc_type
    assert text in status.error.message
