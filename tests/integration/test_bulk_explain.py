"""`score --explain`: each row's SHAP contributions beside its prediction, in order, and
resumable like plain scoring."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest

from contract.errors import JournalError
from producer.bulk import PREDICTION_COLUMN, score_csv
from producer.bulk_outputs import SHAP_BASE_COLUMN
from producer.client import Client
from producer.settings import ProducerSettings
from tests.integration.test_bulk import many_rows, write_csv
from tests.integration.test_bulk_resume import (
    Died,
    DiesWithResultsUncollected,
    journal_chunks,
    run_score,
)
from tests.support import RunningWorker, TrainedModel
from training.artifact import CONTRIBUTIONS_NAME

pytestmark = pytest.mark.integration


def reference(trained: TrainedModel, rows: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    path = trained.version_dir / trained.manifest.files["explain"].path
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run([CONTRIBUTIONS_NAME], {"features": rows.astype(np.float32)})
    return np.asarray(out)


def assert_explained(dst: Path, rows: np.ndarray, trained: TrainedModel) -> None:
    names = trained.manifest.feature_names
    with dst.open(newline="") as fh:
        reader = csv.DictReader(fh)
        out = list(reader)
    shap = [f"shap_{n}" for n in names]
    assert reader.fieldnames == ["id", *names, PREDICTION_COLUMN, *shap, SHAP_BASE_COLUMN]
    assert [r["id"] for r in out] == [f"row-{i}" for i in range(len(rows))]
    # The input's own text is kept as it was.
    assert [r[names[0]] for r in out] == [repr(float(v)) for v in rows[:, 0]]
    predictions = np.array([float(r[PREDICTION_COLUMN]) for r in out])
    contributions = np.array([[float(r[c]) for c in shap] for r in out])
    base = np.array([float(r[SHAP_BASE_COLUMN]) for r in out])
    np.testing.assert_allclose(predictions, trained.reference(rows), atol=1e-6)
    # float32 text of each value: within float32 rounding of the float64 contributions.
    np.testing.assert_allclose(contributions, reference(trained, rows), atol=1e-5)
    assert trained.manifest.base_value is not None
    np.testing.assert_allclose(base, trained.manifest.base_value, atol=1e-5)
    np.testing.assert_allclose(base + contributions.sum(axis=1), predictions, atol=1e-4)


def test_score_explain_writes_contributions_in_order(
    producer_settings: ProducerSettings,
    cpu_worker: RunningWorker,
    trained_model: TrainedModel,
    tmp_path: Path,
) -> None:
    rows = many_rows(trained_model, 450)
    src, dst = tmp_path / "in.csv", tmp_path / "out.csv"
    write_csv(src, rows, trained_model.manifest.feature_names)
    with Client(producer_settings) as client:
        summary = score_csv(
            client, src, dst, chunk_rows=100, max_in_flight=2, progress=False, explain=True
        )
    assert (summary.rows, summary.chunks) == (450, 5)
    assert_explained(dst, rows, trained_model)


def test_score_explain_resumes_and_refuses_a_plain_runs_journal(
    redis_url: str,
    producer_settings: ProducerSettings,
    cpu_worker: RunningWorker,
    trained_model: TrainedModel,
    tmp_path: Path,
) -> None:
    rows = many_rows(trained_model, 1_000)
    src, dst = tmp_path / "in.csv", tmp_path / "out.csv"
    write_csv(src, rows, trained_model.manifest.feature_names)
    with DiesWithResultsUncollected(producer_settings) as dying, pytest.raises(Died):
        score_csv(dying, src, dst, chunk_rows=50, max_in_flight=3, progress=False, explain=True)
    done, uncollected = journal_chunks(dst)
    assert done and uncollected and not dst.exists()

    # The journal is an explain run's: scoring without --explain must not mix into it.
    with Client(producer_settings) as client, pytest.raises(JournalError, match="another job"):
        score_csv(client, src, dst, chunk_rows=50, max_in_flight=3, progress=False)

    command = [
        sys.executable, "-m", "producer", "score", str(src), "-o", str(dst), "--chunk-rows", "50",
        "--in-flight", "3", "--no-progress", "--explain",
    ]  # fmt: skip
    second = run_score(redis_url, command)
    assert second.returncode == 0, second.stderr
    assert f"resumed: {len(done)} of 20 chunks already done" in second.stderr
    assert_explained(dst, rows, trained_model)
