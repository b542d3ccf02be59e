"""The row lane against a real Redis: atomic take, kombu-compatible holding and restore,
results Celery can read, and bad jobs failed one by one without stopping their batch."""

from __future__ import annotations

import datetime
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import fakeredis
import numpy as np
import pytest
import redis
from celery import Celery
from kombu import Connection

from contract.envelope import read_task_message, task_message
from contract.errors import FeatureCountMismatch, InvalidInput
from contract.names import (
    TASK_EXPLAIN,
    TASK_NOOP,
    TASK_PREDICT,
    TASK_PREDICT_BATCH,
    UNACKED_INDEX_KEY,
    UNACKED_KEY,
    result_key,
)
from contract.schemas import (
    BatchResult,
    ExplainResult,
    PredictResult,
    WorkerState,
    decode_f32,
    encode_f32,
)
from tests.support import TrainedModel
from worker import service
from worker.lane import transport
from worker.lane.server import RowLane
from worker.model import load_model
from worker.runtime import Runtime
from worker.settings import WorkerSettings
from worker.stats import Heartbeat, ProcessStats

pytestmark = pytest.mark.integration

QUEUE = "lane-tests.rows"
FIVE = [0.1, 0.2, 0.3, 0.4, 0.5]
# A database of its own, flushed per test: restore_visible below hands back every held
# message in the database, and the shared test worker's must not be among them.
LANE_DB = 7


@pytest.fixture
def lane_url(redis_url: str) -> Iterator[str]:
    parts = urlsplit(redis_url)
    url = urlunsplit(parts._replace(path=f"/{LANE_DB}"))
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url


@pytest.fixture
def client(lane_url: str) -> Iterator[redis.Redis]:
    conn = redis.Redis.from_url(lane_url)
    yield conn
    conn.close()


@pytest.fixture
def lanes(lane_url: str, trained_model: TrainedModel) -> Iterator[Callable[..., RowLane]]:
    """Makes lanes on the test database (settings as keyword arguments); stops them after."""
    made: list[RowLane] = []

    def make(**settings: object) -> RowLane:
        made.append(make_lane(lane_url, trained_model, **settings))
        return made[-1]

    yield make
    for lane in made:
        lane.stop()


def make_lane(url: str, trained: TrainedModel, **settings: object) -> RowLane:
    config = WorkerSettings.model_validate(
        {"redis_url": url, "model_dir": trained.model_dir, "warmup_runs": 0, **settings}
    )
    stats = ProcessStats(
        WorkerState(
            hostname="lane@tests",
            pid=1,
            queues=[QUEUE],
            pool="prefork",
            model_name="m",
            model_version="v",
            provider="cpu",
            device="cpu",
            started_at=0,
            updated_at=0,
        )
    )
    rt = Runtime(config, load_model(config), stats, Heartbeat(fakeredis.FakeRedis(), stats, 1.0))
    # Result documents come from a Celery backend, as in a worker: the app's own.
    backend = Celery("lane-tests", backend=url).backend
    return RowLane(rt, backend, QUEUE, "lane@tests")


def push(client: redis.Redis, kwargs: dict[str, object], task: str = TASK_PREDICT) -> str:
    task_id, text = task_message(task, kwargs, QUEUE, headers={"enqueued_at": time.time()})
    client.lpush(QUEUE, text)
    return task_id


def meta(client: redis.Redis, task_id: str) -> dict[str, object]:
    raw = client.get(result_key(task_id))
    assert raw is not None, task_id
    doc: dict[str, object] = json.loads(raw)
    return doc


def test_take_holds_messages_where_kombu_restores_them(
    client: redis.Redis, lanes: Callable[..., RowLane], lane_url: str, trained_model: TrainedModel
) -> None:
    lane = lanes(row_batch_max=3)
    ids = [push(client, {"features": FIVE}) for _ in range(5)]
    taken = lane.take()
    # Oldest first, at most row_batch_max, and each one held under its delivery tag.
    assert [read_task_message(raw).task_id for _, raw in taken] == ids[:3]
    assert client.llen(QUEUE) == 2
    for tag, raw in taken:
        held = client.hget(UNACKED_KEY, tag)
        assert held is not None and json.loads(held) == [json.loads(raw), "", QUEUE]
        assert client.zscore(UNACKED_INDEX_KEY, tag) == pytest.approx(time.time(), abs=5)
    # A process that dies now loses nothing: kombu's own scan hands them back.
    with Connection(lane_url, transport_options={"visibility_timeout": 0}) as conn:
        channel: Any = conn.default_channel  # kombu's Redis channel; its stub has no qos
        channel.qos.restore_visible(num=100)
    assert client.hlen(UNACKED_KEY) == 0
    back = [read_task_message(m) for m in client.lrange(QUEUE, 0, -1)]
    assert sorted(m.task_id for m in back) == sorted(ids)


def test_jobs_sent_with_a_priority_are_taken_too_default_priority_first(
    client: redis.Redis, lanes: Callable[..., RowLane], lane_url: str, trained_model: TrainedModel
) -> None:
    """kombu's own Redis transport puts the jobs where it keeps priorities (a stock Celery
    client sends them): a change of kombu's layout fails here."""
    lane = lanes()
    sender = Celery("lane-tests-sender", broker=lane_url)
    sender.conf.update(task_serializer="json")
    try:
        low = sender.send_task(TASK_PREDICT, kwargs={"features": FIVE}, queue=QUEUE, priority=6)
        plain = sender.send_task(TASK_PREDICT, kwargs={"features": FIVE}, queue=QUEUE)
    finally:
        sender.close()
    assert client.llen(transport.priority_lists(QUEUE)[2]) == 1  # priority 6's own list
    taken = lane.take()
    assert [read_task_message(raw).task_id for _, raw in taken] == [plain.id, low.id]
    assert all(client.hexists(UNACKED_KEY, tag) for tag, _ in taken)


def test_single_rows_have_their_results_before_a_batch_taken_with_them_runs(
    client: redis.Redis,
    lanes: Callable[..., RowLane],
    trained_model: TrainedModel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lane = lanes()
    single = push(client, {"features": FIVE})
    rows = np.random.default_rng(0).uniform(size=(100_000, 5)).astype(np.float32)
    batch = push(client, {"rows_f32": encode_f32(rows), "n_features": 5}, TASK_PREDICT_BATCH)
    seen: dict[str, int] = {}
    run_batch = service.predict_batch

    def spy(*args: Any, **kwargs: Any) -> dict[str, Any]:
        seen["single's result stored"] = int(client.exists(result_key(single)))
        seen["single acknowledged"] = int(client.hlen(UNACKED_KEY) == 1)
        return run_batch(*args, **kwargs)

    monkeypatch.setattr(service, "predict_batch", spy)
    taken = lane.take()
    assert [read_task_message(raw).task_id for _, raw in taken] == [single, batch]
    lane.serve(taken)
    assert seen == {"single's result stored": 1, "single acknowledged": 1}
    assert meta(client, single)["status"] == "SUCCESS"
    assert BatchResult.model_validate(meta(client, batch)["result"]).rows == 100_000
    assert client.hlen(UNACKED_KEY) == 0


def test_a_batch_serves_good_jobs_and_fails_bad_ones_each_with_its_own_result(
    client: redis.Redis, lanes: Callable[..., RowLane], lane_url: str, trained_model: TrainedModel
) -> None:
    lane = lanes()
    rows = trained_model.X_test[:6]
    good = [push(client, {"features": r.tolist()}) for r in rows]
    short = push(client, {"features": [0.1, 0.2]})
    nan = push(client, {"features": [0.1, float("nan"), 0.3, 0.4, 0.5]})
    batch = push(client, {"rows": rows[:3].tolist()}, task=TASK_PREDICT_BATCH)
    other = push(client, {}, task=TASK_NOOP)
    client.lpush(QUEUE, "not json at all")
    lane.serve(lane.take())

    for task_id, expected in zip(good, trained_model.reference(rows), strict=True):
        doc = meta(client, task_id)
        assert doc["status"] == "SUCCESS" and doc["task_id"] == task_id
        result = PredictResult.model_validate(doc["result"])
        assert result.prediction == pytest.approx(float(expected), abs=1e-6)
        assert result.batch_size == 6 and result.hostname == "lane@tests"
        assert result.latency.queue_wait_ms is not None
        assert 0 < client.ttl(result_key(task_id)) <= lane.transport.result_ttl
    assert meta(client, short)["result"]["exc_type"] == "FeatureCountMismatch"  # type: ignore[index]
    assert meta(client, nan)["result"]["exc_type"] == "InvalidInput"  # type: ignore[index]
    assert "inference.explain jobs only" in str(meta(client, other)["result"])
    # A batch job on the lane is served on its own, by the same code as Celery's path.
    served = BatchResult.model_validate(meta(client, batch)["result"])
    assert served.rows == 3 and served.predictions is not None
    np.testing.assert_allclose(served.predictions, trained_model.reference(rows[:3]), atol=1e-6)
    # Everything was acknowledged, the bad ones included; nothing is left behind.
    assert client.hlen(UNACKED_KEY) == 0 and client.zcard(UNACKED_INDEX_KEY) == 0
    assert client.llen(QUEUE) == 0
    snap = lane.rt.stats.snapshot()
    assert (snap.jobs_done, snap.jobs_failed) == (7, 4)
    assert snap.batch_sizes == {"4-7": 1}


def test_celery_reads_the_lanes_results_and_raises_its_errors(
    client: redis.Redis, lanes: Callable[..., RowLane], lane_url: str, trained_model: TrainedModel
) -> None:
    lane = lanes()
    row = trained_model.X_test[0]
    ok = push(client, {"features": row.tolist()})
    bad = push(client, {"features": [1.0]})
    lane.serve(lane.take())
    app = Celery("reader", broker=lane_url, backend=lane_url)
    app.conf.update(result_accept_content=["json"], accept_content=["json"])
    try:
        result = app.AsyncResult(ok).get(timeout=10)
        assert result["prediction"] == pytest.approx(
            float(trained_model.reference(row[None])[0]), abs=1e-6
        )
        with pytest.raises(FeatureCountMismatch, match="expects 5"):
            app.AsyncResult(bad).get(timeout=10)
        assert issubclass(FeatureCountMismatch, InvalidInput)
    finally:
        app.close()


def test_the_lane_waits_up_to_row_batch_wait_ms_to_fill_a_batch(
    client: redis.Redis, lanes: Callable[..., RowLane], lane_url: str, trained_model: TrainedModel
) -> None:
    lane = lanes(row_batch_wait_ms=1000, row_batch_max=2)
    push(client, {"features": FIVE})
    later = threading.Timer(0.05, lambda: push(client, {"features": FIVE}))
    later.start()
    started = time.monotonic()
    taken = lane.take()
    # Both, and it returned as soon as the batch was full, not after the whole wait.
    assert len(taken) == 2 and time.monotonic() - started < 0.9
    later.join()
    # Without a wait, a lone job goes at once.
    quick = lanes()
    push(client, {"features": FIVE})
    assert len(quick.take()) == 1


def test_a_running_lane_serves_until_stopped_and_then_takes_nothing(
    client: redis.Redis, lanes: Callable[..., RowLane], lane_url: str, trained_model: TrainedModel
) -> None:
    lane = lanes()
    lane.start()
    rows = np.asarray(trained_model.X_test[:50])
    ids = [push(client, {"features": r.tolist()}) for r in rows]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and client.exists(*(result_key(t) for t in ids)) < 50:
        time.sleep(0.01)
    got = [PredictResult.model_validate(meta(client, t)["result"]).prediction for t in ids]
    np.testing.assert_allclose(got, trained_model.reference(rows), atol=1e-6)
    lane.stop(timeout=5)
    assert not lane._thread.is_alive()
    late = push(client, {"features": FIVE})
    time.sleep(0.2)
    assert client.get(result_key(late)) is None and client.llen(QUEUE) == 1


def test_an_expired_job_is_revoked_not_run(
    client: redis.Redis, lanes: Callable[..., RowLane], lane_url: str, trained_model: TrainedModel
) -> None:
    lane = lanes()
    past = (datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=5)).isoformat()
    future = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)).isoformat()
    expired_id, expired = task_message(
        TASK_PREDICT, {"features": FIVE}, QUEUE, None, {"expires": past}
    )
    live_id, live = task_message(TASK_PREDICT, {"features": FIVE}, QUEUE, None, {"expires": future})
    client.lpush(QUEUE, expired, live)
    lane.serve(lane.take())
    revoked = meta(client, expired_id)
    assert revoked["status"] == "REVOKED"
    assert revoked["result"]["exc_type"] == "TaskRevokedError"  # type: ignore[index]
    assert meta(client, live_id)["status"] == "SUCCESS"
    assert client.hlen(UNACKED_KEY) == 0


def test_a_job_the_model_fails_on_fails_alone(
    client: redis.Redis,
    lanes: Callable[..., RowLane],
    lane_url: str,
    trained_model: TrainedModel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lane = lanes()
    real = lane.rt.model.predict
    poison = 0.123

    def predict(rows: np.ndarray) -> np.ndarray:
        if np.any(np.isclose(rows[:, 0], poison)):
            raise RuntimeError("onnxruntime: bad node")
        return real(rows)

    monkeypatch.setattr(lane.rt.model, "predict", predict)
    rows = trained_model.X_test[:4]
    good = [push(client, {"features": r.tolist()}) for r in rows]
    bad = push(client, {"features": [poison, 0.2, 0.3, 0.4, 0.5]})
    lane.serve(lane.take())
    got = [PredictResult.model_validate(meta(client, t)["result"]).prediction for t in good]
    np.testing.assert_allclose(got, trained_model.reference(rows), atol=1e-6)
    failed = meta(client, bad)
    assert failed["status"] == "FAILURE"
    assert failed["result"]["exc_type"] == "PredictionFailed"  # type: ignore[index]
    assert "bad node" in str(failed["result"])
    assert client.hlen(UNACKED_KEY) == 0


def test_a_large_float32_batch_is_held_by_its_tag_and_served_in_kind(
    client: redis.Redis, lanes: Callable[..., RowLane], lane_url: str, trained_model: TrainedModel
) -> None:
    lane = lanes(max_batch_rows=200_000)
    rows = np.tile(trained_model.X_test, (200_000 // len(trained_model.X_test) + 1, 1))[:200_000]
    kwargs = {"rows_f32": encode_f32(rows), "n_features": rows.shape[1]}
    task_id = push(client, kwargs, task=TASK_PREDICT_BATCH)
    (taken,) = lane.take()
    assert len(taken[1]) > 4_000_000  # megabytes: the tag is found without decoding them
    assert taken[0] and client.hexists(UNACKED_KEY, taken[0])
    lane.serve([taken])
    result = BatchResult.model_validate(meta(client, task_id)["result"])
    assert result.rows == len(rows) and result.predictions is None
    assert result.predictions_f32 is not None
    got = decode_f32(result.predictions_f32)
    np.testing.assert_allclose(got, trained_model.reference(rows), atol=1e-5)
    assert client.hlen(UNACKED_KEY) == 0


def test_an_oversized_message_fails_with_message_too_large_undecoded(
    client: redis.Redis, lanes: Callable[..., RowLane], lane_url: str, trained_model: TrainedModel
) -> None:
    lane = lanes(max_message_bytes=64 * 1024)
    task_id = push(client, {"rows": [FIVE] * 20_000}, task=TASK_PREDICT_BATCH)
    small = push(client, {"features": FIVE})
    # The large one fills a take's byte budget on its own: the small one comes next time.
    first = lane.take()
    assert len(first) == 1
    lane.serve(first)
    lane.serve(lane.take())
    failed = meta(client, task_id)
    assert failed["status"] == "FAILURE"
    assert failed["result"]["exc_type"] == "MessageTooLarge"  # type: ignore[index]
    assert meta(client, small)["status"] == "SUCCESS"
    assert client.hlen(UNACKED_KEY) == 0


def test_a_batch_the_lane_cannot_serve_fails_its_jobs_instead_of_holding_them(
    client: redis.Redis, lanes: Callable[..., RowLane], monkeypatch: pytest.MonkeyPatch
) -> None:
    lane = lanes()

    def broken(*_: object) -> list[object]:
        raise RuntimeError("a bug in the lane")

    monkeypatch.setattr(service, "predict_rows", broken)
    ids = [push(client, {"features": FIVE}) for _ in range(3)]
    lane.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and client.exists(*(result_key(t) for t in ids)) < 3:
        time.sleep(0.01)
    for task_id in ids:
        doc = meta(client, task_id)
        assert doc["status"] == "FAILURE"
        assert doc["result"]["exc_type"] == "TaskFailed"  # type: ignore[index]
        assert "a bug in the lane" in str(doc["result"])
    # Answered and released, not held until the visibility timeout; the lane goes on.
    assert client.hlen(UNACKED_KEY) == 0
    monkeypatch.undo()
    late = push(client, {"features": FIVE})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not client.exists(result_key(late)):
        time.sleep(0.01)
    assert meta(client, late)["status"] == "SUCCESS"


def test_a_stored_success_is_never_overwritten_by_a_job_reusing_its_id(
    client: redis.Redis,
    lanes: Callable[..., RowLane],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Celery's rule, on the lane too: the first successful result of a task id stays."""
    lane = lanes()
    first_id, first = task_message(TASK_PREDICT, {"features": FIVE}, QUEUE)
    client.lpush(QUEUE, first)
    lane.serve(lane.take())
    stored = client.get(result_key(first_id))
    assert stored is not None and json.loads(stored)["status"] == "SUCCESS"
    # Another sender reuses the id, with other features, then with bad ones.
    _, again = task_message(TASK_PREDICT, {"features": [9.0] * 5}, QUEUE, first_id)
    _, bad = task_message(TASK_PREDICT, {"features": [1.0]}, QUEUE, first_id)
    client.lpush(QUEUE, again, bad)
    with caplog.at_level("WARNING"):
        lane.serve(lane.take())
    assert client.get(result_key(first_id)) == stored
    assert "already holds a successful result" in caplog.text
    assert client.hlen(UNACKED_KEY) == 0  # released all the same
    # A result that is not a success (here a failure) is replaced by a later run's.
    failed_id, failing = task_message(TASK_PREDICT, {"features": [1.0]}, QUEUE)
    client.lpush(QUEUE, failing)
    lane.serve(lane.take())
    assert meta(client, failed_id)["status"] == "FAILURE"
    _, fixed = task_message(TASK_PREDICT, {"features": FIVE}, QUEUE, failed_id)
    client.lpush(QUEUE, fixed)
    lane.serve(lane.take())
    assert meta(client, failed_id)["status"] == "SUCCESS"


def test_explain_jobs_taken_together_are_explained_in_one_pass(
    client: redis.Redis,
    lanes: Callable[..., RowLane],
    trained_model: TrainedModel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lane = lanes()
    rows = trained_model.X_test[:4]
    good = [push(client, {"rows": [r.tolist()]}, TASK_EXPLAIN) for r in rows[:3]]
    bad = push(client, {"rows": [[1.0]]}, TASK_EXPLAIN)
    pair = push(client, {"rows": rows[2:4].tolist()}, TASK_EXPLAIN)
    single = push(client, {"features": FIVE})
    passes: list[int] = []
    explain_many = service.explain_many

    def spy(rt: Any, jobs: list[service.Job]) -> list[Any]:
        passes.append(len(jobs))
        return explain_many(rt, jobs)

    monkeypatch.setattr(service, "explain_many", spy)
    lane.serve(lane.take())
    assert passes == [5]
    assert meta(client, single)["status"] == "SUCCESS"
    explained = [ExplainResult.model_validate(meta(client, t)["result"]) for t in good]
    together = ExplainResult.model_validate(meta(client, pair)["result"])
    assert together.contributions[0] == explained[2].contributions[0]
    assert [e.rows for e in explained] == [1, 1, 1] and together.rows == 2
    served = trained_model.reference(rows)
    assert [e.predictions[0] for e in explained] == pytest.approx(served[:3], abs=1e-6)
    assert meta(client, bad)["status"] == "FAILURE"
    assert "FeatureCountMismatch" in str(meta(client, bad)["result"])
    assert client.hlen(UNACKED_KEY) == 0
