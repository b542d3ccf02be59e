"""`--tradeoff`: size, accuracy and speed of the forest at several max_depth values.

Used to choose train.DEFAULT_MAX_DEPTH; publishes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sklearn.metrics import mean_absolute_error, r2_score

from training import export
from training.bench import batch_from, batch_throughput, one_row_latency, ort_predictor
from training.gemm import build_gemm_model
from training.train import TrainConfig, build_pipeline, load_dataset, split

DEFAULT_DEPTHS: tuple[int | None, ...] = (None, 8, 10, 12, 14, 16)
DEFAULT_LEAVES: tuple[int, ...] = (1, 5)
REFERENCE: tuple[int | None, int] = (None, 1)
"""The fully grown forest (no depth limit, leaves of one sample) every row is compared with."""
LATENCY_CALLS = 100


@dataclass(frozen=True)
class Row:
    max_depth: int | None
    min_samples_leaf: int
    depth: int
    nodes: int
    onnx_mb: float
    gemm_mb: float
    r2: float
    mae: float
    p50_us: float
    rows_per_s: float
    fit_s: float


def run_tradeoff(
    config: TrainConfig,
    depths: Sequence[int | None] = DEFAULT_DEPTHS,
    leaves: Sequence[int] = DEFAULT_LEAVES,
    out: Callable[[str], None] = print,
) -> list[Row]:
    """One row per (max_depth, min_samples_leaf) in depths x leaves, after the REFERENCE row."""
    combos = [REFERENCE] + [(d, leaf) for leaf in leaves for d in depths if (d, leaf) != REFERENCE]
    data = load_dataset(config)
    X_train, X_test, y_train, y_test = split(data, config.test_size, config.seed)
    X_batch = batch_from(X_test)
    out(
        f"tradeoff on {data.source}: {len(y_train)} train / {len(y_test)} test rows, "
        f"{config.n_estimators} trees; onnxruntime "
        f"CPU, intra_op_num_threads=1; batch = {len(X_batch):,} rows"
    )
    out(
        f"{'max_depth':>9} {'min_leaf':>8} {'reached':>7} {'nodes':>9} {'ONNX MB':>8} "
        f"{'gemm MB':>8} {'test R2':>8} {'MAE':>7} {'dR2':>8} {'ORT p50 us':>10} "
        f"{'ORT rows/s':>11} {'fit s':>6}"
    )
    rows: list[Row] = []
    for max_depth, min_leaf in combos:
        pipeline = build_pipeline(
            config.model_copy(update={"max_depth": max_depth, "min_samples_leaf": min_leaf})
        )
        start = time.perf_counter()
        pipeline.fit(X_train, y_train)
        fit_s = time.perf_counter() - start
        forest = pipeline.named_steps["forest"]
        predicted = pipeline.predict(X_test)
        model = export.to_cpu_onnx(pipeline, X_train.shape[1])
        data_bytes = model.SerializeToString()
        predict = ort_predictor(data_bytes, threads=1)
        p50, _ = one_row_latency(predict, X_test[0], LATENCY_CALLS)
        row = Row(
            max_depth=max_depth,
            min_samples_leaf=min_leaf,
            depth=max(int(e.tree_.max_depth) for e in forest.estimators_),
            nodes=sum(int(e.tree_.node_count) for e in forest.estimators_),
            onnx_mb=len(data_bytes) / 1e6,
            gemm_mb=build_gemm_model(pipeline, X_train.shape[1]).ByteSize() / 1e6,
            r2=float(r2_score(y_test, predicted)),
            mae=float(mean_absolute_error(y_test, predicted)),
            p50_us=p50,
            rows_per_s=batch_throughput(predict, X_batch),
            fit_s=fit_s,
        )
        rows.append(row)
        reference = rows[0].r2
        out(
            f"{_depth(row.max_depth):>9} {row.min_samples_leaf:>8} {row.depth:>7} "
            f"{row.nodes:>9,} {row.onnx_mb:>8.2f} {row.gemm_mb:>8.2f} {row.r2:>8.4f} "
            f"{row.mae:>7.4f} {row.r2 - reference:>+8.4f} "
            f"{row.p50_us:>10,.0f} {row.rows_per_s:>11,.0f} {row.fit_s:>6.1f}"
        )
    out(
        "dR2: test R2 minus the fully grown forest's (first row: max_depth none, "
        "min_samples_leaf 1)"
    )
    return rows


def _depth(max_depth: int | None) -> str:
    return "none" if max_depth is None else str(max_depth)
