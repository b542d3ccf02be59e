"""Training data: make_friedman1 and CSV files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from contract.errors import DataError
from training.data import friedman1, from_csv
from training.train import TrainConfig, run_training


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text.strip() + "\n")
    return path


def numeric_csv(path: Path, n: int = 60, seed: int = 0) -> Path:
    """Columns: a, city (text), b, price (target), c; two rows with a missing cell."""
    rng = np.random.default_rng(seed)
    lines = ["a,city,b,price,c"]
    for i in range(n):
        a, b, c = rng.uniform(size=3)
        price = 3 * a - 2 * b + c + rng.normal(scale=0.05)
        lines.append(f"{a:.6f},{['Oslo', 'Lima'][i % 2]},{b:.6f},{price:.6f},{c:.6f}")
    lines[5] = "0.5,Oslo,,1.0,0.5"  # missing feature
    lines[9] = "0.5,Lima,0.5,NA,0.5"  # missing target
    return write_csv(path, "\n".join(lines))


def test_friedman1_shapes_and_float32_values() -> None:
    data = friedman1(200, seed=1)
    assert data.X.shape == (200, 5) and data.y.shape == (200,)
    assert data.feature_names == ["x0", "x1", "x2", "x3", "x4"]
    assert data.target == "y"
    assert data.X.dtype == np.float64
    # Exactly representable in float32: the ONNX models see the same rows as scikit-learn.
    assert np.array_equal(data.X.astype(np.float32).astype(np.float64), data.X)
    assert np.array_equal(friedman1(200, seed=1).X, data.X)


def test_csv_features_are_the_other_numeric_columns_in_file_order(tmp_path: Path) -> None:
    data = from_csv(numeric_csv(tmp_path / "d.csv"), "price")
    assert data.feature_names == ["a", "b", "c"]
    assert data.ignored_columns == ["city"]
    assert data.target == "price"
    assert data.dropped_rows == 2
    assert data.X.shape == (58, 3) and data.y.shape == (58,)
    assert np.isfinite(data.X).all() and np.isfinite(data.y).all()


def test_csv_target_selection_changes_the_features(tmp_path: Path) -> None:
    data = from_csv(numeric_csv(tmp_path / "d.csv"), "a")
    assert data.feature_names == ["b", "price", "c"]


def test_csv_missing_target_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"'cost' not found.*a, city, b, price, c"):
        from_csv(numeric_csv(tmp_path / "d.csv"), "cost")


def test_csv_non_numeric_target_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"'city'.*not numeric"):
        from_csv(numeric_csv(tmp_path / "d.csv"), "city")


def test_csv_without_numeric_features_is_refused(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", "name,y\n" + "\n".join(f"n{i},{i}" for i in range(20)))
    with pytest.raises(DataError, match="no numeric feature"):
        from_csv(path, "y")


def test_csv_values_beyond_float32_are_dropped(tmp_path: Path) -> None:
    rows = "\n".join(f"{i},{i * 2}" for i in range(20))
    path = write_csv(tmp_path / "d.csv", f"x,y\n{rows}\n1e39,1\ninf,2\n3,nan")
    data = from_csv(path, "y")
    assert data.dropped_rows == 3 and len(data.y) == 20


def test_csv_with_too_few_usable_rows_is_refused(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", "x,y\n1,2\n3,4\n,5")
    with pytest.raises(DataError, match="usable rows"):
        from_csv(path, "y")


def test_ragged_and_missing_csv_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data row 2 has 3 cells"):
        from_csv(write_csv(tmp_path / "r.csv", "x,y\n1,2\n1,2,3"), "y")
    with pytest.raises(DataError, match="cannot read"):
        from_csv(tmp_path / "absent.csv", "y")


def test_csv_and_target_go_together() -> None:
    with pytest.raises(ValidationError, match="csv and target"):
        TrainConfig(csv=Path("d.csv"))
    with pytest.raises(ValidationError, match="csv and target"):
        TrainConfig(target="price")


def test_training_on_csv_publishes_its_features(tmp_path: Path, ort_predict) -> None:
    config = TrainConfig(
        model_dir=tmp_path / "models",
        name="prices",
        csv=numeric_csv(tmp_path / "d.csv", n=120),
        target="price",
        n_estimators=5,
        n_jobs=1,
    )
    outcome = run_training(config)
    manifest = outcome.manifest
    assert manifest.feature_names == ["a", "b", "c"] and manifest.n_features == 3
    assert manifest.target == "price"
    assert manifest.params["dropped_rows"] == 2
    assert manifest.params["ignored_columns"] == ["city"]
    assert (tmp_path / "models" / "prices" / "CURRENT").read_text().strip() == manifest.version
    assert set(manifest.files) == {"cpu", "gpu", "explain"}
    assert list(manifest.importances["mean_abs_shap"]) == ["a", "b", "c"]
    for variant in ("cpu", "gpu"):
        entry = manifest.files[variant]
        predicted = ort_predict(outcome.version_dir / entry.path, outcome.X_test)
        expected = outcome.pipeline.predict(outcome.X_test)
        assert np.abs(predicted - expected).max() <= 1e-4
