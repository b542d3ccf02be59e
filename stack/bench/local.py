"""The served model run in this process (the limit the queue can approach), and bulk
scoring of a generated file checked against it."""

from __future__ import annotations

import csv
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from producer.bulk import PREDICTION_COLUMN, score_csv
from producer.client import Client
from stack.bench.config import BenchConfig, latency_summary
from stack.bench.report import cpu_cores

ONE_ROW_CALLS = 200
ONE_ROW_WARMUP = 20
BATCH_REPEATS = 3
SPOT_CHECK_ROWS = 100
BULK_WARMUP_ROWS = 40_000
SPOT_CHECK_ATOL = 1e-5


@dataclass(frozen=True)
class LocalModel:
    path: Path
    version: str
    input_name: str
    output_name: str

    def session(self, threads: int) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        return ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

    def predictor(self, threads: int) -> Callable[[NDArray[Any]], NDArray[np.float32]]:
        session = self.session(threads)

        def predict(X: NDArray[Any]) -> NDArray[np.float32]:
            (out,) = session.run(
                [self.output_name], {self.input_name: np.asarray(X, dtype=np.float32)}
            )
            return np.asarray(out, dtype=np.float32).reshape(-1)

        return predict


def find_local_model(
    model_dir: Path | None, name: str, version: str
) -> tuple[LocalModel | None, str | None]:
    """The served version's file, checked against its manifest, or why there is none."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None, "onnxruntime is not installed here (pip install '.[worker]')"
    if model_dir is None:
        return None, "no --model-dir: the served model's file is needed to run it here"
    from contract.errors import ModelArtifactError
    from training.artifact import load_manifest, verified_model_path

    try:
        version_dir, manifest = load_manifest(model_dir, name, version)
        path = verified_model_path(version_dir, manifest, "cpu")
    except ModelArtifactError as exc:
        return None, f"the served model {name}/{version} is not usable here: {exc}"
    return LocalModel(path, manifest.version, manifest.input_name, manifest.output_name), None


def training_summary(local: LocalModel | None, reason: str | None) -> dict[str, Any]:
    """What `python -m training` measured for this version (P4), from its benchmark.json."""
    from training.artifact import BENCHMARK_FILE

    if local is None:
        return {"available": False, "reason": reason}
    path = local.path.parent / BENCHMARK_FILE
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return {
            "available": False,
            "reason": f"no training benchmark for this version ({path.name}: {exc}); "
            "`python -m training` writes one unless --no-benchmark",
        }
    return {"available": True, "path": str(path), **summary}


def one_row_latency_us(
    predict: Callable[[NDArray[Any]], Any], row: NDArray[np.float32]
) -> dict[str, Any]:
    row = row.reshape(1, -1)
    for _ in range(ONE_ROW_WARMUP):
        predict(row)
    samples = np.empty(ONE_ROW_CALLS)
    for i in range(ONE_ROW_CALLS):
        start = time.perf_counter()
        predict(row)
        samples[i] = time.perf_counter() - start
    p50, p95 = np.percentile(samples * 1e6, [50, 95])
    return {"calls": ONE_ROW_CALLS, "p50_us": float(p50), "p95_us": float(p95)}


def batch_rows_per_s(predict: Callable[[NDArray[Any]], Any], X: NDArray[np.float32]) -> float:
    """Best of BATCH_REPEATS calls after one warm-up: the limit, not the average."""
    predict(X)
    best = float("inf")
    for _ in range(BATCH_REPEATS):
        start = time.perf_counter()
        predict(X)
        best = min(best, time.perf_counter() - start)
    return len(X) / best


def inprocess(model: LocalModel, rows: int, n_features: int, seed: int) -> dict[str, Any]:
    cores = cpu_cores()
    X = np.random.default_rng(seed + 5).uniform(0, 1, (rows, n_features)).astype(np.float32)
    one = model.predictor(1)
    result: dict[str, Any] = {
        "available": True,
        "model_version": model.version,
        "one_row": {"threads": 1, **one_row_latency_us(one, X[0])},
        "batch_one_thread": {"rows": rows, "threads": 1, "rows_per_s": batch_rows_per_s(one, X)},
    }
    all_cores = model.predictor(cores)
    result["batch_all_cores"] = {
        "rows": rows,
        "threads": cores,
        "rows_per_s": batch_rows_per_s(all_cores, X),
    }
    if (
        cores > 1
        and result["batch_all_cores"]["rows_per_s"] < result["batch_one_thread"]["rows_per_s"]
    ):
        # Each parallel section waits for its slowest thread: one core busy elsewhere makes
        # all cores slower than one, and P1, measured against it, looks better than it is.
        result["warning"] = (
            f"{cores} threads were slower than 1: other work held the cores, so P1's "
            "denominator is understated; rerun on a quieter machine"
        )
    return result


def write_csv(path: Path, data: NDArray[np.float32], names: list[str]) -> None:
    # %.9g round-trips float32 exactly: the worker sees the very values generated here.
    np.savetxt(path, data, fmt="%.9g", delimiter=",", header=",".join(names), comments="")


def bulk(
    client: Client,
    work_dir: Path,
    rows: int,
    names: list[str],
    config: BenchConfig,
    reference: Callable[[NDArray[Any]], NDArray[np.float32]] | None,
    reference_reason: str | None,
) -> dict[str, Any]:
    rng = np.random.default_rng(config.seed + 3)
    src, dst = work_dir / "bench-input.csv", work_dir / "bench-scored.csv"
    t0 = time.perf_counter()
    write_csv(src, rng.uniform(0, 1, (rows, len(names))).astype(np.float32), names)
    csv_write_s = time.perf_counter() - t0

    # An untimed run over the file's head first: imports (pyarrow), the first allocations
    # of each side; the in-process reference is timed after a warm-up call too.
    head = work_dir / "bench-warmup.csv"
    with src.open("rb") as fh_in, head.open("wb") as fh_out:
        fh_out.writelines(itertools.islice(fh_in, BULK_WARMUP_ROWS + 1))
    score_csv(
        client, head, work_dir / "bench-warmup-scored.csv", queue=config.queue,
        chunk_rows=config.chunk_rows, progress=False, restart=True,
    )  # fmt: skip
    for path in (head, work_dir / "bench-warmup-scored.csv"):
        path.unlink(missing_ok=True)

    start = time.perf_counter()
    summary = score_csv(
        client,
        src,
        dst,
        queue=config.queue,
        chunk_rows=config.chunk_rows,
        max_in_flight=config.in_flight,
        progress=False,
        restart=True,
    )
    seconds = time.perf_counter() - start

    # Counted from the file, not the summary: what a user gets is what is on disk.
    sample = set(
        rng.choice(rows, size=min(SPOT_CHECK_ROWS, rows), replace=False).tolist() if rows else []
    )
    picked: list[list[float]] = []
    served: list[float] = []
    rows_out = 0
    with dst.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        columns = [header.index(n) for n in names]
        pred_col = header.index(PREDICTION_COLUMN)
        for i, line in enumerate(reader):
            rows_out += 1
            if i in sample:
                picked.append([float(line[c]) for c in columns])
                served.append(float(line[pred_col]))
    spot: dict[str, Any] = {"rows": len(picked), "atol": SPOT_CHECK_ATOL}
    if reference is None:
        spot.update(max_abs_diff=None, passed=None, reason=reference_reason)
    else:
        expected = reference(np.asarray(picked, dtype=np.float64))
        diff = float(np.max(np.abs(np.asarray(served) - expected))) if picked else 0.0
        spot.update(max_abs_diff=diff, passed=diff <= SPOT_CHECK_ATOL)
    for path in (src, dst):
        path.unlink(missing_ok=True)
    return {
        "rows_in": rows,
        "rows_out": rows_out,
        "rows_scored": summary.rows,
        "chunks": summary.chunks,
        "chunk_rows": config.chunk_rows or client.settings.chunk_rows,
        "in_flight": config.in_flight or client.settings.max_in_flight,
        "csv_write_s": csv_write_s,
        "warmup_rows": BULK_WARMUP_ROWS,
        "seconds": seconds,
        "rows_per_s": rows / seconds if seconds else None,
        "worker_task": latency_summary([ms / 1e3 for ms in summary.task_ms]),
        "spot_check": spot,
    }
