"""Scoring a CSV file through the queue: every row back, in order, or no output at all."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from contract.errors import FeatureCountMismatch, InvalidInput
from contract.names import TASK_PREDICT_BATCH
from contract.schemas import decode_f32, encode_f32
from producer.bulk import PREDICTION_COLUMN, score_csv
from producer.client import Client
from tests.support import RunningWorker, TrainedModel

pytestmark = pytest.mark.integration


def write_csv(path: Path, rows: np.ndarray, names: list[str], with_id: bool = True) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow((["id"] if with_id else []) + names)
        for i, row in enumerate(rows):
            writer.writerow(([f"row-{i}"] if with_id else []) + [repr(float(v)) for v in row])


def many_rows(trained: TrainedModel, n: int) -> np.ndarray:
    reps = -(-n // len(trained.X_test))
    return np.tile(trained.X_test, (reps, 1))[:n].astype(np.float32).astype(np.float64)


def test_score_csv_returns_every_row_in_order(
    producer_settings, cpu_worker: RunningWorker, trained_model: TrainedModel, tmp_path: Path
) -> None:
    rows = many_rows(trained_model, 2_345)
    src, dst = tmp_path / "in.csv", tmp_path / "out.csv"
    write_csv(src, rows, trained_model.manifest.feature_names)
    with Client(producer_settings) as client:
        summary = score_csv(client, src, dst, chunk_rows=300, max_in_flight=3, progress=False)
    assert summary.rows == 2_345 and summary.chunks == 8

    with dst.open(newline="") as fh:
        out = list(csv.DictReader(fh))
    assert [r["id"] for r in out] == [f"row-{i}" for i in range(2_345)]
    got = np.array([float(r[PREDICTION_COLUMN]) for r in out])
    np.testing.assert_allclose(got, trained_model.reference(rows), atol=1e-6)
    assert not list(tmp_path.glob(".*part"))


def test_a_bad_row_fails_with_its_line_and_leaves_no_output(
    producer_settings, cpu_worker: RunningWorker, trained_model: TrainedModel, tmp_path: Path
) -> None:
    rows = many_rows(trained_model, 50)
    src, dst = tmp_path / "in.csv", tmp_path / "out.csv"
    write_csv(src, rows, trained_model.manifest.feature_names)
    lines = src.read_text().splitlines()
    lines[40] = lines[40].rsplit(",", 1)[0] + ",nan"  # file line 41
    src.write_text("\n".join(lines) + "\n")
    with Client(producer_settings) as client, pytest.raises(InvalidInput, match="line 41"):
        score_csv(client, src, dst, chunk_rows=10, progress=False)
    assert not dst.exists()
    assert not list(tmp_path.glob(".*part"))


def test_cli_scores_a_file_without_named_columns(
    redis_url: str, cpu_worker: RunningWorker, trained_model: TrainedModel, tmp_path: Path
) -> None:
    rows = many_rows(trained_model, 120)
    src, dst = tmp_path / "plain.csv", tmp_path / "scored.csv"
    write_csv(src, rows, ["a", "b", "c", "d", "e"], with_id=False)
    proc = subprocess.run(
        [sys.executable, "-m", "producer", "score", str(src), "-o", str(dst), "--chunk-rows", "50"],
        env={"REDIS_URL": redis_url, "PATH": ""}, capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "scored 120 rows in 3 chunks" in proc.stderr
    with dst.open(newline="") as fh:
        out = list(csv.reader(fh))
    assert out[0] == ["a", "b", "c", "d", "e", PREDICTION_COLUMN]
    np.testing.assert_allclose(
        [float(r[-1]) for r in out[1:]], trained_model.reference(rows), atol=1e-6
    )


def test_rows_f32_jobs_answer_in_f32(
    producer_settings, cpu_worker: RunningWorker, trained_model: TrainedModel
) -> None:
    rows = many_rows(trained_model, 1_000).astype(np.float32)
    with Client(producer_settings) as client:
        good = client.send(TASK_PREDICT_BATCH, {"rows_f32": encode_f32(rows), "n_features": 5})
        narrow = client.send(
            TASK_PREDICT_BATCH, {"rows_f32": encode_f32(rows[:, :4]), "n_features": 4}
        )
        result = client.wait(good, timeout=30)
        with pytest.raises(FeatureCountMismatch, match="rows_f32 has 4 features a row"):
            client.wait(narrow, timeout=30)
    assert result["rows"] == 1_000 and "predictions" not in result
    got = decode_f32(result["predictions_f32"], name="predictions_f32")
    np.testing.assert_array_equal(got, trained_model.reference(rows).astype(np.float32))


def test_a_file_the_fast_path_cannot_take_is_scored_all_the_same(
    producer_settings, cpu_worker: RunningWorker, trained_model: TrainedModel, tmp_path: Path
) -> None:
    """Quoted fields (one with a line break), CRLF line ends, blank lines: the output is
    the input, byte for byte, with each row's prediction appended."""
    rows = many_rows(trained_model, 300)
    names = trained_model.manifest.feature_names
    lines = [",".join(["id", *names]).encode()]
    for i, row in enumerate(rows):
        label = f'"row,{i}"' if i % 50 else f'"row\n{i}"'
        lines.append(",".join([label, *(repr(float(v)) for v in row)]).encode())
        if i % 70 == 3:
            lines.append(b"")
    src, dst = tmp_path / "in.csv", tmp_path / "out.csv"
    src.write_bytes(b"\r\n".join(lines) + b"\r\n")
    with Client(producer_settings) as client:
        summary = score_csv(client, src, dst, chunk_rows=64, max_in_flight=3, progress=False)
    assert summary.rows == 300
    out = dst.read_bytes().split(b"\r\n")
    assert out[0] == lines[0] + b",prediction"
    predictions = []
    for original, written in zip(lines[1:], out[1:], strict=False):
        if not original:
            assert written == b""
            continue
        text, _, prediction = written.rpartition(b",")
        assert text == original
        predictions.append(float(prediction))
    assert len(predictions) == 300
    np.testing.assert_allclose(predictions, trained_model.reference(rows), atol=1e-6)
