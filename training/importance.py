"""explain.onnx built and checked at training time, and the feature importances recorded
beside it: impurity, permutation (R^2 drop on the held-out rows) and mean |SHAP|."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from numpy.typing import NDArray
from sklearn.inspection import permutation_importance
from sklearn.pipeline import Pipeline

from contract.errors import ConversionMismatch
from training.artifact import CONTRIBUTIONS_NAME, EXPLAIN_BATCH_ROWS
from training.config import TrainConfig
from training.data import Dataset
from training.explain import ExplainTooLarge, build_explain_model
from training.export import INPUT_NAME, MAX_ABS_DIFF, cpu_session, pipeline_steps


@dataclass(frozen=True)
class Explained:
    model: onnx.ModelProto
    base_value: float
    additivity: float
    """max |base + sum(contributions) - scikit-learn's prediction| over the held-out rows."""
    importances: dict[str, dict[str, float]]


def explain_rows(session: object, X: NDArray[np.floating]) -> NDArray[np.float64]:
    """Contributions [rows, features] from an explain.onnx session, in bounded batches."""
    rows = np.asarray(X, dtype=np.float32)
    parts = [
        session.run([CONTRIBUTIONS_NAME], {INPUT_NAME: rows[i : i + EXPLAIN_BATCH_ROWS]})[0]  # type: ignore[attr-defined]
        for i in range(0, len(rows), EXPLAIN_BATCH_ROWS)
    ]
    return np.concatenate(parts) if parts else np.zeros((0, rows.shape[1]))


def explain_and_rank(
    pipeline: Pipeline,
    n_features: int,
    X_test: NDArray[np.float64],
    y_test: NDArray[np.float64],
    data: Dataset,
    config: TrainConfig,
    say: Callable[[str], None],
) -> Explained | None:
    """explain.onnx, checked for additivity against scikit-learn on the held-out rows, and
    the importances; None (and said why) when the model is too wide to tabulate.

    Raises ConversionMismatch when base + sum(contributions) misses a prediction by more
    than MAX_ABS_DIFF: then nothing is published.
    """
    try:
        model, paths = build_explain_model(pipeline, n_features)
    except ExplainTooLarge as exc:
        say(f"explain: skipped: {exc}")
        return None
    contributions = explain_rows(cpu_session(model, threads=0), X_test)
    predicted = np.asarray(pipeline.predict(X_test), dtype=np.float64)
    gap = np.abs(paths.base_value + contributions.sum(axis=1) - predicted)
    worst = float(gap.max()) if gap.size else 0.0
    if not worst <= MAX_ABS_DIFF:
        raise ConversionMismatch(
            f"explain ONNX model: base + contributions misses scikit-learn's prediction by "
            f"up to {worst:.3g} (> {MAX_ABS_DIFF:g}) on the held-out rows; nothing was published"
        )
    say(
        f"explain: {paths.n_paths} paths, at most {paths.max_path_features} distinct features "
        f"each; table {paths.table_bytes / 1e6:.1f} MB; base value {paths.base_value:.6g}"
    )

    _, forest = pipeline_steps(pipeline)
    names = data.feature_names
    permuted = permutation_importance(
        pipeline,
        X_test,
        y_test,
        scoring="r2",
        n_repeats=config.permutation_repeats,
        random_state=config.seed,
        n_jobs=1,
    )
    kinds = {
        "impurity": forest.feature_importances_,
        "permutation_r2_drop": permuted.importances_mean,
        "permutation_r2_drop_std": permuted.importances_std,
        "mean_abs_shap": np.abs(contributions).mean(axis=0),
    }
    importances = {
        kind: {name: float(v) for name, v in zip(names, values, strict=True)}
        for kind, values in kinds.items()
    }
    return Explained(model, paths.base_value, worst, importances)
