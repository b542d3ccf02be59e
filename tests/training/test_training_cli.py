"""`python -m training`: end to end in a subprocess, and its error paths in-process."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from training import bench, cli, tradeoff
from training.artifact import BENCHMARK_FILE, load_manifest, verified_model_path
from training.train import TrainConfig, TrainOutcome

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "training", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_trains_and_publishes_end_to_end(tmp_path: Path) -> None:
    model_dir = tmp_path / "models"
    result = run_cli("--model-dir", str(model_dir), "--n-samples", "2000", "--no-benchmark")
    assert result.returncode == 0, result.stderr
    version_dir, manifest = load_manifest(model_dir, "friedman1")
    assert f"version {manifest.version}" in result.stdout
    assert "benchmark" not in result.stdout
    assert manifest.params["n_train"] + manifest.params["n_test"] == 2000
    assert manifest.params["max_depth"] == 14 and manifest.params["min_samples_leaf"] == 5
    for variant in ("cpu", "gpu"):
        verified_model_path(version_dir, manifest, variant)
        assert manifest.metrics[f"max_abs_diff_{variant}"] <= 1e-4
    verified_model_path(version_dir, manifest, "explain")
    assert manifest.base_value is not None
    assert f"explanations: base value {manifest.base_value:.6g}" in result.stdout
    # One importance line per feature, each with its four kinds.
    lines = [line.split() for line in result.stdout.splitlines()]
    for name in manifest.feature_names:
        (row,) = [cells for cells in lines if cells[:1] == [f"{name}:"]]
        assert len(row) == 5


def test_cli_unpruned_without_gpu_model(tmp_path: Path) -> None:
    model_dir = tmp_path / "models"
    result = run_cli(
        "--model-dir", str(model_dir), "--name", "tiny", "--n-samples", "300",
        "--n-estimators", "3", "--max-depth", "none", "--no-gpu-model", "--no-explain-model",
        "--no-benchmark",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    version_dir, manifest = load_manifest(model_dir, "tiny")
    assert set(manifest.files) == {"cpu"}
    assert manifest.base_value is None and manifest.importances == {}
    assert "importances" not in result.stdout
    assert not (version_dir / "model_gemm.onnx").exists()
    assert manifest.params["max_depth"] is None and manifest.params["n_estimators"] == 3


def test_cli_missing_csv_target_exits_2_without_publishing(tmp_path: Path, capsys) -> None:
    csv = tmp_path / "d.csv"
    csv.write_text("a,b\n" + "\n".join(f"{i},{i}" for i in range(20)) + "\n")
    code = cli.main(["--model-dir", str(tmp_path / "m"), "--csv", str(csv), "--target", "nope"])
    assert code == 2
    assert "'nope' not found" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_cli_conversion_mismatch_exits_1(tmp_path: Path, capsys, monkeypatch) -> None:
    from training import export

    monkeypatch.setattr(export, "MAX_ABS_DIFF", -1.0)
    argv = ["--model-dir", str(tmp_path / "m"), "--n-samples", "200", "--n-estimators", "2"]
    assert cli.main([*argv, "--no-benchmark"]) == 1
    assert "disagrees with scikit-learn" in capsys.readouterr().err
    assert not (tmp_path / "m" / "friedman1" / "CURRENT").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["--target", "y"],  # --target without --csv
        ["--max-depth", "-3"],
        ["--test-size", "1.5"],
        ["--name", "../escape"],
    ],
)
def test_cli_rejects_bad_arguments(argv: list[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--model-dir", str(tmp_path), *argv])
    assert exc.value.code == 2


def test_parse_depth() -> None:
    assert cli.parse_depth("none") is None and cli.parse_depth("0") is None
    assert cli.parse_depth("12") == 12
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_depth("deep")
    assert cli.parse_depths("none,8, 10") == [None, 8, 10]


def test_benchmark_prints_every_engine(trained: TrainOutcome, monkeypatch) -> None:
    monkeypatch.setattr(bench, "LATENCY_CALLS", 5)
    monkeypatch.setattr(bench, "WARMUP_CALLS", 1)
    monkeypatch.setattr(bench, "BATCH_ROWS", 256)
    lines: list[str] = []
    results = bench.run_benchmark(
        trained.version_dir, trained.manifest, trained.pipeline, trained.X_test, lines.append
    )
    assert set(results) == {
        "scikit-learn",
        "onnxruntime model.onnx",
        "onnxruntime model_gemm.onnx",
    }
    assert all(t.p50_us > 0 and t.rows_per_s > 0 for t in results.values())
    text = "\n".join(lines)
    assert "intra_op_num_threads=1" in text and "all " in text and "256 rows" in text
    # The fitted forest's own n_jobs is restored after the single-thread measurements.
    assert trained.pipeline.named_steps["forest"].n_jobs == 1


def test_the_summary_records_the_model_goals_beside_the_manifest(
    trained: TrainOutcome, monkeypatch
) -> None:
    monkeypatch.setattr(bench, "LATENCY_CALLS", 5)
    monkeypatch.setattr(bench, "WARMUP_CALLS", 1)
    monkeypatch.setattr(bench, "BATCH_ROWS", 256)
    results = bench.run_benchmark(
        trained.version_dir, trained.manifest, trained.pipeline, trained.X_test, lambda _: None
    )
    config = TrainConfig(n_samples=3_000, n_jobs=1)
    reference = bench.unpruned_r2(config, trained)
    summary = bench.write_summary(trained.version_dir, trained.manifest, results, reference)
    on_disk = json.loads((trained.version_dir / BENCHMARK_FILE).read_text())
    assert on_disk == summary
    sk, ort = results["scikit-learn"], results["onnxruntime model.onnx"]
    assert summary["one_row_speedup"] == pytest.approx(sk.p50_us / ort.p50_us)
    assert summary["artifact_bytes"] == trained.manifest.files["cpu"].size_bytes
    assert summary["r2_loss"] == pytest.approx(reference - trained.manifest.metrics["r2"])
    # Grown without limits, the forest fits its own data at least as closely (R2 is at
    # most 1 for any model: only the lower bound tells).
    assert trained.manifest.metrics["r2"] <= reference <= 1


def test_tradeoff_compares_with_the_fully_grown_forest(monkeypatch) -> None:
    monkeypatch.setattr(bench, "BATCH_ROWS", 128)
    monkeypatch.setattr(tradeoff, "LATENCY_CALLS", 3)
    lines: list[str] = []
    config = TrainConfig(n_samples=400, n_estimators=3, n_jobs=1)
    rows = tradeoff.run_tradeoff(config, depths=[None, 3], leaves=[1, 5], out=lines.append)
    assert [(r.max_depth, r.min_samples_leaf) for r in rows] == [
        (None, 1),
        (3, 1),
        (None, 5),
        (3, 5),
    ]
    assert rows[1].depth == 3 and rows[0].depth > 3
    assert rows[0].nodes > rows[1].nodes and rows[0].onnx_mb > rows[1].onnx_mb
    assert len(lines) == 2 + len(rows) + 1
