"""Latency and throughput of the published model files against scikit-learn.

For information only: nothing here gates publishing. onnxruntime sessions are
pinned to one intra-op thread (SessionOptions.intra_op_num_threads=1), the way a
worker process with one Celery slot per core runs them, and compared with
scikit-learn at n_jobs=1; one last line repeats the batch figures with all cores.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from numpy.typing import NDArray
from sklearn.pipeline import Pipeline

from training.artifact import BENCHMARK_FILE, Manifest, Variant, verified_model_path
from training.config import TrainConfig
from training.export import cpu_session, onnx_predict

if TYPE_CHECKING:
    from training.train import TrainOutcome

LATENCY_CALLS = 200
WARMUP_CALLS = 20
BATCH_ROWS = 65_536
BATCH_REPEATS = 3
SLOW_CALL_S = 1.0

Predict = Callable[[NDArray[np.float64]], Any]


@dataclass(frozen=True)
class Timing:
    p50_us: float
    p95_us: float
    rows_per_s: float


def one_row_latency(
    predict: Predict, row: NDArray[np.float64], calls: int | None = None
) -> tuple[float, float]:
    """p50 and p95 of one-row calls (default LATENCY_CALLS), in microseconds, after
    WARMUP_CALLS unmeasured calls."""
    row = row.reshape(1, -1)
    n_calls = LATENCY_CALLS if calls is None else calls
    for _ in range(WARMUP_CALLS):
        predict(row)
    samples = np.empty(n_calls)
    for i in range(n_calls):
        start = time.perf_counter_ns()
        predict(row)
        samples[i] = time.perf_counter_ns() - start
    p50, p95 = np.percentile(samples, [50, 95]) / 1e3
    return float(p50), float(p95)


def batch_throughput(predict: Predict, X: NDArray[np.float64], repeats: int | None = None) -> float:
    """Rows per second on X, best of up to `repeats` calls after one warm-up call.

    An engine slower than SLOW_CALL_S per call is timed once, to keep the printout quick.
    """
    warmup = _seconds(predict, X)
    calls = 1 if warmup > SLOW_CALL_S else (BATCH_REPEATS if repeats is None else repeats)
    best = min(_seconds(predict, X) for _ in range(calls))
    return len(X) / best


def measure(predict: Predict, X_batch: NDArray[np.float64]) -> Timing:
    p50, p95 = one_row_latency(predict, X_batch[0])
    return Timing(p50, p95, batch_throughput(predict, X_batch))


def batch_from(
    X: NDArray[np.float64], rows: int | None = None, seed: int = 0
) -> NDArray[np.float64]:
    """`rows` rows (default BATCH_ROWS) drawn with replacement from X."""
    size = BATCH_ROWS if rows is None else rows
    return X[np.random.default_rng(seed).integers(0, len(X), size=size)]


def ort_predictor(model: Path | bytes, threads: int) -> Predict:
    session = cpu_session(model.read_bytes() if isinstance(model, Path) else model, threads=threads)
    return lambda X: onnx_predict(session, X)


def run_benchmark(
    version_dir: Path,
    manifest: Manifest,
    pipeline: Pipeline,
    X: NDArray[np.float64],
    out: Callable[[str], None] = print,
) -> dict[str, Timing]:
    X_batch = batch_from(X)
    forest = pipeline.named_steps["forest"]
    fit_jobs = forest.n_jobs
    results: dict[str, Timing] = {}
    try:
        forest.set_params(n_jobs=1)
        results["scikit-learn"] = measure(pipeline.predict, X_batch)
        for variant in _prediction_variants(manifest):
            path = verified_model_path(version_dir, manifest, variant)
            results[f"onnxruntime {path.name}"] = measure(ort_predictor(path, threads=1), X_batch)
        forest.set_params(n_jobs=-1)
        all_cores = {"scikit-learn": batch_throughput(pipeline.predict, X_batch)}
        for variant in _prediction_variants(manifest):
            path = verified_model_path(version_dir, manifest, variant)
            all_cores[path.name] = batch_throughput(ort_predictor(path, threads=0), X_batch)
    finally:
        forest.set_params(n_jobs=fit_jobs)

    base = results["scikit-learn"]
    out(
        f"benchmark: one thread (onnxruntime SessionOptions.intra_op_num_threads=1, "
        f"scikit-learn n_jobs=1); one row: p50/p95 of {LATENCY_CALLS} calls after "
        f"{WARMUP_CALLS} warm-up; batch: {len(X_batch):,} rows, best of {BATCH_REPEATS} "
        f"(1 when a call takes over {SLOW_CALL_S:g} s)"
    )
    out(
        f"  {'engine':<32}{'1-row p50 us':>13}{'p95 us':>10}{'batch rows/s':>15}"
        f"{'x sklearn (1 row / batch)':>28}"
    )
    for engine, t in results.items():
        out(
            f"  {engine:<32}{t.p50_us:>13,.0f}{t.p95_us:>10,.0f}{t.rows_per_s:>15,.0f}"
            f"{base.p50_us / t.p50_us:>17.1f} / {t.rows_per_s / base.rows_per_s:<8.1f}"
        )
    cores = os.cpu_count() or 1
    out(
        f"  all {cores} cores, batch rows/s (intra_op_num_threads=0, n_jobs=-1): "
        + ", ".join(f"{k} {v:,.0f}" for k, v in all_cores.items())
    )
    return results


def unpruned_r2(config: TrainConfig, outcome: TrainOutcome) -> float:
    """Test R2 of the same forest grown without depth or leaf limits, on the same split:
    what the default limits cost in accuracy."""
    from sklearn.metrics import r2_score

    from training.train import build_pipeline, split

    X_train, X_test, y_train, y_test = split(outcome.dataset, config.test_size, config.seed)
    pipeline = build_pipeline(config.model_copy(update={"max_depth": None, "min_samples_leaf": 1}))
    pipeline.fit(X_train, y_train)
    return float(r2_score(y_test, pipeline.predict(X_test)))


def write_summary(
    version_dir: Path,
    manifest: Manifest,
    results: dict[str, Timing],
    reference_r2: float | None,
) -> dict[str, Any]:
    """The model's goal figures (P4), beside its manifest, for `python -m stack.bench`."""
    from datetime import UTC, datetime

    cpu_file = manifest.files["cpu"]
    sklearn = results["scikit-learn"]
    ort = results[f"onnxruntime {cpu_file.path}"]
    r2 = manifest.metrics["r2"]
    summary = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "one_row_p50_us": {"scikit-learn": sklearn.p50_us, "onnxruntime": ort.p50_us},
        "one_row_speedup": sklearn.p50_us / ort.p50_us,
        "batch_rows_per_s_one_thread": {
            "scikit-learn": sklearn.rows_per_s,
            "onnxruntime": ort.rows_per_s,
        },
        "artifact_bytes": cpu_file.size_bytes,
        "r2": r2,
        "unpruned_r2": reference_r2,
        "r2_loss": None if reference_r2 is None else reference_r2 - r2,
        "max_depth": manifest.params.get("max_depth"),
        "min_samples_leaf": manifest.params.get("min_samples_leaf"),
    }
    (version_dir / BENCHMARK_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def record_goals(
    config: TrainConfig, outcome: TrainOutcome, out: Callable[[str], None] = print
) -> dict[str, Any]:
    """Time the published model against scikit-learn, fit the unlimited forest for reference
    (when the config limits it), print the model goals and write them beside the manifest."""
    results = run_benchmark(
        outcome.version_dir, outcome.manifest, outcome.pipeline, outcome.X_test, out
    )
    reference = None
    if config.max_depth is not None or config.min_samples_leaf > 1:
        reference = unpruned_r2(config, outcome)
    summary = write_summary(outcome.version_dir, outcome.manifest, results, reference)
    loss = summary["r2_loss"]
    out(
        f"model goals: onnxruntime {summary['one_row_speedup']:.0f}x scikit-learn per row "
        f"(goal >= 50); model.onnx {summary['artifact_bytes'] / 1e6:.2f} MB (goal <= 5); "
        + (
            f"R2 {summary['r2']:.4f} vs unpruned {summary['unpruned_r2']:.4f}, "
            f"loss {loss:.4f} (goal <= 0.01)"
            if loss is not None
            else "unpruned already (no R2 loss)"
        )
    )
    return summary


def _seconds(predict: Predict, X: NDArray[np.float64]) -> float:
    start = time.perf_counter()
    predict(X)
    return time.perf_counter() - start


def _prediction_variants(manifest: Manifest) -> list[Variant]:
    """The model files that predict (explain.onnx has its own benchmark: stack.bench explain)."""
    return [cast(Variant, v) for v in sorted(manifest.files) if v in ("cpu", "gpu")]
