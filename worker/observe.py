"""What each served job adds to the worker's metrics (worker.metrics) and, for the row lane,
to Celery's task events (worker.events): one place for both paths.

- The row lane (worker.lane.server) hands over each batch once its results are written.
- Celery's path is followed through Celery's signals: task_prerun / task_postrun in the
  process that runs the task; task_revoked, and task_failure for a job whose pool process
  passed the hard time limit, in the main process; the message checks in front of
  Celery's handler (worker.guards) count the messages they refuse.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from typing import Any, Protocol

from celery.signals import task_failure, task_postrun, task_prerun, task_revoked

from contract.errors import MessageTooLarge
from contract.metrics import FAILURE, OTHER_TASK, REFUSED, REVOKED, SUCCESS
from contract.names import HEADER_ENQUEUED_AT, TASK_EXPLAIN, TASK_PREDICT, TASK_PREDICT_BATCH
from worker import metrics
from worker.events import EventsSwitch, LaneEvents
from worker.service import Started, queue_wait_ms

log = logging.getLogger(__name__)

_ROW_TASKS = (TASK_PREDICT, TASK_PREDICT_BATCH)


class LaneJob(Protocol):
    """What the lane knows of a job once it is served (worker.lane.server._Job)."""

    task_id: str | None
    task: str
    headers: dict[str, Any]
    error: Any
    revoked: bool
    refused: bool
    result: dict[str, Any] | None


def outcome_of(job: LaneJob) -> str:
    if job.revoked:
        return REVOKED
    if job.refused:
        return REFUSED
    if job.error is not None or job.result is None:
        return FAILURE
    return SUCCESS


def rows_of(task: str, result: dict[str, Any] | None) -> int:
    """Rows of a job: one for a single row, a batch's from its result (0 when it failed:
    its rows were never read)."""
    if task == TASK_PREDICT:
        return 1
    if task in (TASK_PREDICT_BATCH, TASK_EXPLAIN) and isinstance(result, dict):
        return int(result.get("rows") or 0)
    return 0


def task_label(task: Any) -> str:
    return task if isinstance(task, str) and task.startswith("inference.") else OTHER_TASK


def version_of(result: dict[str, Any] | None) -> str | None:
    """The version that computed a result (None for a job no version served)."""
    version = result.get("model_version") if isinstance(result, dict) else None
    return version if isinstance(version, str) else None


def _inference_s(result: dict[str, Any] | None) -> float | None:
    latency = result.get("latency") if isinstance(result, dict) else None
    ms = latency.get("inference_ms") if isinstance(latency, dict) else None
    return ms / 1000.0 if isinstance(ms, int | float) else None


class LaneObserver:
    """Metrics and events of one row lane's jobs."""

    def __init__(
        self, queue: str, hostname: str, app: Any = None, switch: EventsSwitch | None = None
    ) -> None:
        self.queue = queue
        self.switch = switch
        self.events = LaneEvents(app, hostname) if app is not None and switch else None

    def served(self, jobs: Sequence[LaneJob], started: Started, taken: int = 0) -> None:
        """`jobs` served together from `started` on, their results now written; `taken`:
        the size of the lane batch they came in (0 for a batch job served on its own)."""
        try:
            self._count(jobs, started, taken)
            if self.events is not None and self.switch is not None and self.switch.on:
                self._send(jobs, started)
        except Exception:
            # Never let monitoring fail a batch whose results are written.
            log.exception("row lane: could not record %d job(s)", len(jobs))

    def _count(self, jobs: Sequence[LaneJob], started: Started, taken: int) -> None:
        rec = metrics.current()
        if rec is None:
            return
        elapsed = time.perf_counter() - started.perf
        ended: dict[tuple[str, str, str | None], list[int]] = {}
        waits = []
        # One model run per version in a batch: its inference time, by version.
        compute: dict[str | None, float] = {}
        wall = started.wall
        for job in jobs:
            task = task_label(job.task)
            outcome = outcome_of(job)
            version = version_of(job.result)
            tally = ended.get((task, outcome, version))
            if tally is None:
                tally = ended[(task, outcome, version)] = [0, 0]
            tally[0] += 1
            tally[1] += 1 if task == TASK_PREDICT else rows_of(task, job.result)
            enqueued = job.headers.get(HEADER_ENQUEUED_AT)
            # queue_wait_ms's checks, without its rounding: this runs for every job.
            if type(enqueued) is float and math.isfinite(enqueued):
                waits.append(max(0.0, wall - enqueued))
            elif enqueued is not None:
                wait = queue_wait_ms(enqueued, wall)
                if wait is not None:
                    waits.append(wait / 1000.0)
            if outcome == SUCCESS and version not in compute:
                seconds = _inference_s(job.result)
                if seconds is not None:
                    compute[version] = seconds
        for (task, outcome, version), (n, rows) in ended.items():
            rec.ended(self.queue, task, outcome, n, rows, version)
            rec.took(self.queue, task, elapsed, n)
        rec.waited(self.queue, waits)
        for version, seconds in compute.items():
            rec.computed(self.queue, seconds, version)
        if taken:
            rec.batch(self.queue, taken)

    def _send(self, jobs: Sequence[LaneJob], started: Started) -> None:
        assert self.events is not None
        now = time.time()
        for job in jobs:
            if job.task_id is None:
                continue
            self.events.job(
                job.task_id,
                job.task if isinstance(job.task, str) else OTHER_TASK,
                job.headers,
                started.wall,
                now,
                outcome_of(job),
                result=job.result,
                error=job.error,
            )
        self.events.flush()

    def close(self) -> None:
        if self.events is not None:
            self.events.close()


# -- Celery's path ---------------------------------------------------------------------------

_running: dict[str, float] = {}


def _queue_of(request: Any) -> str:
    info = getattr(request, "delivery_info", None) or {}
    return str(info.get("routing_key") or info.get("queue") or "")


def _prerun(task_id: str | None = None, **_: Any) -> None:
    if task_id is not None and metrics.current() is not None:
        _running[task_id] = time.perf_counter()


def _postrun(
    task_id: str | None = None,
    task: Any = None,
    retval: Any = None,
    state: str | None = None,
    **_: Any,
) -> None:
    began = _running.pop(task_id, None) if task_id is not None else None
    rec = metrics.current()
    if rec is None or task is None or state == "RETRY":
        return
    request = task.request
    queue = _queue_of(request)
    name = task_label(task.name)
    if state == "SUCCESS":
        outcome = SUCCESS
    elif isinstance(retval, MessageTooLarge):
        outcome = REFUSED
    else:
        outcome = FAILURE
    result = retval if outcome == SUCCESS else None
    version = version_of(result)
    rows = rows_of(name, result) if name in _ROW_TASKS else 0
    rec.ended(queue, name, outcome, 1, rows, version)
    if began is not None:
        rec.took(queue, name, time.perf_counter() - began)
    wait = queue_wait_ms(getattr(request, HEADER_ENQUEUED_AT, None), time.time())
    if wait is not None and began is not None:
        # The wait ended when the task began, not now.
        wait_s = max(0.0, wait / 1000.0 - (time.perf_counter() - began))
        rec.waited(queue, [wait_s])
    compute = _inference_s(result)
    if compute is not None:
        rec.computed(queue, compute, version)


def _revoked(sender: Any = None, request: Any = None, **_: Any) -> None:
    rec = metrics.current()
    if rec is None or request is None:
        return
    rec.ended(_queue_of(request), task_label(getattr(sender, "name", None)), REVOKED)


_pool_parent: int | None = None
"""The pid of a prefork worker's main process, which runs no task itself."""


def mark_pool_parent() -> None:
    """Called in a prefork worker's main process: a task_failure signal there is a job
    failed by the main process itself, never by a task run (those are counted by
    task_postrun in the pool process)."""
    global _pool_parent
    _pool_parent = os.getpid()


def _request_of(task_id: Any) -> Any:
    from celery.worker import state

    return next((r for r in list(state.active_requests) if r.id == task_id), None)


def _failed_by_parent(sender: Any = None, task_id: Any = None, **_: Any) -> None:
    """A job the main process failed: its pool process passed the hard time limit, or
    died with the job and it is not handed back (task_reject_on_worker_lost)."""
    rec = metrics.current()
    if rec is None or sender is None or os.getpid() != _pool_parent:
        return
    queue = _queue_of(sender.request) or _queue_of(_request_of(task_id))
    name = task_label(sender.name)
    rec.ended(queue, name, FAILURE, 1, 1 if name == TASK_PREDICT else 0)


def refused(message: Any, task: Any) -> None:
    """A message the checks in front of Celery's handler refused (worker.guards)."""
    rec = metrics.current()
    if rec is not None:
        info = getattr(message, "delivery_info", None) or {}
        rec.ended(str(info.get("routing_key") or ""), task_label(task), REFUSED)


def connect_celery_signals() -> None:
    task_prerun.connect(_prerun, weak=False)
    task_postrun.connect(_postrun, weak=False)
    task_revoked.connect(_revoked, weak=False)
    task_failure.connect(_failed_by_parent, weak=False)
