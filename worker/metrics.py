"""Prometheus metrics of one worker: counted by every process that serves jobs, served by the
worker's main process on INFERENCE_METRICS_PORT (nothing is counted when it is unset).

Why prometheus_client's multiprocess mode: a prefork worker serves jobs in several child
processes, and any child may die at any time (SIGKILL, the hard time limit, the OOM killer)
and be replaced. Each process writes its counts to a memory-mapped file of its own pid, in
a directory private to this worker that the main process creates before it forks, so a
count is in the file the moment it is made. A killed child's counts stay in its file and
go on being summed: they neither vanish nor double, since its replacement writes a file of
its own pid. Aggregating in the main process instead (children reporting over a pipe or
Redis) would lose whatever a killed child counted since its last report. Gauges (model
info, load and warm-up time) count for live processes only: at each scrape the main
process drops the gauge files of pids that are gone. The directory is removed when the
worker stops; counters start from zero at the next start, which Prometheus reads as a reset.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from contract.metrics import (
    ABS_DIFF_BUCKETS,
    BATCH_SIZE_BUCKETS,
    COMPUTE_SECONDS,
    JOBS_TOTAL,
    LANE_BATCH_SIZE,
    LATENCY_BUCKETS,
    MODEL_INFO,
    MODEL_LOAD_SECONDS,
    MODEL_WARMUP_SECONDS,
    QUEUE_WAIT_SECONDS,
    ROWS_TOTAL,
    SERVING_DECISIONS_TOTAL,
    SHADOW_ABS_DIFF,
    SHADOW_ROWS_TOTAL,
    SHADOW_SKIPPED_ROWS_TOTAL,
    TASK_SECONDS,
)

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""Where prometheus_client keeps the per-process files; children inherit it across fork."""


def prepare_directory(hostname: str) -> str:
    """A fresh directory for this worker's files, set for this process and its children.
    Called in the main process before the pool forks."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in hostname)
    path = tempfile.mkdtemp(prefix=f"inference-metrics-{safe}-")
    os.environ[MULTIPROC_ENV] = path
    _multiprocess_values()
    return path


def remove_directory(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _multiprocess_values() -> None:
    # prometheus_client picks its value class when first imported, from the environment:
    # should anything have imported it before the directory was set, switch it now (every
    # metric of this module is created after this point).
    from prometheus_client import values

    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()


def observe_many(histogram: Any, amounts: Iterable[float], times: int = 1) -> None:
    """Observe each of `amounts` (`times` times each) with one write per bucket touched,
    instead of one per observation: a lane batch of hundreds of jobs costs a few writes.
    Falls back to observe() should prometheus_client's histogram layout change."""
    buckets = getattr(histogram, "_buckets", None)
    bounds = getattr(histogram, "_upper_bounds", None)
    total = getattr(histogram, "_sum", None)
    if buckets is None or bounds is None or total is None:
        for amount in amounts:
            for _ in range(times):
                histogram.observe(amount)
        return
    counts = [0] * len(bounds)
    added = 0.0
    for amount in amounts:
        # The first bucket whose bound is >= amount, as Histogram.observe picks it.
        counts[bisect.bisect_left(bounds, amount)] += times
        added += amount * times
    if not any(counts):
        return
    total.inc(added)
    for i, n in enumerate(counts):
        if n:
            buckets[i].inc(n)


class Recorder:
    """This process's metrics, labelled with the model version that served each job; jobs
    no version served (refused, revoked, failed before one was chosen) are labelled with the
    version serving by default (the champion), which follows hot swaps (serve())."""

    def __init__(self, model: str, version: str, device: str) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.model = (model, version, device)
        self._children: dict[tuple[Any, ...], Any] = {}
        self.jobs = Counter(
            JOBS_TOTAL,
            "Jobs ended, by outcome (success, failure, revoked, refused).",
            ["queue", "task", "model", "version", "device", "outcome"],
            registry=None,
        )
        self.rows = Counter(
            ROWS_TOTAL,
            "Rows of the jobs ended, by outcome.",
            ["queue", "model", "version", "device", "outcome"],
            registry=None,
        )
        self.queue_wait = Histogram(
            QUEUE_WAIT_SECONDS,
            "Seconds from the producer's enqueue to the job's start.",
            ["queue"],
            buckets=LATENCY_BUCKETS,
            registry=None,
        )
        self.compute = Histogram(
            COMPUTE_SECONDS,
            "Seconds of one model run (a lane batch of rows, or a batch job).",
            ["queue", "model", "version", "device"],
            buckets=LATENCY_BUCKETS,
            registry=None,
        )
        self.task = Histogram(
            TASK_SECONDS,
            "Seconds of a whole job in the worker, from its receipt to its result written.",
            ["queue", "task"],
            buckets=LATENCY_BUCKETS,
            registry=None,
        )
        self.lane_batch = Histogram(
            LANE_BATCH_SIZE,
            "Jobs taken in one row-lane batch.",
            ["queue"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=None,
        )
        shadow = ["model", "version", "challenger", "device"]
        self.shadow_rows = Counter(
            SHADOW_ROWS_TOTAL, "Rows the challenger also ran on in shadow.", shadow, registry=None
        )
        self.shadow_skips = Counter(
            SHADOW_SKIPPED_ROWS_TOTAL,
            "Rows left without their shadow run, by reason (share, queue_full, error).",
            [*shadow, "reason"],
            registry=None,
        )
        self.shadow_diff = Histogram(
            SHADOW_ABS_DIFF,
            "|challenger - champion| per shadowed row.",
            shadow,
            buckets=ABS_DIFF_BUCKETS,
            registry=None,
        )
        # The largest among live processes: each child loads the same model.
        self.load_s = Gauge(
            MODEL_LOAD_SECONDS,
            "Seconds the last model load took.",
            ["model", "version", "device"],
            registry=None,
            multiprocess_mode="livemax",
        )
        self.warmup_s = Gauge(
            MODEL_WARMUP_SECONDS,
            "Seconds the last model warm-up took.",
            ["model", "version", "device"],
            registry=None,
            multiprocess_mode="livemax",
        )
        self.info = Gauge(
            MODEL_INFO,
            "1 for each model a worker has loaded.",
            ["model", "version", "device", "provider", "hostname"],
            registry=None,
            multiprocess_mode="livemax",
        )

        self.decisions = Counter(
            SERVING_DECISIONS_TOTAL,
            "Serving decisions applied, or refused because a version failed a check.",
            ["model", "outcome"],
            registry=None,
        )

    def _child(self, metric: Any, *labels: str) -> Any:
        # prometheus_client's labels() validates and locks on every call; a lane batch
        # touches the same few children each time.
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def _labels(self, version: str | None) -> tuple[str, str, str]:
        if version is None or version == self.model[1]:
            return self.model
        return (self.model[0], version, self.model[2])

    def serve(self, version: str) -> None:
        """`version` now serves by default (a hot swap moved the champion)."""
        if version != self.model[1]:
            self.model = (self.model[0], version, self.model[2])

    def ended(
        self,
        queue: str,
        task: str,
        outcome: str,
        jobs: int = 1,
        rows: int = 0,
        version: str | None = None,
    ) -> None:
        labels = self._labels(version)
        if jobs:
            self._child(self.jobs, queue, task, *labels, outcome).inc(jobs)
        if rows:
            self._child(self.rows, queue, *labels, outcome).inc(rows)

    def waited(self, queue: str, seconds: Sequence[float]) -> None:
        if seconds:
            observe_many(self._child(self.queue_wait, queue), seconds)

    def computed(self, queue: str, seconds: float, version: str | None = None) -> None:
        self._child(self.compute, queue, *self._labels(version)).observe(seconds)

    def took(self, queue: str, task: str, seconds: float, jobs: int = 1) -> None:
        if jobs:
            observe_many(self._child(self.task, queue, task), [seconds], times=jobs)

    def batch(self, queue: str, size: int) -> None:
        self._child(self.lane_batch, queue).observe(size)

    def shadowed(self, version: str, challenger: str, diffs: Sequence[float]) -> None:
        """Rows served by `version` that `challenger` ran on in shadow: their |difference|."""
        if len(diffs):
            model, _, device = self.model
            self._child(self.shadow_rows, model, version, challenger, device).inc(len(diffs))
            observe_many(self._child(self.shadow_diff, model, version, challenger, device), diffs)

    def shadow_skipped(self, version: str, challenger: str, reason: str, rows: int) -> None:
        model, _, device = self.model
        if rows:
            self._child(self.shadow_skips, model, version, challenger, device, reason).inc(rows)

    def loaded(
        self, version: str, provider: str, hostname: str, load_s: float, warmup_s: float
    ) -> None:
        """`version` is loaded in this process (at start, or beside the serving one)."""
        labels = self._labels(version)
        self.load_s.labels(*labels).set(load_s)
        self.warmup_s.labels(*labels).set(warmup_s)
        self.info.labels(*labels, provider, hostname).set(1)

    def decided(self, outcome: str) -> None:
        """A serving decision was applied, or refused (DECISION_OUTCOMES)."""
        self._child(self.decisions, self.model[0], outcome).inc()

    def unloaded(self, version: str, provider: str, hostname: str) -> None:
        """`version` is no longer held by this process. A multiprocess gauge keeps its value
        in this process's file, so it is set to 0 rather than removed: the collector leaves
        the model's series out once no live process holds it (_WorkerCollector)."""
        labels = self._labels(version)
        self.info.labels(*labels, provider, hostname).set(0)
        self.load_s.labels(*labels).set(0)
        self.warmup_s.labels(*labels).set(0)


_recorder: Recorder | None = None


def current() -> Recorder | None:
    """This process's recorder; None when metrics are off."""
    return _recorder


def start_recording(model: str, version: str, device: str) -> Recorder | None:
    """The recorder of this process, created once the worker's directory is set (it is
    inherited from the main process); None, and nothing counted, when metrics are off."""
    global _recorder
    if os.environ.get(MULTIPROC_ENV) is None:
        return None
    if _recorder is None or _recorder.model != (model, version, device):
        _multiprocess_values()
        _recorder = Recorder(model, version, device)
    return _recorder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def drop_dead_gauges(path: str) -> list[int]:
    """Remove the live-gauge files of processes that are gone; the pids removed."""
    from prometheus_client import multiprocess

    dead = set()
    for name in os.listdir(path):
        if name.startswith("gauge_live") and name.endswith(".db"):
            tail = name[: -len(".db")].rsplit("_", 1)[-1]
            if tail.isdigit() and not _alive(int(tail)):
                dead.add(int(tail))
    for pid in dead:
        multiprocess.mark_process_dead(pid, path)
    return sorted(dead)


class _WorkerCollector:
    """Every process's files, summed, once the gauges of dead processes are dropped."""

    def __init__(self, path: str) -> None:
        from prometheus_client import multiprocess

        self.path = path
        self._files = multiprocess.MultiProcessCollector(None, path)

    def collect(self) -> Iterator[Any]:
        drop_dead_gauges(self.path)
        families = list(self._files.collect())
        held = {
            _model_labels(s.labels)
            for f in families
            if f.name == MODEL_INFO
            for s in f.samples
            if s.value > 0
        }
        for family in families:
            if family.name in _PER_MODEL:
                # A version every live process has let go of (a hot swap, an evicted pin).
                family.samples = [s for s in family.samples if _model_labels(s.labels) in held]
            yield family


_PER_MODEL = (MODEL_INFO, MODEL_LOAD_SECONDS, MODEL_WARMUP_SECONDS)


def _model_labels(labels: dict[str, str]) -> tuple[str | None, ...]:
    return (labels.get("model"), labels.get("version"), labels.get("device"))


def registry_for(path: str) -> Any:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_WorkerCollector(path))
    return registry


def serve(path: str, port: int, addr: str) -> Any:
    """Serve this worker's metrics over HTTP (/metrics) from a thread of the calling process;
    the server, to shut it down."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=addr, registry=registry_for(path))
    log.info("metrics on http://%s:%d/metrics", addr, port)
    return server


def exposition(path: str) -> bytes:
    """The text a scrape gets, without a server (the tests, `inspect stats`)."""
    from prometheus_client import generate_latest

    return bytes(generate_latest(registry_for(path)))


def job_counts(path: str, queues: Iterable[str]) -> dict[str, int]:
    """Jobs ended per task on `queues`, all processes of this worker together (`inspect
    stats` counts the row lanes' jobs with them)."""
    wanted = set(queues)
    counts: dict[str, int] = {}
    with contextlib.suppress(FileNotFoundError):
        for family in registry_for(path).collect():
            if family.name != JOBS_TOTAL[: -len("_total")]:
                continue
            for sample in family.samples:
                if sample.name == JOBS_TOTAL and sample.labels["queue"] in wanted:
                    task = sample.labels["task"]
                    counts[task] = counts.get(task, 0) + int(sample.value)
    return counts
