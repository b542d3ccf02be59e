"""`python -m producer bench`: how fast the queue serves, against what the model allows.

Against a deployment (REDIS_URL set, workers running), or with `--embedded` against a
private redis-server and a CPU worker it starts itself (training a model first if
`--model-dir` has none), it measures in one run:

1. single-row round trips, one at a time: `inference.predict` and the no-op task
   `inference.noop` (Celery's own cost per message), interleaved so that both see the
   same machine;
2. sustained single-row throughput, a window of jobs kept in flight, for both tasks;
3. batch jobs (`inference.predict_batch`): latency one at a time, rows/s in flight;
4. scoring a generated CSV file with producer.bulk.score_csv, end to end, with every row
   accounted for and predictions spot-checked against the model run in this process;
5. the same model in this process with onnxruntime: the limit the queue can approach.

It prints a table and the goal ratios (P1, P2, P3, P5) and writes everything as JSON.
Nothing here judges absolute speed: on a shared machine only ratios from one run compare.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import redis
from numpy.typing import NDArray

from producer.bench_report import (
    compute_goals,
    compute_ratios,
    cpu_cores,
    format_report,
    machine_info,
)
from producer.bulk import PREDICTION_COLUMN, score_csv
from producer.client import Client, TaskStatus, resolve_queue
from producer.contract import TASK_NOOP, TASK_PREDICT, WORKER_STATE_PREFIX, WorkerState, result_key
from producer.settings import ProducerSettings, redact

REPORT_VERSION = 1
WARMUP_JOBS = 10
"""Unmeasured round trips per task before the sequential ones: connections, imports and
the worker's first-message costs are not what a steady producer sees."""
ONE_ROW_CALLS = 200
ONE_ROW_WARMUP = 20
BATCH_REPEATS = 3
SUSTAINED_ROUNDS = 3
SPOT_CHECK_ROWS = 100
BULK_WARMUP_ROWS = 40_000
SPOT_CHECK_ATOL = 1e-5
READY_TIMEOUT_S = 120.0

FULL = {
    "single_jobs": 300,
    "sustained_jobs": 3_000,
    "window": 256,
    "batch_jobs": 20,
    "batch_rows": 5_000,
    "bulk_rows": 1_000_000,
    "inprocess_rows": 65_536,
}
QUICK = {
    "single_jobs": 30,
    "sustained_jobs": 300,
    "window": 32,
    "batch_jobs": 10,
    "batch_rows": 1_000,
    "bulk_rows": 20_000,
    "inprocess_rows": 8_192,
}


class BenchError(RuntimeError):
    """The bench cannot run here: no workers, no model info, a worker that will not start."""


@dataclass(frozen=True)
class BenchConfig:
    embedded: bool = False
    model_dir: Path | None = None
    """Where the served model's files are (for the in-process reference; with --embedded,
    also where a model is trained if there is none)."""
    model_name: str = "friedman1"
    queue: str = "cpu"
    processes: int | None = None
    """Worker processes with --embedded; None: one per core."""
    single_jobs: int = FULL["single_jobs"]
    sustained_jobs: int = FULL["sustained_jobs"]
    window: int = FULL["window"]
    batch_jobs: int = FULL["batch_jobs"]
    batch_rows: int = FULL["batch_rows"]
    bulk_rows: int = FULL["bulk_rows"]
    chunk_rows: int | None = None
    """Rows per bulk chunk; None: the producer's setting (INFERENCE_CHUNK_ROWS)."""
    in_flight: int | None = None
    """Chunks (bulk) and batch jobs in flight; None: INFERENCE_MAX_IN_FLIGHT."""
    inprocess_rows: int = FULL["inprocess_rows"]
    json_out: Path = Path("out/bench.json")
    work_dir: Path | None = None
    """Worker log and the bulk files; None: a temporary directory (log beside the JSON)."""
    seed: int = 0
    noop_probe_s: float = 5.0
    worker_loglevel: str = "INFO"
    quick: bool = False


# -- measuring -----------------------------------------------------------------------------


def latency_summary(seconds: Sequence[float]) -> dict[str, Any]:
    """Percentiles in ms; numpy's linear interpolation keeps p50 <= p95 <= p99."""
    if not seconds:
        return {"count": 0, "p50_ms": None, "p95_ms": None, "p99_ms": None, "mean_ms": None}
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {
        "count": len(ms),
        "p50_ms": float(p50),
        "p95_ms": float(p95),
        "p99_ms": float(p99),
        "mean_ms": float(ms.mean()),
        "max_ms": float(ms.max()),
    }


def probe_noop(client: Client, queue: str, timeout_s: float) -> str | None:
    """None when the workers run the no-op task, else why its figures are unavailable."""
    task_id = client.send(TASK_NOOP, {}, queue)
    try:
        done = client.wait_any([task_id], timeout_s)
    except TimeoutError:
        return (
            f"no result for {TASK_NOOP} in {timeout_s:g}s: the workers do not seem to know it "
            "(Celery discards a message for an unknown task)"
        )
    status = done[0]
    forget(client, [task_id])
    if status.state == "SUCCESS":
        return None
    error = status.error
    if error is not None and error.type == "NotRegistered":
        return f"the workers do not know {TASK_NOOP} (NotRegistered)"
    detail = f"{error.type}: {error.message}" if error else status.state
    return f"{TASK_NOOP} failed: {detail}"


def single_row(
    client: Client, rows: NDArray[np.float64], queue: str, with_noop: bool
) -> tuple[list[float], list[float], list[float]]:
    """Sequential round trips (send, then wait for the result), predict and noop in turn:
    both see the same moments of a noisy machine, so their ratio holds up. Returns the
    predict and noop round trips and predict's task time in the worker, in seconds."""
    predict_s: list[float] = []
    noop_s: list[float] = []
    task_s: list[float] = []
    ids: list[str] = []
    for i, row in enumerate(rows.tolist()):
        start = time.perf_counter()
        ids.append(client.submit(row, queue))
        result = client.wait(ids[-1])
        elapsed = time.perf_counter() - start
        if i >= WARMUP_JOBS:
            predict_s.append(elapsed)
            task_s.append(float(result["latency"]["task_ms"]) / 1e3)
        if with_noop:
            start = time.perf_counter()
            ids.append(client.send(TASK_NOOP, {}, queue))
            client.wait(ids[-1])
            elapsed = time.perf_counter() - start
            if i >= WARMUP_JOBS:
                noop_s.append(elapsed)
    forget(client, ids)
    return predict_s, noop_s, task_s


def forget(client: Client, task_ids: Sequence[str]) -> None:
    """Delete the results the bench has read: against a real deployment they would
    otherwise sit in its Redis for INFERENCE_RESULT_TTL_S (a day by default)."""
    ids = list(task_ids)
    for i in range(0, len(ids), 1000):
        client.redis.delete(*(result_key(t) for t in ids[i : i + 1000]))


@dataclass
class Windowed:
    jobs: int = 0
    window: int = 0
    seconds: float = 0.0
    cpu_s: float = 0.0
    """CPU time of this process meanwhile: on a small machine the producer's polling
    competes with the workers for the same cores."""
    latencies: list[float] = field(default_factory=list)
    statuses: list[TaskStatus] = field(default_factory=list)
    failed: int = 0
    first_error: str | None = None

    def add(self, other: Windowed) -> None:
        self.jobs += other.jobs
        self.window = other.window
        self.seconds += other.seconds
        self.cpu_s += other.cpu_s
        self.latencies += other.latencies
        self.statuses += other.statuses
        self.failed += other.failed
        self.first_error = self.first_error or other.first_error

    def summary(self) -> dict[str, Any]:
        return {
            "available": True,
            "jobs": self.jobs,
            "window": self.window,
            "seconds": self.seconds,
            "jobs_per_s": self.jobs / self.seconds if self.seconds else None,
            "producer_cpu_s": self.cpu_s,
            "failed": self.failed,
            "first_error": self.first_error,
            "latency": latency_summary(self.latencies),
        }


def windowed(
    client: Client,
    send: Callable[[range], list[str]],
    jobs: range,
    window: int,
    keep: bool = False,
) -> Windowed:
    """Send jobs `jobs` keeping `window` in flight, topping the window up with one `send`
    call of as many jobs as it lacks; latency is send -> result seen."""
    run = Windowed(jobs=len(jobs), window=window)
    sent_at: dict[str, float] = {}
    done: list[str] = []
    next_job, end = jobs.start, jobs.stop
    start, cpu = time.perf_counter(), time.process_time()
    while next_job < end or sent_at:
        if next_job < end and len(sent_at) < window:
            take = min(window - len(sent_at), end - next_job)
            now = time.perf_counter()
            for task_id in send(range(next_job, next_job + take)):
                sent_at[task_id] = now
            next_job += take
        for status in client.wait_any(list(sent_at)):
            done.append(status.task_id)
            run.latencies.append(time.perf_counter() - sent_at.pop(status.task_id))
            if status.state != "SUCCESS":
                run.failed += 1
                if run.first_error is None:
                    err = status.error
                    run.first_error = f"{err.type}: {err.message}" if err else status.state
            if keep:
                run.statuses.append(status)
    run.seconds = time.perf_counter() - start
    run.cpu_s = time.process_time() - cpu
    forget(client, done)
    return run


def plain_celery_app(settings: ProducerSettings) -> Any:
    """What a team writes by hand: a stock Celery client, one send_task per row."""
    from celery import Celery

    from producer.connections import celery_ssl_options

    app = Celery("bench-plain-celery", broker=settings.broker)
    app.conf.update(task_serializer="json", accept_content=["json"])
    app.conf.update(celery_ssl_options(settings))
    return app


def batch_histogram(statuses: Sequence[TaskStatus]) -> dict[str, int]:
    """Batches the row lane ran, by size bucket, from the batch_size each result reports
    (a batch of n shows up in n results)."""
    jobs_by_size: dict[int, int] = {}
    for status in statuses:
        size = (status.result or {}).get("batch_size")
        if isinstance(size, int) and size > 0:
            jobs_by_size[size] = jobs_by_size.get(size, 0) + 1
    buckets: dict[str, float] = {}
    for size, jobs in sorted(jobs_by_size.items()):
        low = 1 << (size.bit_length() - 1)
        key = "1" if low == 1 else f"{low}-{2 * low - 1}"
        buckets[key] = buckets.get(key, 0) + jobs / size
    return {k: round(v) for k, v in buckets.items()}


def sustained(
    client: Client,
    rows: NDArray[np.float64],
    queue: str,
    window: int,
    with_noop: bool,
    rounds: int = SUSTAINED_ROUNDS,
) -> dict[str, Any]:
    """Three ways of running one job per row, in alternating rounds so that a burst of load
    from elsewhere on the machine does not land on one side of a ratio only:

    - predict: this product, Client.send_many onto the row queue, served by the row lane;
    - plain_celery: a stock Celery client's send_task per row onto the main queue, served
      by Celery's own consumer (results read with MGET, which is kinder to it than
      AsyncResult.get's pub/sub);
    - noop: the no-op task through Celery's consumer, its bare cost per message.
    """
    # send_many, not submit_many: the rows are valid by construction, and pydantic's check
    # per row is a producer cost the other sides would not pay.
    features = rows.tolist()
    arms: dict[str, Windowed] = {"predict": Windowed(), "plain_celery": Windowed()}
    if with_noop:
        arms["noop"] = Windowed()
    plain = plain_celery_app(client.settings)
    senders: dict[str, Callable[[range], list[str]]] = {
        "predict": lambda r: client.send_many(
            TASK_PREDICT, [{"features": features[i]} for i in r], queue
        ),
        "plain_celery": lambda r: [
            str(plain.send_task(TASK_PREDICT, kwargs={"features": features[i]}, queue=queue).id)
            for i in r
        ],
        "noop": lambda r: client.send_many(TASK_NOOP, [{} for _ in r], queue),
    }
    statuses: list[TaskStatus] = []
    try:
        bounds = np.linspace(0, len(features), rounds + 1).astype(int)
        for lo, hi in itertools.pairwise(bounds.tolist()):
            for name, total in arms.items():
                run = windowed(client, senders[name], range(lo, hi), window, keep=name == "predict")
                statuses += run.statuses
                run.statuses = []
                total.add(run)
    finally:
        plain.close()
    out = {name: total.summary() for name, total in arms.items()}
    out["predict"]["batch_sizes"] = batch_histogram(statuses)
    return out


def batch_jobs(
    client: Client, batches: list[list[list[float]]], queue: str, in_flight: int
) -> dict[str, Any]:
    sequential: list[float] = []
    task_ms: list[float] = []
    rows_back = 0
    start = time.perf_counter()
    ids: list[str] = []
    for rows in batches:
        t0 = time.perf_counter()
        ids.append(client.submit_batch(rows, queue))
        result = client.wait(ids[-1])
        sequential.append(time.perf_counter() - t0)
        rows_back += len(result["predictions"])
        task_ms.append(float(result["latency"]["task_ms"]))
    sequential_s = time.perf_counter() - start
    forget(client, ids)
    rows_sent = sum(len(rows) for rows in batches)

    run = windowed(
        client,
        lambda r: [client.submit_batch(batches[i], queue) for i in r],
        range(len(batches)),
        in_flight,
        keep=True,
    )
    for status in run.statuses:
        if status.result is not None:
            rows_back += len(status.result.get("predictions", []))
            task_ms.append(float(status.result["latency"]["task_ms"]))
    per_job = len(batches[0]) if batches else 0
    return {
        "jobs": len(batches),
        "rows_per_job": per_job,
        "rows_sent": 2 * rows_sent,
        "rows_back": rows_back,
        "worker_task": latency_summary([ms / 1e3 for ms in task_ms]),
        "sequential": {
            "seconds": sequential_s,
            "rows_per_s": rows_sent / sequential_s if sequential_s else None,
            "latency": latency_summary(sequential),
        },
        "concurrent": {
            "in_flight": in_flight,
            "seconds": run.seconds,
            "rows_per_s": rows_sent / run.seconds if run.seconds else None,
            "producer_cpu_s": run.cpu_s,
            "failed": run.failed,
            "first_error": run.first_error,
            "latency": latency_summary(run.latencies),
        },
    }


# -- the model in this process -------------------------------------------------------------


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
    from producer.errors import ModelArtifactError
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


# -- bulk ----------------------------------------------------------------------------------


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


# -- where the workers are -----------------------------------------------------------------


def live_workers(client: Client, queue: str) -> list[WorkerState]:
    states: list[WorkerState] = []
    for key in client.redis.scan_iter(match=f"{WORKER_STATE_PREFIX}*", count=500):
        raw = client.redis.get(key)
        if raw is None:
            continue
        try:
            state = WorkerState.model_validate_json(raw)
        except ValueError:
            continue
        if queue in state.queues:
            states.append(state)
    return states


def ensure_model(model_dir: Path, name: str, say: Callable[[str], None]) -> float | None:
    """Seconds spent training, or None when a model was there already."""
    from training.artifact import CURRENT_FILE

    if (model_dir / name / CURRENT_FILE).exists():
        return None
    say(f"no model under {model_dir}/{name}: training one (python -m training defaults)")
    try:
        from training.train import TrainConfig, run_training
    except ImportError as exc:
        raise BenchError(
            f"cannot train a model: {exc} (pip install '.[training]', or pass --model-dir "
            "with a trained model)"
        ) from None
    from training.bench import record_goals

    start = time.perf_counter()
    config = TrainConfig(model_dir=model_dir, name=name)
    # With its model goals (P4), as `python -m training` does.
    record_goals(config, run_training(config), out=say)
    return time.perf_counter() - start


@dataclass
class Deployment:
    settings: ProducerSettings
    mode: str
    worker: dict[str, Any]


@contextlib.contextmanager
def embedded(
    config: BenchConfig, model_dir: Path, log_dir: Path, say: Callable[[str], None]
) -> Iterator[Deployment]:
    """A private redis-server and one prefork CPU worker, stopped on the way out."""
    from producer.embedded_redis import EmbeddedRedis
    from worker.processes import celery_env, wait_ready, worker_process

    queue = resolve_queue(config.queue)
    processes = config.processes or cpu_cores()
    training_s = ensure_model(model_dir, config.model_name, say)
    with EmbeddedRedis() as server:
        say(f"private redis-server on {server.url}")
        env = celery_env(
            server.url,
            model_dir=model_dir.resolve(),
            model_name=config.model_name,
            intra_op_threads=1,
        )
        # Overrides meant for a real deployment would point the worker elsewhere.
        for name in ("INFERENCE_BROKER_URL", "INFERENCE_RESULT_BACKEND", "INFERENCE_MODEL_VERSION"):
            env.pop(name, None)
        hostname = f"bench-{os.getpid()}@{socket.gethostname()}"
        log_path = log_dir / "bench-worker.log"
        worker = worker_process(
            env,
            log_path,
            queue=queue,
            name=hostname,
            concurrency=processes,
            loglevel=config.worker_loglevel,
        )
        say(f"starting a CPU worker ({processes} prefork processes); log {log_path}")
        probe = redis.Redis.from_url(server.url)
        start = time.perf_counter()
        worker.start()
        try:
            try:
                wait_ready(worker, probe, hostname, processes, timeout_s=READY_TIMEOUT_S)
            except (RuntimeError, TimeoutError) as exc:
                raise BenchError(str(exc)) from None
            finally:
                probe.close()
            ready_s = time.perf_counter() - start
            settings = ProducerSettings(redis_url=server.url, broker_url=None, result_backend=None)
            yield Deployment(
                settings,
                "embedded",
                {
                    "hostnames": [hostname],
                    "processes": processes,
                    "pool": "prefork",
                    "intra_op_threads": 1,
                    "loglevel": config.worker_loglevel,
                    "start_to_ready_s": ready_s,
                    "training_s": training_s,
                    "log": str(log_path),
                },
            )
        finally:
            worker.stop()


# -- the run -------------------------------------------------------------------------------


def _check(items: list[dict[str, Any]], name: str, ok: bool | None, detail: str) -> None:
    status = "skipped" if ok is None else ("ok" if ok else "FAILED")
    items.append({"name": name, "status": status, "detail": detail})


def measure(
    client: Client,
    config: BenchConfig,
    model_dir: Path | None,
    work_dir: Path,
    say: Callable[[str], None],
) -> dict[str, Any]:
    queue = resolve_queue(config.queue)
    info = client.model_info(queue, refresh=True)
    if info is None:
        raise BenchError("no model info in Redis: no worker has ever started against it")
    workers = live_workers(client, queue)
    if not workers:
        raise BenchError(f"no live worker consumes {queue}: start one, or use --embedded")
    n = info.n_features
    rng = np.random.default_rng(config.seed)
    report: dict[str, Any] = {
        "model": {
            "name": info.name,
            "version": info.version,
            "n_features": n,
            "feature_names": info.feature_names,
            "max_batch_rows": info.max_batch_rows,
        },
        "workers_seen": [
            {"hostname": w.hostname, "pid": w.pid, "pool": w.pool, "device": w.device}
            for w in workers
        ],
    }
    local, local_reason = find_local_model(model_dir, info.name, info.version)
    reference = local.predictor(1) if local else None
    report["model_goals"] = training_summary(local, local_reason)

    say(f"probing {TASK_NOOP}")
    noop_reason = probe_noop(client, queue, config.noop_probe_s)
    with_noop = noop_reason is None
    unavailable = {"available": False, "reason": noop_reason}

    say(f"single-row round trips: {config.single_jobs} each")
    rows = rng.uniform(0, 1, (config.single_jobs + WARMUP_JOBS, n))
    predict_s, noop_s, task_s = single_row(client, rows, queue, with_noop)
    report["single_row"] = {
        "predict": {
            "available": True,
            **latency_summary(predict_s),
            "worker_task": latency_summary(task_s),
        },
        "noop": {"available": True, **latency_summary(noop_s)} if with_noop else unavailable,
    }

    say(f"sustained single-row: {config.sustained_jobs} jobs each, {config.window} in flight")
    rows = rng.uniform(0, 1, (config.sustained_jobs, n))
    report["sustained"] = sustained(client, rows, queue, config.window, with_noop)
    if not with_noop:
        report["sustained"]["noop"] = unavailable

    batch_rows = min(config.batch_rows, info.max_batch_rows)
    in_flight = config.in_flight or client.settings.max_in_flight
    say(f"batch jobs: {config.batch_jobs} x {batch_rows} rows")
    batches = [rng.uniform(0, 1, (batch_rows, n)).tolist() for _ in range(config.batch_jobs)]
    report["batch"] = batch_jobs(client, batches, queue, in_flight)

    say(f"bulk CSV: {config.bulk_rows} rows")
    report["bulk"] = bulk(
        client, work_dir, config.bulk_rows, info.feature_names, config, reference, local_reason
    )

    if local is not None:
        say(f"in-process onnxruntime: {config.inprocess_rows} rows")
        report["inprocess"] = inprocess(local, config.inprocess_rows, n, config.seed)
    else:
        report["inprocess"] = {"available": False, "reason": local_reason}
    return report


def checks(report: dict[str, Any]) -> dict[str, Any]:
    items: list[dict[str, Any]] = []
    bulk_part = report["bulk"]
    _check(
        items,
        "bulk rows out == rows in",
        bulk_part["rows_out"] == bulk_part["rows_in"] == bulk_part["rows_scored"],
        f"{bulk_part['rows_in']} in, {bulk_part['rows_out']} in the output file",
    )
    spot = bulk_part["spot_check"]
    _check(
        items,
        "bulk predictions == in-process model",
        spot["passed"],
        f"{spot['rows']} rows, max |diff| {spot['max_abs_diff']} (atol {spot['atol']:g})"
        if spot["passed"] is not None
        else f"skipped: {spot.get('reason')}",
    )
    batch = report["batch"]
    _check(
        items,
        "batch rows back == rows sent",
        batch["rows_back"] == batch["rows_sent"] and not batch["concurrent"]["failed"],
        f"{batch['rows_sent']} sent, {batch['rows_back']} back",
    )
    for task in ("predict", "plain_celery", "noop"):
        part = report["sustained"].get(task) or {}
        if part.get("available"):
            _check(
                items,
                f"sustained {task}: no failed job",
                part["failed"] == 0,
                f"{part['failed']} of {part['jobs']} failed"
                + (f" (first: {part['first_error']})" if part["first_error"] else ""),
            )
    return {"passed": all(i["status"] != "FAILED" for i in items), "items": items}


def run_bench(
    config: BenchConfig,
    settings: ProducerSettings | None = None,
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure, write the JSON to config.json_out, and return the report."""
    note = say or (lambda _msg: None)
    default_dir = os.environ.get("INFERENCE_MODEL_DIR", "models")
    model_dir = config.model_dir or (Path(default_dir) if config.embedded else None)
    if model_dir is None and Path(default_dir).is_dir():
        model_dir = Path(default_dir)
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        work_dir = config.work_dir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="inference-bench-"))
        )
        work_dir.mkdir(parents=True, exist_ok=True)
        if config.embedded:
            assert model_dir is not None
            log_dir = config.work_dir or config.json_out.parent
            log_dir.mkdir(parents=True, exist_ok=True)
            deployment = stack.enter_context(embedded(config, model_dir, log_dir, note))
        else:
            deployment = Deployment(settings or ProducerSettings(), "deployment", {})
        client = stack.enter_context(Client(deployment.settings))
        measured = measure(client, config, model_dir, work_dir, note)
        server_version = _redis_version(client)
    worker = deployment.worker or {
        "hostnames": sorted({w["hostname"] for w in measured["workers_seen"]}),
        "processes": len(measured["workers_seen"]),
        "start_to_ready_s": None,
    }
    report: dict[str, Any] = {
        "report_version": REPORT_VERSION,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": deployment.mode,
        "machine": machine_info(),
        "redis": {"url": redact(deployment.settings.redis_url), "server_version": server_version},
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}
        | {
            "queue": resolve_queue(config.queue),
            "model_dir": str(model_dir) if model_dir else None,
        },
        "worker": worker,
        **measured,
    }
    report["ratios"] = compute_ratios(report)
    report["goals"] = compute_goals(report)
    report["checks"] = checks(report)
    report["total_s"] = time.perf_counter() - started
    write_json(config.json_out, report)
    return report


def _redis_version(client: Client) -> str | None:
    try:
        info = client.redis.info("server")
    except Exception:  # an ACL may refuse INFO; the version is only a label
        return None
    version = info.get("redis_version") if isinstance(info, dict) else None
    return str(version) if version is not None else None


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    tmp.replace(path)


# -- command line --------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--embedded",
        action="store_true",
        help="start a private redis-server and a CPU worker (ignores REDIS_URL); "
        "trains a model first if --model-dir has none",
    )
    p.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="trained models (INFERENCE_MODEL_DIR, else 'models'); needed for the "
        "in-process reference and the spot check",
    )
    p.add_argument("--model-name", default=os.environ.get("INFERENCE_MODEL_NAME", "friedman1"))
    p.add_argument("--queue", default="cpu", help="cpu, gpu, or a queue name (default cpu)")
    p.add_argument("--processes", type=int, default=None, help="--embedded worker processes")
    p.add_argument("--quick", action="store_true", help="about 10x less of everything")
    p.add_argument("--single-jobs", type=int, default=None, help="sequential jobs per task (300)")
    p.add_argument("--sustained-jobs", type=int, default=None, help="jobs per task (3000)")
    p.add_argument("--window", type=int, default=None, help="single-row jobs in flight (256)")
    p.add_argument("--batch-jobs", type=int, default=None, help="batch jobs (20)")
    p.add_argument("--batch-rows", type=int, default=None, help="rows per batch job (5000)")
    p.add_argument("--bulk-rows", type=int, default=None, help="rows in the CSV file (1000000)")
    p.add_argument("--chunk-rows", type=int, default=None, help="bulk rows per chunk")
    p.add_argument("--in-flight", type=int, default=None, help="bulk chunks / batch jobs")
    p.add_argument("--inprocess-rows", type=int, default=None, help="in-process batch (65536)")
    p.add_argument("--json-out", type=Path, default=Path("out/bench.json"))
    p.add_argument("--work-dir", type=Path, default=None, help="worker log and bulk files")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker-loglevel", default="INFO", help="--embedded worker (as deployed)")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    sizes = QUICK if args.quick else FULL
    chosen: dict[str, Any] = {
        k: getattr(args, k) if getattr(args, k) is not None else v for k, v in sizes.items()
    }
    for key, value in chosen.items():
        if value < (0 if key in {"bulk_rows"} else 1):
            raise BenchError(f"--{key.replace('_', '-')} must be positive")
    names = {f.name for f in fields(BenchConfig)}
    rest: dict[str, Any] = {k: v for k, v in vars(args).items() if k in names and k not in chosen}
    return BenchConfig(**rest, **chosen)


def run_from_args(args: argparse.Namespace) -> int:
    """The `bench` subcommand: 0 when every check passed, 1 when one failed, 2-4 as the CLI."""

    def say(message: str) -> None:
        print(f"bench: {message}", file=sys.stderr, flush=True)

    try:
        config = config_from_args(args)
        if not config.embedded and not (
            os.environ.get("REDIS_URL") or os.environ.get("INFERENCE_REDIS_URL")
        ):
            raise BenchError("set REDIS_URL to a deployment's Redis, or pass --embedded")
        report = run_bench(config, say=say)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TimeoutError as exc:
        print(f"error: timeout: {exc}", file=sys.stderr)
        return 3
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 4
    print(format_report(report))
    print(f"\nJSON: {config.json_out}  ({report['total_s']:.1f} s in all)")
    return 0 if report["checks"]["passed"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m producer bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
