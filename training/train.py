"""Train the StandardScaler + RandomForestRegressor pipeline, export it, check it, publish it."""

from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sklearn.ensemble import RandomForestRegressor
from sklearn.metrics import mean_absolute_error, r2_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from contract.errors import DataError
from training import export
from training.artifact import Manifest, ModelFile
from training.config import DEFAULT_MAX_DEPTH, DEFAULT_MIN_SAMPLES_LEAF, TrainConfig
from training.data import Dataset, friedman1, from_csv
from training.publish import PendingFile, publish

__all__ = [
    "DEFAULT_MAX_DEPTH",
    "DEFAULT_MIN_SAMPLES_LEAF",
    "TrainConfig",
    "TrainOutcome",
    "build_pipeline",
    "load_dataset",
    "run_training",
    "split",
]

CPU_FILE = "model.onnx"
GPU_FILE = "model_gemm.onnx"
EXPLAIN_FILE = "explain.onnx"


@dataclass(frozen=True)
class TrainOutcome:
    version_dir: Path
    manifest: Manifest
    pipeline: Pipeline
    X_test: NDArray[np.float64]
    """Held-out rows: float64 holding float32-representable values (ONNX takes float32)."""
    y_test: NDArray[np.float64]
    dataset: Dataset


def build_pipeline(config: TrainConfig) -> Pipeline:
    return Pipeline(
        [
            ("scaler", StandardScaler()),
            (
                "forest",
                RandomForestRegressor(
                    n_estimators=config.n_estimators,
                    max_depth=config.max_depth,
                    min_samples_leaf=config.min_samples_leaf,
                    random_state=config.seed,
                    n_jobs=config.n_jobs,
                ),
            ),
        ]
    )


def load_dataset(config: TrainConfig) -> Dataset:
    if config.csv is not None and config.target is not None:
        return from_csv(config.csv, config.target)
    return friedman1(config.n_samples, config.seed)


def split(
    data: Dataset, test_size: float, seed: int
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """X_train, X_test, y_train, y_test."""
    try:
        X_train, X_test, y_train, y_test = train_test_split(
            data.X, data.y, test_size=test_size, random_state=seed
        )
    except ValueError as exc:
        raise DataError(
            f"cannot split {len(data.y)} rows with test_size={test_size}: {exc}"
        ) from None
    return X_train, X_test, y_train, y_test


def run_training(config: TrainConfig, log: Callable[[str], None] | None = None) -> TrainOutcome:
    """Fit, export both variants, check them on the held-out rows, publish, move CURRENT.

    Raises DataError for unusable data and ConversionMismatch when an ONNX graph does
    not reproduce scikit-learn within export.MAX_ABS_DIFF; then nothing is written.
    """
    say = log or (lambda _msg: None)
    data = load_dataset(config)
    say(f"data: {data.source}: {len(data.y)} rows")
    say(f"data: features {data.feature_names}, target {data.target!r}")
    if data.ignored_columns:
        say(f"data: ignored non-numeric columns: {data.ignored_columns}")
    if data.dropped_rows:
        say(f"data: dropped {data.dropped_rows} rows with missing or non-finite values")
    X_train, X_test, y_train, y_test = split(data, config.test_size, config.seed)

    pipeline = build_pipeline(config)
    pipeline.fit(X_train, y_train)
    predicted = pipeline.predict(X_test)
    forest = pipeline.named_steps["forest"]
    n_nodes = sum(int(e.tree_.node_count) for e in forest.estimators_)
    depth = max(int(e.tree_.max_depth) for e in forest.estimators_)
    metrics: dict[str, float] = {
        "r2": float(r2_score(y_test, predicted)),
        "mae": float(mean_absolute_error(y_test, predicted)),
    }
    say(
        f"fit: {len(y_train)} train rows, {n_nodes} nodes, depth {depth}; "
        f"test R2 {metrics['r2']:.4f}, MAE {metrics['mae']:.4f} on {len(y_test)} rows"
    )

    n_features = len(data.feature_names)
    cpu_model = export.to_cpu_onnx(pipeline, n_features)
    metrics["max_abs_diff_cpu"] = export.check_against_sklearn("cpu", cpu_model, pipeline, X_test)
    files = [
        _pending(
            "cpu",
            CPU_FILE,
            cpu_model,
            "skl2onnx: Cast/Sub/Div/Cast scaler + "
            "TreeEnsembleRegressor (ai.onnx.ml); onnxruntime CPU",
        )
    ]
    if config.gpu_model:
        from training.gemm import build_gemm_model

        gpu_model = build_gemm_model(pipeline, n_features)
        metrics["max_abs_diff_gpu"] = export.check_against_sklearn(
            "gpu", gpu_model, pipeline, X_test
        )
        files.append(
            _pending(
                "gpu",
                GPU_FILE,
                gpu_model,
                "tree traversal in standard ONNX ops "
                "only (no ai.onnx.ml); runs on CUDAExecutionProvider",
            )
        )
    base_value: float | None = None
    importances: dict[str, dict[str, float]] = {}
    if config.explain_model:
        from training.importance import explain_and_rank

        explained = explain_and_rank(pipeline, n_features, X_test, y_test, data, config, say)
        if explained is not None:
            metrics["max_abs_additivity_explain"] = explained.additivity
            base_value = explained.base_value
            importances = explained.importances
            files.append(
                _pending(
                    "explain",
                    EXPLAIN_FILE,
                    explained.model,
                    "exact path-dependent TreeSHAP: per-path contributions tabulated by "
                    "pattern, looked up with standard ONNX ops (CPU and CUDA)",
                )
            )
    say(
        "check: "
        + ", ".join(f"{k} {v:.2g}" for k, v in metrics.items() if k.startswith("max_"))
        + f" (tolerance {export.MAX_ABS_DIFF:g})"
    )

    params: dict[str, Any] = {
        "estimator": "Pipeline(StandardScaler, RandomForestRegressor)",
        "n_estimators": config.n_estimators,
        "max_depth": config.max_depth,
        "min_samples_leaf": config.min_samples_leaf,
        "random_state": config.seed,
        "test_size": config.test_size,
        "n_train": len(y_train),
        "n_test": len(y_test),
        "data_source": data.source,
        "dropped_rows": data.dropped_rows,
        "ignored_columns": data.ignored_columns,
        "forest_nodes": n_nodes,
        "forest_depth": depth,
        "check_tolerance": export.MAX_ABS_DIFF,
    }

    def make_manifest(version: str, created_at: str, entries: dict[str, ModelFile]) -> Manifest:
        return Manifest(
            name=config.name,
            version=version,
            created_at=created_at,
            feature_names=data.feature_names,
            n_features=n_features,
            target=data.target,
            input_name=export.INPUT_NAME,
            output_name=export.OUTPUT_NAME,
            files=entries,
            metrics=metrics,
            library_versions=library_versions(),
            params=params,
            base_value=base_value,
            importances=importances,
        )

    version_dir, manifest = publish(config.model_dir, config.name, files, make_manifest)
    say(f"published {version_dir} and pointed {config.model_dir / config.name / 'CURRENT'} at it")
    return TrainOutcome(version_dir, manifest, pipeline, X_test, y_test, data)


def library_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import skl2onnx
    import sklearn

    return {
        "scikit-learn": sklearn.__version__,
        "skl2onnx": skl2onnx.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _pending(variant: str, filename: str, model: Any, description: str) -> PendingFile:
    return PendingFile(
        variant, filename, model.SerializeToString(), export.opsets_of(model), description
    )
