"""Both ONNX variants reproduce scikit-learn within 1e-4, including at split thresholds."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from numpy.typing import NDArray
from sklearn.pipeline import Pipeline

from training import gemm
from training.data import friedman1
from training.export import to_cpu_onnx
from training.gemm import build_gemm_model, flatten_forest
from training.train import TrainConfig, TrainOutcome, build_pipeline, split

TOLERANCE = 1e-4

# Ops (in the types gemm.py uses) that onnxruntime's CUDAExecutionProvider implements,
# per onnxruntime docs/OperatorKernels.md.
CUDA_OPS = {"Cast", "Sub", "Div", "Gather", "GatherElements", "LessOrEqual", "Where", "ReduceMean"}


def threshold_rows(pipeline: Pipeline, base: NDArray[np.float64], per_tree: int = 40) -> NDArray:
    """Rows whose one feature, once scaled, lands on or 1-2 float32 ulps around a split threshold.

    These are the rows where float32 vs float64 handling decides the branch.
    """
    scaler = pipeline.named_steps["scaler"]
    rows = []
    for estimator in pipeline.named_steps["forest"].estimators_[:5]:
        tree = estimator.tree_
        for node in np.flatnonzero(tree.children_left >= 0)[:per_tree]:
            f = int(tree.feature[node])
            value = np.float32(tree.threshold[node] * scaler.scale_[f] + scaler.mean_[f])
            candidates = [value]
            for direction in (np.float32(-np.inf), np.float32(np.inf)):
                v = value
                for _ in range(2):
                    v = np.nextafter(v, direction)
                    candidates.append(v)
            for v in candidates:
                row = base.copy()
                row[f] = float(v)
                rows.append(row)
    return np.asarray(rows)


def assert_close(pipeline: Pipeline, predicted: NDArray, X: NDArray) -> None:
    expected = pipeline.predict(X)
    diff = np.abs(predicted.astype(np.float64) - expected)
    assert diff.max() <= TOLERANCE, f"{int((diff > TOLERANCE).sum())} rows off, max {diff.max()}"


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_published_variants_match_sklearn(trained: TrainOutcome, ort_predict, variant) -> None:
    path = trained.version_dir / trained.manifest.files[variant].path
    assert_close(trained.pipeline, ort_predict(path, trained.X_test), trained.X_test)


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_variants_match_sklearn_at_thresholds(trained: TrainOutcome, ort_predict, variant) -> None:
    X = threshold_rows(trained.pipeline, trained.X_test[0])
    path = trained.version_dir / trained.manifest.files[variant].path
    assert_close(trained.pipeline, ort_predict(path, X), X)


@pytest.fixture(scope="module")
def unpruned() -> tuple[Pipeline, NDArray, NDArray]:
    data = friedman1(800, seed=3)
    X_train, X_test, y_train, _ = split(data, 0.25, seed=3)
    config = TrainConfig(n_estimators=5, max_depth=None, min_samples_leaf=1, seed=3, n_jobs=1)
    return build_pipeline(config).fit(X_train, y_train), X_train, X_test


def test_unpruned_forest_matches_sklearn(unpruned, ort_predict) -> None:
    pipeline, X_train, X_test = unpruned
    depth = max(e.tree_.max_depth for e in pipeline.named_steps["forest"].estimators_)
    assert depth > 14  # deeper than the default limit: exercises the long unrolled graph
    X = np.vstack([X_test, threshold_rows(pipeline, X_test[0])])
    assert_close(pipeline, ort_predict(to_cpu_onnx(pipeline, 5).SerializeToString(), X), X)
    gpu = build_gemm_model(pipeline, 5).SerializeToString()
    assert_close(pipeline, ort_predict(gpu, X), X)
    # Training rows end in pure leaves: the graph must reproduce them exactly, up to float32.
    assert_close(pipeline, ort_predict(gpu, X_train), X_train)


def test_thresholds_rounded_to_nearest_would_be_wrong(unpruned, ort_predict, monkeypatch) -> None:
    """Guards the round-down: the threshold rows do catch a naive float32 threshold."""
    pipeline, _, X_test = unpruned
    monkeypatch.setattr(gemm, "_round_down_to_float32", lambda t: t.astype(np.float32))
    X = threshold_rows(pipeline, X_test[0], per_tree=400)
    predicted = ort_predict(build_gemm_model(pipeline, 5).SerializeToString(), X)
    assert np.abs(predicted - pipeline.predict(X)).max() > TOLERANCE


def test_round_down_to_float32_is_exact_for_float32_inputs() -> None:
    rng = np.random.default_rng(0)
    t = rng.normal(size=20_000) * 10.0 ** rng.integers(-3, 4, size=20_000)
    rounded = gemm._round_down_to_float32(t)
    assert rounded.dtype == np.float32
    assert np.all(rounded.astype(np.float64) <= t)
    # Every float32 x near t compares the same way against t and against the rounded value.
    for step in (-2, -1, 0, 1, 2):
        x = t.astype(np.float32)
        for _ in range(abs(step)):
            x = np.nextafter(x, np.float32(np.inf if step > 0 else -np.inf))
        assert np.array_equal(x.astype(np.float64) <= t, x <= rounded)


def test_gemm_graph_uses_only_standard_cuda_ops(trained: TrainOutcome) -> None:
    model = onnx.load(str(trained.version_dir / "model_gemm.onnx"))
    assert {node.domain for node in model.graph.node} <= {""}
    assert {node.op_type for node in model.graph.node} <= CUDA_OPS
    assert [imp.domain for imp in model.opset_import] == [""]
    depth = max(e.tree_.max_depth for e in trained.pipeline.named_steps["forest"].estimators_)
    assert sum(node.op_type == "Where" for node in model.graph.node) == depth


def test_flattened_leaves_point_to_themselves(trained: TrainOutcome) -> None:
    flat = flatten_forest(trained.pipeline.named_steps["forest"])
    ids = np.arange(flat.n_nodes)
    leaves = flat.left == ids
    assert np.array_equal(leaves, flat.right == ids)
    assert leaves.sum() > 0 and (~leaves).sum() > 0
    assert np.all(flat.left[~leaves] > ids[~leaves])  # children come after their parent
    assert len(flat.roots) == 10 and flat.roots[0] == 0


def test_constant_target_gives_a_constant_model(ort_predict) -> None:
    """A forest of single leaves (depth 0) still compiles and predicts the constant."""
    X = friedman1(50, seed=0).X
    pipeline = build_pipeline(TrainConfig(n_estimators=3, n_jobs=1)).fit(X, np.full(50, 2.5))
    for model in (to_cpu_onnx(pipeline, 5), build_gemm_model(pipeline, 5)):
        np.testing.assert_allclose(ort_predict(model.SerializeToString(), X), 2.5, atol=1e-6)
