"""Scoring Parquet files: every row back in order, the input's columns and types kept, with
predictions or explanations appended; resumable like CSV scoring."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from contract.errors import InvalidInput
from producer.bulk import PREDICTION_COLUMN
from producer.bulk_outputs import SHAP_BASE_COLUMN
from producer.client import Client
from producer.parquet_score import score_parquet
from producer.settings import ProducerSettings
from tests.integration.test_bulk import many_rows
from tests.integration.test_bulk_explain import reference
from tests.integration.test_bulk_resume import Died, DiesWithResultsUncollected, journal_chunks
from tests.support import RunningWorker, TrainedModel

pytestmark = pytest.mark.integration


def write_parquet(path: Path, rows: np.ndarray, names: list[str]) -> pa.Table:
    table = pa.table(
        {
            "id": pa.array(np.arange(len(rows)), pa.int64()),
            "label": pa.array([f"row-{i}" for i in range(len(rows))]),
            # float64 and float32 feature columns: both read as the float32 the model takes.
            **{
                name: pa.array(rows[:, j], pa.float64() if j % 2 else pa.float32())
                for j, name in enumerate(names)
            },
            "flag": pa.array([i % 3 == 0 for i in range(len(rows))]),
        }
    )
    pq.write_table(table, path, row_group_size=70)
    return table


def test_parquet_in_parquet_out_keeps_columns_and_types(
    producer_settings: ProducerSettings,
    cpu_worker: RunningWorker,
    trained_model: TrainedModel,
    tmp_path: Path,
) -> None:
    rows = many_rows(trained_model, 333)
    src, dst = tmp_path / "in.parquet", tmp_path / "out.parquet"
    table = write_parquet(src, rows, trained_model.manifest.feature_names)
    with Client(producer_settings) as client:
        summary = score_parquet(client, src, dst, chunk_rows=50, max_in_flight=3)
    assert (summary.rows, summary.chunks) == (333, 7)
    out = pq.read_table(dst)
    assert out.schema.names == [*table.schema.names, PREDICTION_COLUMN]
    assert out.schema.field(PREDICTION_COLUMN).type == pa.float32()
    assert out.select(table.schema.names).equals(table)  # every input column, as it was
    got = out.column(PREDICTION_COLUMN).to_numpy()
    np.testing.assert_allclose(got, trained_model.reference(rows), atol=1e-6)
    assert not list(tmp_path.glob(".*part")) and not list(tmp_path.glob(".*journal"))


def test_parquet_explain_resumes_after_the_producer_dies(
    producer_settings: ProducerSettings,
    cpu_worker: RunningWorker,
    trained_model: TrainedModel,
    tmp_path: Path,
) -> None:
    rows = many_rows(trained_model, 600)
    names = trained_model.manifest.feature_names
    src, dst = tmp_path / "in.parquet", tmp_path / "out.parquet"
    write_parquet(src, rows, names)
    with DiesWithResultsUncollected(producer_settings) as dying, pytest.raises(Died):
        score_parquet(dying, src, dst, chunk_rows=40, max_in_flight=3, explain=True)
    done, uncollected = journal_chunks(dst)
    assert done and uncollected and not dst.exists()

    with Client(producer_settings) as client:
        summary = score_parquet(client, src, dst, chunk_rows=40, max_in_flight=3, explain=True)
    assert summary.resumed == len(done) and summary.recollected == len(uncollected)
    assert summary.sent == 15 - len(done) - len(uncollected)
    out = pq.read_table(dst)
    shap = [f"shap_{n}" for n in names]
    assert out.schema.names[-len(shap) - 2 :] == [PREDICTION_COLUMN, *shap, SHAP_BASE_COLUMN]
    assert out.column("id").to_pylist() == list(range(600))
    contributions = np.column_stack([out.column(c).to_numpy() for c in shap])
    np.testing.assert_allclose(contributions, reference(trained_model, rows), atol=1e-5)
    predictions = out.column(PREDICTION_COLUMN).to_numpy().astype(np.float64)
    base = out.column(SHAP_BASE_COLUMN).to_numpy().astype(np.float64)
    np.testing.assert_allclose(base + contributions.sum(axis=1), predictions, atol=1e-4)


def test_parquet_with_a_missing_value_is_refused_by_row(
    producer_settings: ProducerSettings,
    cpu_worker: RunningWorker,
    trained_model: TrainedModel,
    tmp_path: Path,
) -> None:
    rows = many_rows(trained_model, 100)
    rows[57, 2] = np.nan
    src, dst = tmp_path / "in.parquet", tmp_path / "out.parquet"
    write_parquet(src, rows, trained_model.manifest.feature_names)
    with Client(producer_settings) as client, pytest.raises(InvalidInput, match="row 57"):
        score_parquet(client, src, dst, chunk_rows=30)
    assert not dst.exists() and not list(tmp_path.glob(".*part"))


def test_cli_scores_parquet_by_extension(
    redis_url: str, cpu_worker: RunningWorker, trained_model: TrainedModel, tmp_path: Path
) -> None:
    rows = many_rows(trained_model, 120)
    src, dst = tmp_path / "in.pq", tmp_path / "scored.parquet"
    write_parquet(src, rows, trained_model.manifest.feature_names)
    proc = subprocess.run(
        [sys.executable, "-m", "producer", "score", str(src), "-o", str(dst), "--chunk-rows", "50"],
        env={"REDIS_URL": redis_url, "PATH": ""}, capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "scored 120 rows in 3 chunks" in proc.stderr
    got = pq.read_table(dst).column(PREDICTION_COLUMN).to_numpy()
    np.testing.assert_allclose(got, trained_model.reference(rows), atol=1e-6)
