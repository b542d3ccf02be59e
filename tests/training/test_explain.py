"""explain.onnx: exact path-dependent TreeSHAP (parity with shap), additivity, the artifact
entries and the importances recorded with it."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.pipeline import Pipeline

from training import explain
from training.artifact import load_manifest, verified_model_path
from training.config import TrainConfig
from training.explain import build_explain_model, forest_paths, path_table
from training.export import cpu_session, pipeline_steps
from training.importance import explain_rows
from training.train import TrainOutcome, build_pipeline, load_dataset, run_training, split


def shap_values(pipeline: Pipeline, X: np.ndarray) -> tuple[np.ndarray, float]:
    """shap's TreeExplainer on the scikit-learn forest, given the rows its trees see
    (scaled in float64, then float32, as the forest casts them)."""
    shap = pytest.importorskip("shap")
    scaler, forest = pipeline_steps(pipeline)
    scaled = scaler.transform(X).astype(np.float32).astype(np.float64)
    explainer = shap.TreeExplainer(forest, feature_perturbation="tree_path_dependent")
    values = np.asarray(explainer.shap_values(scaled, check_additivity=False))
    return values, float(np.ravel(explainer.expected_value)[0])


def test_default_model_matches_shap_on_1000_held_out_rows() -> None:
    config = TrainConfig(n_jobs=1)
    data = load_dataset(config)
    X_train, X_test, y_train, _ = split(data, config.test_size, config.seed)
    pipeline = build_pipeline(config).fit(X_train, y_train)
    model, paths = build_explain_model(pipeline, len(data.feature_names))
    rows = X_test[:1000]

    ours = explain_rows(cpu_session(model), rows)
    theirs, base = shap_values(pipeline, rows)

    assert paths.max_path_features <= 5
    assert abs(paths.base_value - base) <= 1e-9
    assert np.abs(ours - theirs).max() <= 1e-5
    predicted = pipeline.predict(rows)
    assert np.abs(paths.base_value + ours.sum(axis=1) - predicted).max() <= 1e-4


def test_published_explain_file_is_additive_with_the_served_prediction(
    trained: TrainOutcome, ort_predict
) -> None:
    manifest = trained.manifest
    assert manifest.base_value is not None
    path = verified_model_path(trained.version_dir, manifest, "explain")
    contributions = explain_rows(cpu_session(path.read_bytes()), trained.X_test)
    served = ort_predict(trained.version_dir / manifest.files["cpu"].path, trained.X_test)

    assert contributions.shape == (len(trained.X_test), manifest.n_features)
    gap = manifest.base_value + contributions.sum(axis=1) - served.astype(np.float64)
    assert np.abs(gap).max() <= 1e-4
    assert manifest.metrics["max_abs_additivity_explain"] <= 1e-4


def test_small_model_matches_shap(trained: TrainOutcome) -> None:
    path = trained.version_dir / trained.manifest.files["explain"].path
    ours = explain_rows(cpu_session(path.read_bytes()), trained.X_test)
    theirs, base = shap_values(trained.pipeline, trained.X_test)
    assert trained.manifest.base_value == pytest.approx(base, abs=1e-9)
    assert np.abs(ours - theirs).max() <= 1e-5


def test_importances_name_every_feature_and_rank_the_signal(trained: TrainOutcome) -> None:
    importances = trained.manifest.importances
    assert set(importances) == {
        "impurity",
        "permutation_r2_drop",
        "permutation_r2_drop_std",
        "mean_abs_shap",
    }
    names = trained.manifest.feature_names
    for values in importances.values():
        assert list(values) == names
    assert sum(importances["impurity"].values()) == pytest.approx(1.0)
    # Friedman #1: x3 enters linearly with weight 10, x4 with 5: x3 matters more, every way.
    for kind in ("impurity", "permutation_r2_drop", "mean_abs_shap"):
        assert importances[kind]["x3"] > importances[kind]["x4"] > 0, kind
    assert all(v >= 0 for v in importances["permutation_r2_drop_std"].values())


def test_too_large_a_table_publishes_without_explanations(
    small_config: TrainConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(explain, "MAX_TABLE_BYTES", 1000)
    outcome = run_training(small_config)
    _, manifest = load_manifest(small_config.model_dir, small_config.name)
    assert "explain" not in manifest.files
    assert manifest.base_value is None and manifest.importances == {}
    assert outcome.manifest.version == manifest.version


def test_single_leaf_forest_explains_to_zero() -> None:
    config = TrainConfig(n_estimators=3, min_samples_leaf=10_000, n_jobs=1)
    data = load_dataset(TrainConfig(n_samples=200))
    pipeline = build_pipeline(config).fit(data.X, data.y)
    model, paths = build_explain_model(pipeline, 5)
    contributions = explain_rows(cpu_session(model), data.X[:7])
    assert paths.max_path_features == 0
    assert np.array_equal(contributions, np.zeros((7, 5)))
    assert paths.base_value == pytest.approx(float(pipeline.predict(data.X[:1])[0]))


def test_table_rows_sum_to_the_path_game() -> None:
    """Efficiency per path: the contributions of one pattern add up to
    v * (prod o - prod z), the path's value at x minus its value with no feature known."""
    config = TrainConfig(n_estimators=2, n_jobs=1)
    data = load_dataset(TrainConfig(n_samples=300))
    pipeline = build_pipeline(config).fit(data.X, data.y)
    _, forest = pipeline_steps(pipeline)
    paths = forest_paths(forest, 5)
    table = path_table(paths)
    patterns = (np.arange(32)[:, None] >> np.arange(5)[None, :]) & 1
    expected = paths.value[:, None] * (
        patterns.prod(axis=1)[None, :] - paths.zero.prod(axis=1)[:, None]
    )
    assert np.allclose(table.sum(axis=2), expected, atol=1e-12)
