"""Jobs through a real Redis and a real prefork worker: results, latency, bad input."""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from celery import Celery

from contract.errors import FeatureCountMismatch, InvalidInput
from contract.names import QUEUE_CPU, TASK_PREDICT, TASK_PREDICT_BATCH, row_queue
from producer.client import Client
from stack.processes import celery_env, worker_process
from tests.support import TEST_MAX_BATCH_ROWS, RunningWorker, TrainedModel, serving

pytestmark = pytest.mark.integration


@pytest.fixture
def client(producer_settings, cpu_worker: RunningWorker):
    with Client(producer_settings) as c:
        yield c


def test_predict_returns_the_model_prediction_with_metadata(
    client: Client, cpu_worker: RunningWorker, trained_model: TrainedModel
) -> None:
    row = trained_model.X_test[0]
    result = client.wait(client.submit(row.tolist()))
    assert result["prediction"] == pytest.approx(
        float(trained_model.reference(row[None])[0]), abs=1e-6
    )
    assert result["model_name"] == trained_model.manifest.name
    assert result["model_version"] == trained_model.manifest.version
    assert result["provider"] == "CPUExecutionProvider"
    assert result["device"] == "cpu"
    assert result["hostname"] == cpu_worker.hostname
    latency = result["latency"]
    assert latency["queue_wait_ms"] is not None and latency["queue_wait_ms"] >= 0
    assert 0 <= latency["inference_ms"] <= latency["task_ms"]


def test_batch_returns_predictions_in_row_order(
    client: Client, trained_model: TrainedModel
) -> None:
    rows = trained_model.X_test[:500]
    result = client.wait(client.submit_batch(rows.tolist()))
    assert result["rows"] == 500
    np.testing.assert_allclose(result["predictions"], trained_model.reference(rows), atol=1e-6)


def test_status_goes_from_pending_to_success(client: Client, trained_model: TrainedModel) -> None:
    assert client.status("no-such-task").state == "PENDING"
    task_id = client.submit(trained_model.X_test[1].tolist())
    client.wait(task_id)
    status = client.status(task_id)
    assert status.state == "SUCCESS" and status.result is not None and status.error is None


FIVE = [0.1, 0.2, 0.3, 0.4, 0.5]
BAD_INPUTS: list[tuple[str, dict[str, Any], str, str]] = [
    ("too few features", {"features": [0.1, 0.2]}, "FeatureCountMismatch", "expects 5"),
    ("too many features", {"features": [*FIVE, 0.6]}, "FeatureCountMismatch", "expects 5"),
    ("a string", {"features": [0.1, "x", 0.3, 0.4, 0.5]}, "InvalidInput", "features.1"),
    ("a numeric string", {"features": ["0.1", 0.2, 0.3, 0.4, 0.5]}, "InvalidInput", "features.0"),
    ("a boolean", {"features": [True, 0.2, 0.3, 0.4, 0.5]}, "InvalidInput", "features.0"),
    ("null", {"features": [None, 0.2, 0.3, 0.4, 0.5]}, "InvalidInput", "features.0"),
    ("NaN", {"features": [0.1, math.nan, 0.3, 0.4, 0.5]}, "InvalidInput", "finite"),
    ("infinity", {"features": [0.1, 0.2, math.inf, 0.4, 0.5]}, "InvalidInput", "finite"),
    ("empty", {"features": []}, "InvalidInput", "at least 1"),
    ("not a list", {"features": 5}, "InvalidInput", "list"),
    ("missing kwarg", {}, "InvalidInput", "features: Field required"),
    ("extra kwarg", {"features": FIVE, "model_path": "/etc/passwd"}, "InvalidInput", "model_path"),
]


@pytest.mark.parametrize(
    ("label", "kwargs", "exc_type", "text"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS]
)
def test_bad_single_row_fails_with_a_typed_error(
    client: Client, label: str, kwargs: dict[str, Any], exc_type: str, text: str
) -> None:
    # Straight to the queue: the producer's own validation would refuse these.
    status = next(client.iter_finished([client.send(TASK_PREDICT, kwargs)]))
    assert status.state == "FAILURE"
    assert status.error is not None
    assert status.error.type == exc_type
    assert text in status.error.message
    assert status.error.retryable is False


BAD_BATCHES: list[tuple[str, dict[str, Any], str, str]] = [
    ("no rows", {"rows": []}, "InvalidInput", "at least 1"),
    ("ragged", {"rows": [FIVE, [0.1, 0.2]]}, "FeatureCountMismatch", "row 1"),
    (
        "NaN deep inside",
        {"rows": [FIVE, FIVE, [0.1, 0.2, math.nan, 0.4, 0.5]]},
        "InvalidInput",
        "rows.2.2",
    ),
    (
        "too many rows",
        {"rows": [FIVE] * (TEST_MAX_BATCH_ROWS + 1)},
        "TooManyRows",
        str(TEST_MAX_BATCH_ROWS),
    ),
    ("rows not a list of lists", {"rows": FIVE}, "InvalidInput", "rows.0"),
]


@pytest.mark.parametrize(
    ("label", "kwargs", "exc_type", "text"), BAD_BATCHES, ids=[b[0] for b in BAD_BATCHES]
)
def test_bad_batch_fails_with_a_typed_error(
    client: Client, label: str, kwargs: dict[str, Any], exc_type: str, text: str
) -> None:
    status = next(client.iter_finished([client.send(TASK_PREDICT_BATCH, kwargs)]))
    assert status.state == "FAILURE"
    assert status.error is not None and status.error.type == exc_type
    assert text in status.error.message


@pytest.mark.parametrize("queue", [QUEUE_CPU, row_queue(QUEUE_CPU)], ids=["celery", "row-lane"])
def test_positional_arguments_are_refused(
    client: Client, celery_sender: Celery, queue: str
) -> None:
    # Either way in: Celery's consumer (inference.cpu) or the row lane (inference.cpu.rows).
    result = celery_sender.send_task(TASK_PREDICT, args=[FIVE], queue=queue)
    status = next(client.iter_finished([result.id]))
    assert status.error is not None and status.error.type == "InvalidInput"
    assert "positional" in status.error.message


def test_worker_keeps_serving_after_a_burst_of_bad_jobs(
    client: Client, trained_model: TrainedModel
) -> None:
    bad = [client.send(TASK_PREDICT, kw) for _, kw, _, _ in BAD_INPUTS * 5]
    good_rows = trained_model.X_test[:20]
    good = [client.send(TASK_PREDICT, {"features": r.tolist()}) for r in good_rows]
    finished = {s.task_id: s for s in client.iter_finished(bad + good)}
    assert all(finished[t].state == "FAILURE" for t in bad)
    got = [finished[t].result["prediction"] for t in good]  # type: ignore[index]
    np.testing.assert_allclose(got, trained_model.reference(good_rows), atol=1e-6)


def test_producer_refuses_bad_input_before_enqueueing(client: Client) -> None:
    with pytest.raises(InvalidInput, match="finite"):
        client.submit([0.1, math.nan, 0.3, 0.4, 0.5])
    # The feature count is known from the model info the workers published.
    with pytest.raises(FeatureCountMismatch, match="expects 5"):
        client.submit([0.1, 0.2, 0.3])
    with pytest.raises(InvalidInput, match="exceed"):
        client.submit_batch([FIVE] * (TEST_MAX_BATCH_ROWS + 1))


@pytest.fixture(scope="module")
def laneless_worker(
    redis_url: str, trained_model: TrainedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningWorker]:
    """INFERENCE_ROW_LANE=false, the row queue named in -Q: Celery's consumer serves it."""
    queue = f"laneless-{uuid.uuid4().hex[:8]}"
    hostname = f"{queue}@tests"
    env = celery_env(redis_url, model_dir=trained_model.model_dir, row_lane="false")
    log = tmp_path_factory.mktemp("logs") / "laneless.log"
    proc = worker_process(env, log, queue=f"{queue},{row_queue(queue)}", name=hostname, pool="solo")
    with serving(proc, redis_url, hostname, queue) as worker:
        yield worker


def test_without_the_row_lane_celery_serves_the_row_queue_from_the_same_messages(
    client: Client, laneless_worker: RunningWorker, trained_model: TrainedModel
) -> None:
    # The messages the client builds itself are Celery's own: a stock consumer takes them.
    rows = trained_model.X_test[:20]
    ids = client.submit_many(rows.tolist(), laneless_worker.queue)
    bad = client.send(TASK_PREDICT, {"features": [1.0]}, laneless_worker.queue)
    finished = {s.task_id: s for s in client.iter_finished([*ids, bad])}
    got = [finished[t].result["prediction"] for t in ids]  # type: ignore[index]
    np.testing.assert_allclose(got, trained_model.reference(rows), atol=1e-6)
    # One at a time: no batch_size beyond 1, and errors typed as on the lane.
    assert {finished[t].result["batch_size"] for t in ids} == {1}  # type: ignore[index]
    assert finished[bad].error is not None and finished[bad].error.type == "FeatureCountMismatch"
