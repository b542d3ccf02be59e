"""Task bodies without Celery: results, latency fields, counters."""

from __future__ import annotations

import math
import time

import fakeredis
import numpy as np
import pytest

from contract.errors import FeatureCountMismatch, InvalidInput, TooManyRows
from contract.schemas import BatchResult, PredictResult, WorkerState, decode_f32, encode_f32
from tests.support import TrainedModel
from worker import service
from worker.model import load_model
from worker.runtime import Runtime
from worker.settings import WorkerSettings
from worker.stats import Heartbeat, ProcessStats


@pytest.fixture
def rt(trained_model: TrainedModel) -> Runtime:
    settings = WorkerSettings(model_dir=trained_model.model_dir, max_batch_rows=10, warmup_runs=0)
    model = load_model(settings)
    stats = ProcessStats(
        WorkerState(
            hostname="h@t",
            pid=1,
            queues=["inference.cpu"],
            pool="solo",
            model_name="m",
            model_version="v",
            provider="cpu",
            device="cpu",
            started_at=0,
            updated_at=0,
        )
    )
    return Runtime(settings, model, stats, Heartbeat(fakeredis.FakeRedis(), stats, 1.0))


def test_predict_one(rt: Runtime, trained_model: TrainedModel) -> None:
    row = trained_model.X_test[3]
    enqueued = time.time() - 0.25
    result = PredictResult.model_validate(
        service.predict_one(rt, service.Job((), {"features": row.tolist()}, enqueued, "h@t"))
    )
    assert result.prediction == pytest.approx(
        float(trained_model.reference(row[None])[0]), abs=1e-6
    )
    assert result.hostname == "h@t" and result.model_version == trained_model.manifest.version
    assert result.latency.queue_wait_ms is not None and result.latency.queue_wait_ms >= 250
    assert rt.stats.snapshot().jobs_done == 1


def test_predict_batch_counts_rows(rt: Runtime, trained_model: TrainedModel) -> None:
    rows = trained_model.X_test[:10]
    result = BatchResult.model_validate(
        service.predict_batch(rt, service.Job((), {"rows": rows.tolist()}, None, "h"))
    )
    np.testing.assert_allclose(result.predictions, trained_model.reference(rows), atol=1e-6)
    assert result.latency.queue_wait_ms is None
    snap = rt.stats.snapshot()
    assert (snap.jobs_done, snap.rows_done, len(snap.recent_task_ms)) == (1, 10, 1)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"rows": [[1.0] * 5] * 11}, TooManyRows),
        ({"rows": [[1.0] * 4]}, FeatureCountMismatch),
        ({"rows": [[1.0, 2.0, 3.0, 4.0, math.inf]]}, InvalidInput),
    ],
)
def test_failures_are_counted(
    rt: Runtime, kwargs: dict[str, object], error: type[Exception]
) -> None:
    with pytest.raises(error):
        service.predict_batch(rt, service.Job((), kwargs, None, "h"))
    snap = rt.stats.snapshot()
    assert (snap.jobs_done, snap.jobs_failed) == (0, 1)


def f32(rows: np.ndarray | list[list[float]], n_features: int | None = None) -> dict[str, object]:
    matrix = np.asarray(rows, dtype=np.float32)
    return {"rows_f32": encode_f32(matrix), "n_features": n_features or matrix.shape[1]}


def test_predict_batch_f32_answers_in_f32(rt: Runtime, trained_model: TrainedModel) -> None:
    rows = trained_model.X_test[:10]
    raw = service.predict_batch(rt, service.Job((), f32(rows), None, "h"))
    assert "predictions" not in raw
    result = BatchResult.model_validate(raw)
    assert result.rows == 10 and result.predictions is None and result.predictions_f32
    got = decode_f32(result.predictions_f32, name="predictions_f32")
    # The very float32 values the JSON path gives, and the model's.
    by_list = service.predict_batch(rt, service.Job((), {"rows": rows.tolist()}, None, "h"))
    assert "predictions_f32" not in by_list
    assert got.tolist() == np.float32(by_list["predictions"]).tolist()
    np.testing.assert_array_equal(got, trained_model.reference(rows).astype(np.float32))
    snap = rt.stats.snapshot()
    assert (snap.jobs_done, snap.rows_done) == (2, 20)


FIVE = [0.1, 0.2, 0.3, 0.4, 0.5]


@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({**f32([FIVE]), "rows": [FIVE]}, InvalidInput, "exactly one of rows and rows_f32"),
        ({"n_features": 5}, InvalidInput, "exactly one of rows and rows_f32"),
        ({"rows_f32": encode_f32([FIVE])}, InvalidInput, "n_features goes with rows_f32"),
        ({"rows_f32": "AAAA!AAA", "n_features": 1}, FeatureCountMismatch, "expects 5"),
        ({"rows_f32": "!" + encode_f32([FIVE])[1:], "n_features": 5}, InvalidInput, "not valid"),
        ({"rows_f32": "AAAAA", "n_features": 5}, InvalidInput, "not base64"),
        ({"rows_f32": encode_f32([1.0] * 6), "n_features": 5}, InvalidInput, "24 bytes are not"),
        (f32([FIVE, [*FIVE[:4], math.nan]]), InvalidInput, r"rows_f32\.1\.4: .*finite"),
        (f32([[math.inf, *FIVE[1:]]]), InvalidInput, r"rows_f32\.0\.0: .*finite"),
        (f32([[1.0] * 4]), FeatureCountMismatch, "rows_f32 has 4 features a row"),
        (f32([FIVE] * 11), TooManyRows, "11 rows exceed the maximum of 10"),
    ],
)
def test_predict_batch_f32_refusals(
    rt: Runtime, kwargs: dict[str, object], error: type[Exception], text: str
) -> None:
    with pytest.raises(error, match=text):
        service.predict_batch(rt, service.Job((), kwargs, None, "h"))
    snap = rt.stats.snapshot()
    assert (snap.jobs_done, snap.jobs_failed) == (0, 1)


@pytest.mark.parametrize(
    ("header", "expected"),
    [(None, None), ("123", None), (True, None), (math.nan, None), (100.0, 500.0), (200, 0.0)],
)
def test_queue_wait_header_is_sanitized(header: object, expected: float | None) -> None:
    assert service.queue_wait_ms(header, 100.5) == expected
