"""inference.explain through a real Redis and a real prefork worker: the row lane (the
producer's path) and Celery's consumer (a stock Celery client sending by name)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from celery import Celery

from contract.errors import FeatureCountMismatch
from contract.names import QUEUE_CPU, TASK_EXPLAIN, row_queue
from contract.schemas import ExplainResult, encode_f32
from producer.client import Client
from producer.health import format_model_info
from tests.support import RunningWorker, TrainedModel
from training.artifact import CONTRIBUTIONS_NAME

pytestmark = pytest.mark.integration


@pytest.fixture
def client(producer_settings, cpu_worker: RunningWorker):
    with Client(producer_settings) as c:
        yield c


def reference(trained_model: TrainedModel, rows: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    path = trained_model.version_dir / trained_model.manifest.files["explain"].path
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run([CONTRIBUTIONS_NAME], {"features": rows.astype(np.float32)})
    return np.asarray(out)


def test_client_explain_one_row_through_the_row_lane(
    client: Client, cpu_worker: RunningWorker, trained_model: TrainedModel
) -> None:
    row = trained_model.X_test[0]
    task_id = client.submit_explain([row.tolist()])
    assert client._sent.get(task_id).queue == row_queue(QUEUE_CPU)  # type: ignore[union-attr]
    result = ExplainResult.model_validate(client.wait(task_id))
    assert result.hostname == cpu_worker.hostname
    assert result.model_version == trained_model.manifest.version
    assert result.provider == "CPUExecutionProvider" and result.device == "cpu"
    (explanation,) = result.explanations()
    manifest = trained_model.manifest
    assert list(explanation.contributions) == manifest.feature_names
    assert explanation.base_value == manifest.base_value
    expected = reference(trained_model, row[None])[0]
    np.testing.assert_allclose(list(explanation.contributions.values()), expected, atol=1e-12)
    served = float(trained_model.reference(row[None])[0])
    assert explanation.prediction == pytest.approx(served, abs=1e-6)
    total = explanation.base_value + sum(explanation.contributions.values())
    assert total == pytest.approx(served, abs=1e-4)


def test_many_single_row_explanations_each_get_their_own_result(
    client: Client, trained_model: TrainedModel
) -> None:
    rows = trained_model.X_test[:30]
    ids = [client.submit_explain([r.tolist()]) for r in rows]
    results = [ExplainResult.model_validate(client.wait(i)) for i in ids]
    got = np.array([r.contributions[0] for r in results])
    np.testing.assert_allclose(got, reference(trained_model, rows), atol=1e-12)


def test_stock_celery_client_explains_a_batch_through_celerys_consumer(
    client: Client, celery_sender: Celery, trained_model: TrainedModel
) -> None:
    rows = trained_model.X_test[:200]
    sent = celery_sender.send_task(TASK_EXPLAIN, kwargs={"rows": rows.tolist()}, queue=QUEUE_CPU)
    result = ExplainResult.model_validate(client.wait(sent.id))
    assert result.rows == 200
    np.testing.assert_allclose(result.contributions, reference(trained_model, rows), atol=1e-12)
    np.testing.assert_allclose(result.predictions, trained_model.reference(rows), atol=1e-6)


def test_rows_f32_explain_on_the_lane(client: Client, trained_model: TrainedModel) -> None:
    rows = trained_model.X_test[:50].astype(np.float32)
    kwargs = {"rows_f32": encode_f32(rows), "n_features": rows.shape[1]}
    result = ExplainResult.model_validate(client.wait(client.send(TASK_EXPLAIN, kwargs)))
    np.testing.assert_allclose(result.contributions, reference(trained_model, rows), atol=1e-12)


def test_bad_explain_job_fails_permanently_on_either_path(
    client: Client, celery_sender: Celery
) -> None:
    for queue in (QUEUE_CPU, row_queue(QUEUE_CPU)):
        sent = celery_sender.send_task(TASK_EXPLAIN, kwargs={"rows": [[1.0, 2.0]]}, queue=queue)
        status = next(client.iter_finished([sent.id]))
        assert status.error is not None and status.error.type == "FeatureCountMismatch", queue
        assert status.error.retryable is False
    with pytest.raises(FeatureCountMismatch):
        client.submit_explain([[1.0, 2.0]])  # refused before it is sent


def test_model_info_carries_importances_and_base_value(
    client: Client, trained_model: TrainedModel
) -> None:
    info = client.model_info("cpu", refresh=True)
    assert info is not None
    manifest = trained_model.manifest
    assert info.base_value == manifest.base_value
    assert info.importances == manifest.importances
    assert info.metrics == manifest.metrics and info.target == manifest.target
    text = format_model_info(info)
    assert f"version {manifest.version}" in text
    assert "mean_abs_shap" in text and "permutation_r2_drop" in text
    for name in manifest.feature_names:
        assert f"  {name}" in text


def run_producer(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "producer", *args],
        env={"REDIS_URL": redis_url, "PATH": ""}, capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip


def test_cli_explain_prints_named_contributions(
    redis_url: str, cpu_worker: RunningWorker, trained_model: TrainedModel
) -> None:
    row = trained_model.X_test[2]
    proc = run_producer(redis_url, "explain", *(repr(float(v)) for v in row))
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    names = trained_model.manifest.feature_names
    assert list(printed["contributions"]) == names
    expected = reference(trained_model, row[None])[0]
    np.testing.assert_allclose([printed["contributions"][n] for n in names], expected, atol=1e-12)
    assert printed["base_value"] == trained_model.manifest.base_value
    assert printed["model_version"] == trained_model.manifest.version

    wrong = run_producer(redis_url, "explain", "1.0", "2.0")
    assert wrong.returncode == 2 and "FeatureCountMismatch" in wrong.stderr


def test_cli_model_info(
    redis_url: str, cpu_worker: RunningWorker, trained_model: TrainedModel
) -> None:
    proc = run_producer(redis_url, "model-info")
    assert proc.returncode == 0, proc.stderr
    assert f"version {trained_model.manifest.version}" in proc.stdout
    assert "importances" in proc.stdout
    as_json = json.loads(run_producer(redis_url, "model-info", "--json").stdout)
    assert as_json["importances"] == trained_model.manifest.importances
    missing = run_producer(redis_url, "model-info", "--queue", "nobody-here")
    assert missing.returncode == 1 and "nobody-here" in missing.stderr


def test_async_client_explains_like_the_sync_one(
    producer_settings, client: Client, trained_model: TrainedModel
) -> None:
    import asyncio

    from producer import AsyncClient

    rows = trained_model.X_test[:3].tolist()

    async def main() -> list:
        async with AsyncClient(producer_settings) as aclient:
            return await aclient.explain(rows, timeout=30)

    assert asyncio.run(main()) == client.explain(rows, timeout=30)
