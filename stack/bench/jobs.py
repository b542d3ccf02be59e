"""Jobs through the queue, measured from the producer: single-row round trips, sustained
single-row throughput (this product, plain Celery, the no-op), batch jobs."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from contract.names import TASK_NOOP, TASK_PREDICT, batch_bucket, result_key
from producer.client import Client, TaskStatus
from producer.settings import ProducerSettings
from stack.bench.config import latency_summary

WARMUP_JOBS = 10
"""Unmeasured round trips per task before the sequential ones: connections, imports and
the worker's first-message costs are not what a steady producer sees."""
SUSTAINED_ROUNDS = 3


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
        key = batch_bucket(size)
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
