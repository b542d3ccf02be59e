"""The row lane's server: a thread in each worker process that takes jobs off <queue>.rows
many at a time, predicts the single-row ones together and runs each batch job on its own.

Celery spends about a millisecond of CPU on every message (receive, a Request, the pool
hand-off, an acknowledgement, a result write, each its own Redis round trip), while one
row costs the model ~20 us. Here the process that holds the model takes up to
`row_batch_max` messages in one Redis call (worker.lane.transport), predicts the single
rows with one onnxruntime call and writes their results and acknowledgements in one
pipeline. Each job stays its own Celery task: same task name, same message, its own result
document (worker.results), so a producer polls it, or waits with AsyncResult.get(), as before.

Batch jobs (inference.predict_batch) sent here skip Celery's consumer too: the bulk scorer
sends its chunks here, where a 20,000-row chunk costs no Celery message handling in the
worker's main process nor its pool hand-off (~7 ms a chunk). They run the same code as on
Celery's path (worker.service), without Celery's time limits, after the single rows taken
with them have their results: a row never waits for a batch. Explain jobs (inference.explain)
taken together are explained in one pass (worker.service.explain_many), single rows and
batches alike.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis

from contract.envelope import read_task_message
from contract.errors import (
    InferenceError,
    InvalidInput,
    MessageRefused,
    MessageTooLarge,
    TaskFailed,
)
from contract.names import (
    HEADER_ENQUEUED_AT,
    HEADER_MODEL_VERSION,
    HEADER_ROUTING_KEY,
    TASK_EXPLAIN,
    TASK_PREDICT,
    TASK_PREDICT_BATCH,
)
from contract.schemas import PredictRequest
from worker import results, service
from worker.lane.transport import RowTransport, task_id_in_ends, task_name_in_ends
from worker.messages import body_problem, envelope_problem
from worker.model import LoadedModel
from worker.observe import LaneObserver
from worker.runtime import Runtime

log = logging.getLogger(__name__)


# Jobs served after the single rows taken with them: predict_batch jobs one by one,
# explain jobs (an explanation costs ~1 ms a row against the model's ~20 us) all together.
_ON_ITS_OWN = (TASK_PREDICT_BATCH, TASK_EXPLAIN)


@dataclass(eq=False)
class _Job:
    tag: str
    task_id: str | None
    headers: dict[str, Any]
    features: list[float] | None = None
    batch: tuple[tuple[Any, ...], dict[str, Any]] | None = None
    """args and kwargs of an inference.predict_batch or inference.explain job."""
    error: InferenceError | None = None
    revoked: bool = False
    task: str = ""
    refused: bool = False
    """Its message was refused before it was read as a job."""
    result: dict[str, Any] | None = None
    model: LoadedModel | None = None
    """The version that serves a single-row job (worker.serving), and its arm."""
    arm: str | None = None
    challenger: LoadedModel | None = None
    """The challenger that runs on its row in shadow, if any (chosen with its version)."""


def _by_version(rows: list[_Job]) -> list[list[_Job]]:
    """Rows grouped by the version (and arm) that serves them: one model call a group."""
    groups: dict[tuple[int, str | None], list[_Job]] = {}
    for job in rows:
        groups.setdefault((id(job.model), job.arm), []).append(job)
    return list(groups.values())


def _bare(exc: InferenceError) -> InferenceError:
    # Kept without its traceback: its frames hold the job that holds it, a cycle that only a
    # full garbage collection would free (a pool process's RSS grew ~30 MB over a few
    # thousand bad jobs).
    exc = exc.with_traceback(None)
    exc.__context__ = None
    return exc


class RowLane:
    """Takes batches of jobs off one queue until stopped. One per queue and process."""

    def __init__(
        self,
        rt: Runtime,
        backend: Any,
        queue: str,
        hostname: str,
        on_batch: Callable[[int], None] | None = None,
        observer: LaneObserver | None = None,
    ) -> None:
        self.rt = rt
        self.backend = backend
        self.queue = queue
        self.hostname = hostname
        self.max_batch = rt.settings.row_batch_max
        self.wait_s = rt.settings.row_batch_wait_ms / 1000.0
        self.transport = RowTransport(rt.settings, queue)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="inference-row-lane", daemon=True)
        self._on_batch = on_batch or rt.stats.batch
        self.observer = observer or LaneObserver(queue, hostname)

    # -- life ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        log.info(
            "row lane on %s: batches of up to %d, waiting up to %g ms to fill one",
            self.queue,
            self.max_batch,
            self.wait_s * 1000,
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the batch in hand (its results written, its messages acknowledged), then
        stop taking more."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.transport.close()
        self.observer.close()

    def _run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            taken: list[tuple[str, bytes]] = []
            try:
                taken = self.take()
                if not taken:
                    self.transport.wait_for_work()
                    continue
                self.serve(taken)
                backoff = 0.1
            except redis.RedisError as exc:
                log.warning("row lane: Redis error, retrying in %.1fs: %s", backoff, exc)
                self.transport.renew_holder()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception as exc:
                # Never let one bad batch end the lane, nor leave its producers waiting.
                log.exception("row lane: unexpected error serving %d job(s)", len(taken))
                self.fail_all(taken, exc)

    def fail_all(self, taken: list[tuple[str, bytes]], exc: Exception) -> None:
        """A FAILURE for every job of a batch the lane could not serve (a bug, not the
        jobs' fault: TaskFailed), then their acknowledgement. Should even that fail, they
        stay held, and come back to the queue after the visibility timeout."""
        error = TaskFailed(f"the worker could not serve this job: {exc!r}")
        docs = results.Documents(self.backend)
        writes = []
        for _, raw in taken:
            try:
                task_id = read_task_message(raw).task_id
            except MessageRefused:
                continue
            if isinstance(task_id, str) and envelope_problem({"id": task_id}) is None:
                writes.append(docs.failure(task_id, error))
        try:
            self.transport.finish(writes, [tag for tag, _ in taken if tag])
        except Exception:
            log.exception("row lane: could not fail the batch either; it stays held")

    # -- one batch -------------------------------------------------------------------------

    def take(self) -> list[tuple[str, bytes]]:
        """Up to max_batch messages, each recorded as held; waits up to row_batch_wait_ms
        for more once there is one."""
        taken = self.transport.take(self.max_batch)
        if taken and self.wait_s > 0 and len(taken) < self.max_batch:
            deadline = time.monotonic() + self.wait_s
            while len(taken) < self.max_batch and time.monotonic() < deadline:
                more = self.transport.take(self.max_batch - len(taken))
                if more:
                    taken.extend(more)
                else:
                    time.sleep(min(0.0005, max(0.0, deadline - time.monotonic())))
        return taken

    def serve(self, taken: list[tuple[str, bytes]]) -> None:
        """Every job of one take, in two writes: first the single rows' results with every
        job that needs no model run (refused, revoked), then each batch job's."""
        started = service.Started.now()
        docs = results.Documents(self.backend)
        jobs = [self._read(tag, raw) for tag, raw in taken]
        rows = [j for j in jobs if j.error is None and not j.revoked and j.batch is None]
        batches = [j for j in jobs if j.error is None and not j.revoked and j.batch is not None]
        writes: list[tuple[str, str]] = []
        shadowed: list[_Job] = []
        for group in _by_version(rows):
            outcomes = service.predict_rows(
                self.rt,
                [j.features or [] for j in group],
                [j.headers.get(HEADER_ENQUEUED_AT) for j in group],
                self.hostname,
                started,
                group[0].model,
                group[0].arm,
            )
            for job, outcome in zip(group, outcomes, strict=True):
                assert job.task_id is not None  # a job without an id is refused in _read
                if isinstance(outcome, InferenceError):
                    job.error = _bare(outcome)
                else:
                    job.result = outcome
                    writes.append(docs.success(job.task_id, outcome))
                    if job.challenger is not None:
                        shadowed.append(job)
        for job in jobs:
            if job.error is not None and job.features is None:
                self.rt.stats.failed()  # refused unread; predict_rows counted the rest
            if job.task_id is None:
                continue
            if job.revoked:
                writes.append(docs.revoked(job.task_id))
            elif job.error is not None:
                writes.append(docs.failure(job.task_id, job.error))
        # Batch jobs stay held until their own results are written.
        self.transport.finish(writes, [j.tag for j in jobs if j.tag and j.batch is None])
        served = sum(1 for j in rows if j.error is None)
        if served:
            self._on_batch(served)
        self.observer.served([j for j in jobs if j.batch is None], started, len(jobs))
        # After the results are written, and only queued: the shadow runs never delay them.
        self._shadow(shadowed)
        explains = [j for j in batches if j.task == TASK_EXPLAIN]
        if explains:
            begun = service.Started.now()
            self._serve_explains(explains)
            self.observer.served(explains, begun)
        for job in batches:
            if job.task == TASK_EXPLAIN:
                continue
            begun = service.Started.now()
            done = self._serve_batch(job, results.Documents(self.backend))
            self.transport.finish([done], [job.tag] if job.tag else [])
            self.observer.served([job], begun)

    def _shadow(self, jobs: list[_Job]) -> None:
        """Rows grouped by champion and challenger (a swap within the take may split them)."""
        groups: dict[tuple[int, int], list[_Job]] = {}
        for job in jobs:
            groups.setdefault((id(job.model), id(job.challenger)), []).append(job)
        for group in groups.values():
            first = group[0]
            assert first.model is not None
            service.shadow(
                self.rt,
                np.asarray([j.features or [] for j in group], dtype=np.float32),
                np.asarray([(j.result or {})["prediction"] for j in group], dtype=np.float64),
                first.model,
                first.challenger,
            )

    def _serve_explains(self, jobs: list[_Job]) -> None:
        """The explain jobs of one take, explained together, their results in one write."""
        docs = results.Documents(self.backend)
        requests = []
        for job in jobs:
            assert job.batch is not None
            args, kwargs = job.batch
            job.batch = (args, {})  # the rows are not kept beyond their job
            requests.append(self._service_job(job, args, kwargs))
        writes = []
        for job, outcome in zip(jobs, service.explain_many(self.rt, requests), strict=True):
            assert job.task_id is not None
            if isinstance(outcome, InferenceError):
                job.error = _bare(outcome)
                writes.append(docs.failure(job.task_id, job.error))
            else:
                job.result = outcome
                writes.append(docs.success(job.task_id, outcome))
        self.transport.finish(writes, [j.tag for j in jobs if j.tag])

    def _service_job(self, job: _Job, args: tuple[Any, ...], kwargs: dict[str, Any]) -> service.Job:
        """A batch or explain job as worker.service takes it: its version is chosen there,
        from its kwargs or headers, by the same rules as on Celery's path."""
        headers = job.headers
        return service.Job(
            args,
            kwargs,
            headers.get(HEADER_ENQUEUED_AT),
            self.hostname,
            job.task_id or "",
            headers.get(HEADER_MODEL_VERSION),
            headers.get(HEADER_ROUTING_KEY),
        )

    def _serve_batch(self, job: _Job, docs: results.Documents) -> tuple[str, str]:
        assert job.batch is not None and job.task_id is not None
        args, kwargs = job.batch
        job.batch = (args, {})  # the rows are not kept beyond their job
        try:
            result = service.predict_batch(self.rt, self._service_job(job, args, kwargs))
        except InferenceError as exc:
            job.error = _bare(exc)
            return docs.failure(job.task_id, job.error)
        job.result = result
        return docs.success(job.task_id, result)

    def _read(self, tag: str, raw: bytes) -> _Job:
        # An empty tag: the take script did not register the message (not a kombu message):
        # it is served all the same, with nothing to acknowledge, and is lost only if this
        # process dies within the batch.
        limit = self.rt.settings.max_message_bytes
        row_limit = self.rt.settings.max_row_message_bytes
        # A single row's message is far smaller than a batch's: refused unread.
        if row_limit < len(raw) <= limit and task_name_in_ends(raw) == TASK_PREDICT:
            limit = row_limit
        if len(raw) > limit:
            task_id = task_id_in_ends(raw)
            if task_id is None:
                log.error("row lane: dropped a message of %d bytes on %s", len(raw), self.queue)
            error = MessageTooLarge(f"message of {len(raw)} bytes exceeds the maximum of {limit}")
            return _Job(tag, task_id, {}, error=error, refused=True)
        try:
            message = read_task_message(raw)
        except MessageRefused as exc:
            return self._refused(tag, exc.headers, str(exc))
        problem = envelope_problem(message.headers) or body_problem(message.body)
        if problem is None and message.task not in (TASK_PREDICT, *_ON_ITS_OWN):
            problem = (
                f"queue {self.queue} takes {TASK_PREDICT}, {TASK_PREDICT_BATCH} and "
                f"{TASK_EXPLAIN} jobs only, not {message.task!r}"
            )
        if problem is None and message.headers.get("eta") is not None:
            problem = f"a delayed job (eta) is not accepted on {self.queue}"
        if problem is not None:
            return self._refused(tag, message.headers, problem)
        if results.expired(message.headers.get("expires")):
            # As Celery does: the job is not run, and its state says why.
            return _Job(tag, message.task_id, message.headers, revoked=True, task=message.task)
        job = _Job(tag, message.task_id, message.headers, task=message.task)
        args, kwargs, _ = message.body
        if message.task in _ON_ITS_OWN:
            # Served on its own, by the same code as Celery's path (worker.service).
            job.batch = (tuple(args), kwargs)
            job.task = message.task
            return job
        try:
            request = service.parse(self.rt, PredictRequest, tuple(args), kwargs)
            job.model, job.arm, job.challenger = service.choose(
                self.rt,
                request.model_version or message.headers.get(HEADER_MODEL_VERSION),
                request.routing_key or message.headers.get(HEADER_ROUTING_KEY),
                message.task_id or tag,
            )
            # Only once a version serves it: a job without features is counted failed here.
            job.features = request.features
        except InferenceError as exc:
            job.error = _bare(exc)
        return job

    def _refused(self, tag: str, headers: dict[str, Any], reason: str) -> _Job:
        task_id = headers.get("id")
        if envelope_problem({"id": task_id}) is not None:
            log.error("row lane: dropped a message on %s: %s", self.queue, reason)
            task_id = None
        task = headers.get("task")
        return _Job(
            tag, task_id, headers, error=InvalidInput(reason), refused=True,
            task=task if isinstance(task, str) else "",
        )  # fmt: skip
