"""inference.explain's body without Celery: contributions, additivity, limits and errors."""

from __future__ import annotations

import fakeredis
import numpy as np
import pytest

from contract.errors import ExplainUnavailable, FeatureCountMismatch, InvalidInput, TooManyRows
from contract.schemas import ExplainResult, WorkerState, encode_f32
from tests.support import TrainedModel
from training.artifact import CONTRIBUTIONS_NAME
from worker import service
from worker.model import load_model
from worker.runtime import Runtime
from worker.settings import WorkerSettings
from worker.stats import Heartbeat, ProcessStats


def runtime(trained_model: TrainedModel, **settings: object) -> Runtime:
    config = WorkerSettings(
        model_dir=trained_model.model_dir, max_batch_rows=40, warmup_runs=0, **settings
    )
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
    return Runtime(config, load_model(config), stats, Heartbeat(fakeredis.FakeRedis(), stats, 1.0))


@pytest.fixture(scope="module")
def rt(trained_model: TrainedModel) -> Runtime:
    return runtime(trained_model)


def reference_contributions(trained_model: TrainedModel, rows: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    path = trained_model.version_dir / trained_model.manifest.files["explain"].path
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run([CONTRIBUTIONS_NAME], {"features": rows.astype(np.float32)})
    return np.asarray(out)


def explain(rt: Runtime, **kwargs: object) -> ExplainResult:
    return ExplainResult.model_validate(service.explain(rt, service.Job((), kwargs, None, "h")))


def test_explain_rows_adds_up_to_the_served_prediction(
    rt: Runtime, trained_model: TrainedModel
) -> None:
    rows = trained_model.X_test[:37]  # more than one explain.onnx call
    result = explain(rt, rows=rows.tolist())
    manifest = trained_model.manifest
    assert result.rows == 37 and result.feature_names == manifest.feature_names
    assert result.base_value == manifest.base_value
    np.testing.assert_allclose(result.predictions, trained_model.reference(rows), atol=1e-6)
    contributions = np.asarray(result.contributions)
    np.testing.assert_allclose(
        contributions, reference_contributions(trained_model, rows), atol=1e-12
    )
    gap = result.base_value + contributions.sum(axis=1) - np.asarray(result.predictions)
    assert np.abs(gap).max() <= 1e-4
    (first, *_) = result.explanations()
    assert list(first.contributions) == manifest.feature_names
    assert rt.stats.snapshot().rows_done >= 37


def test_explain_takes_rows_f32(rt: Runtime, trained_model: TrainedModel) -> None:
    rows = trained_model.X_test[:3].astype(np.float32)
    compact = explain(rt, rows_f32=encode_f32(rows), n_features=rows.shape[1])
    plain = explain(rt, rows=rows.astype(np.float64).tolist())
    assert compact.contributions == plain.contributions
    assert compact.predictions == plain.predictions


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"rows": [[1.0, 2.0]]}, FeatureCountMismatch),
        ({"rows": [[0.5] * 5] * 41}, TooManyRows),
        ({"rows": [[float("nan")] * 5]}, InvalidInput),
        ({"rows": []}, InvalidInput),
        ({"features": [0.5] * 5}, InvalidInput),
    ],
)
def test_explain_refuses_what_predict_batch_refuses(
    rt: Runtime, kwargs: dict[str, object], error: type[Exception]
) -> None:
    failed = rt.stats.snapshot().jobs_failed
    with pytest.raises(error):
        explain(rt, **kwargs)
    assert rt.stats.snapshot().jobs_failed == failed + 1


def test_a_worker_started_without_explanations_refuses_them_permanently(
    trained_model: TrainedModel,
) -> None:
    quiet = runtime(trained_model, explain=False)
    assert quiet.model.explainer is None
    with pytest.raises(ExplainUnavailable, match="INFERENCE_EXPLAIN=false") as info:
        explain(quiet, rows=[[0.5] * 5])
    assert not info.value.retryable


def test_explanations_placed_off_cuda_leave_predictions_served(
    trained_model: TrainedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    from contract.errors import ProviderUnavailable
    from worker import model as model_module

    checked = model_module._checked_session

    def placement_fails_for_explain(settings, provider, path, sample, input_name):  # type: ignore[no-untyped-def]
        if path.name == "explain.onnx":
            raise ProviderUnavailable("the GPU model explain.onnx placed 3 node(s) off CUDA")
        return checked(settings, provider, path, sample, input_name)

    monkeypatch.setattr(model_module, "_checked_session", placement_fails_for_explain)
    degraded = runtime(trained_model)
    assert degraded.model.explainer is None
    row = trained_model.X_test[0]
    assert degraded.model.predict(row[None].astype(np.float32))[0] == pytest.approx(
        float(trained_model.reference(row[None])[0]), abs=1e-6
    )
    with pytest.raises(ExplainUnavailable, match="explanations are off on this worker"):
        explain(degraded, rows=[row.tolist()])
