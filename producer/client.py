"""The producer client: enqueue jobs by task name, poll or wait for their results.

Results are read straight from the result backend with GET/MGET, not through
one pub/sub subscription per task, so collecting thousands of results never
stalls on a subscription backlog.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from pydantic import BaseModel

from contract.envelope import task_message
from contract.names import (
    HEADER_ENQUEUED_AT,
    HEALTH_REPORT_KEY,
    QUEUES,
    TASK_PREDICT,
    TASK_PREDICT_BATCH,
    model_info_key,
    queue_for,
    result_key,
)
from contract.schemas import BatchRequest, M, ModelInfo, PredictRequest, check_shape, parse_request
from producer import errors
from producer.connections import redis_client
from producer.recovery import LostJobFinder, SentJob, SentJobs
from producer.settings import ProducerSettings

log = logging.getLogger(__name__)

READY_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})


class TaskError(BaseModel):
    type: str
    message: str
    retryable: bool


class TaskStatus(BaseModel):
    task_id: str
    state: str
    """PENDING (unknown or waiting), STARTED, RETRY, SUCCESS, FAILURE or REVOKED."""
    result: dict[str, Any] | None = None
    error: TaskError | None = None

    @property
    def ready(self) -> bool:
        return self.state in READY_STATES


def resolve_queue(queue: str) -> str:
    """'cpu' / 'gpu' or a full queue name."""
    return QUEUES.get(queue, queue)


def error_from_meta(result: Any) -> TaskError:
    if isinstance(result, dict) and "exc_type" in result:
        exc_type = str(result["exc_type"])
        message = result.get("exc_message")
        if isinstance(message, list | tuple):
            message = " ".join(str(m) for m in message)
        cls = getattr(errors, exc_type, None)
        retryable = (
            isinstance(cls, type) and issubclass(cls, errors.InferenceError) and cls.retryable
        )
        return TaskError(type=exc_type, message=str(message), retryable=bool(retryable))
    return TaskError(type="TaskFailed", message=str(result), retryable=False)


def status_from_meta(task_id: str, raw: bytes | str | None) -> TaskStatus:
    if raw is None:
        return TaskStatus(task_id=task_id, state="PENDING")
    meta = json.loads(raw)
    state = str(meta.get("status", "PENDING"))
    if state == "SUCCESS":
        return TaskStatus(task_id=task_id, state=state, result=meta.get("result"))
    if state in {"FAILURE", "REVOKED", "RETRY"}:
        return TaskStatus(task_id=task_id, state=state, error=error_from_meta(meta.get("result")))
    return TaskStatus(task_id=task_id, state=state)


def raise_for(status: TaskStatus) -> dict[str, Any]:
    """The result of a finished task, or its error raised as the matching exception."""
    if status.state == "SUCCESS" and status.result is not None:
        return status.result
    err = status.error or TaskError(type="TaskFailed", message=status.state, retryable=False)
    cls = getattr(errors, err.type, None)
    if isinstance(cls, type) and issubclass(cls, errors.InferenceError):
        raise cls(err.message)
    raise errors.TaskFailed(f"{err.type}: {err.message}")


class Client:
    def __init__(self, settings: ProducerSettings | None = None) -> None:
        self.settings = settings or ProducerSettings()
        # Messages are built here (contract.envelope) and pushed with LPUSH: no Celery app,
        # whose send_task costs ~0.8 ms of CPU a message, and whose Redis result backend
        # would subscribe to a pub/sub channel for every task sent. Results are read with
        # GET/MGET. Both clients retry through a Redis restart (redis_client).
        self.redis = redis_client(self.settings.backend, self.settings)
        self.broker = redis_client(self.settings.broker, self.settings)
        self._model_info: dict[str, ModelInfo | None] = {}
        self._sent = SentJobs(self.settings.track_sent_jobs)
        self._lost = LostJobFinder(self.broker)

    def close(self) -> None:
        self.redis.close()
        self.broker.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- model facts, for validating before enqueueing -------------------------------------

    def model_info(self, queue: str = "cpu", refresh: bool = False) -> ModelInfo | None:
        """What the workers of `queue` serve (they publish it at start), or None if none of
        them ever started."""
        name = resolve_queue(queue)
        if self._model_info.get(name) is None or refresh:
            raw = self.redis.get(model_info_key(name))
            self._model_info[name] = None if raw is None else ModelInfo.model_validate_json(raw)
        return self._model_info[name]

    def validate_rows(self, rows: list[list[float]], queue: str = "cpu") -> None:
        info = self.model_info(queue)
        if info is not None:
            check_shape(rows, info.n_features, info.max_batch_rows)

    # -- enqueue ---------------------------------------------------------------------------

    def send(
        self, task: str, kwargs: dict[str, Any], queue: str = "cpu", task_id: str | None = None
    ) -> str:
        """Enqueue already-validated kwargs; returns the task id. `queue` names the workers
        ("cpu", "gpu" or a queue name); single-row jobs go to its row queue."""
        return self.send_many(task, [kwargs], queue, [task_id])[0]

    def send_many(
        self,
        task: str,
        kwargs_list: Sequence[dict[str, Any]],
        queue: str = "cpu",
        task_ids: Sequence[str | None] | None = None,
    ) -> list[str]:
        """Enqueue many jobs of one task in one round trip; their ids, in order."""
        target = queue_for(task, resolve_queue(queue))
        now = time.time()
        headers = {HEADER_ENQUEUED_AT: now}
        ids = task_ids or [None] * len(kwargs_list)
        messages = [
            task_message(task, kwargs, target, task_id, headers)
            for kwargs, task_id in zip(kwargs_list, ids, strict=True)
        ]
        if not messages:
            return []
        # LPUSH takes many values at once; the worker pops from the other end, in order.
        self.broker.lpush(target, *(text for _, text in messages))
        for (task_id, _), kwargs in zip(messages, kwargs_list, strict=True):
            self._sent.add(task_id, SentJob(task, kwargs, target, now))
        return [task_id for task_id, _ in messages]

    def resend_lost(self, pending: list[str]) -> list[str]:
        """Send again, under the same ids, the pending jobs Redis no longer holds anywhere."""
        lost = self._lost.lost(pending, self._sent)
        for task_id in lost:
            job = self._sent.get(task_id)
            if job is not None:
                log.warning(
                    "job %s is in no queue and held by no worker: sending it again", task_id
                )
                self.send(job.task, job.kwargs, job.queue, task_id=task_id)
        return lost

    def _parse(self, model: type[M], kwargs: dict[str, Any], queue: str) -> M:
        """The worker's own validation: shape first (when the model is known), then values."""
        info = self.model_info(queue)
        if info is None:
            return parse_request(model, (), kwargs)
        return parse_request(
            model, (), kwargs, n_features=info.n_features, max_rows=info.max_batch_rows
        )

    def submit(self, features: Sequence[float], queue: str = "cpu") -> str:
        request = self._parse(PredictRequest, {"features": list(features)}, queue)
        return self.send(TASK_PREDICT, request.model_dump(), queue)

    def submit_many(self, rows: Sequence[Sequence[float]], queue: str = "cpu") -> list[str]:
        """One single-row job per row, enqueued in one round trip; their ids, in order."""
        requests = [self._parse(PredictRequest, {"features": list(r)}, queue) for r in rows]
        return self.send_many(TASK_PREDICT, [r.model_dump() for r in requests], queue)

    def submit_batch(self, rows: Sequence[Sequence[float]], queue: str = "cpu") -> str:
        request = self._parse(BatchRequest, {"rows": [list(r) for r in rows]}, queue)
        return self.send(TASK_PREDICT_BATCH, request.model_dump(), queue)

    # -- results ---------------------------------------------------------------------------

    def _key(self, task_id: str) -> str:
        return result_key(task_id)

    def status(self, task_id: str) -> TaskStatus:
        return status_from_meta(task_id, self.redis.get(self._key(task_id)))

    def statuses(self, task_ids: Sequence[str]) -> list[TaskStatus]:
        if not task_ids:
            return []
        raws = self.redis.mget([self._key(t) for t in task_ids])
        return [status_from_meta(t, raw) for t, raw in zip(task_ids, raws, strict=True)]

    def wait(self, task_id: str, timeout: float | None = None) -> dict[str, Any]:
        """The task's result; its error raised as an exception; TimeoutError past `timeout`."""
        for status in self.iter_finished([task_id], timeout):
            return raise_for(status)
        raise AssertionError("unreachable")  # pragma: no cover

    def iter_finished(
        self, task_ids: Iterable[str], timeout: float | None = None
    ) -> Iterator[TaskStatus]:
        """Yield each task's final status as it finishes."""
        pending = list(dict.fromkeys(task_ids))
        while pending:
            done = self.wait_any(pending, timeout)
            finished = {s.task_id for s in done}
            pending = [t for t in pending if t not in finished]
            yield from done

    def wait_any(self, task_ids: Sequence[str], timeout: float | None = None) -> list[TaskStatus]:
        """The final statuses of those tasks that are finished, once at least one is;
        polls with MGET, backing off from 0.5 ms to 20 ms."""
        limit = self.settings.wait_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + limit
        delay = 0.0005
        next_check = time.monotonic() + self.settings.lost_check_s
        while True:
            statuses = self.statuses(task_ids)
            done = [s for s in statuses if s.ready]
            for status in done:
                self._sent.forget(status.task_id)
            if done or not task_ids:
                return done
            now = time.monotonic()
            if now >= next_check:
                next_check = now + self.settings.lost_check_s
                self.resend_lost([s.task_id for s in statuses if s.state == "PENDING"])
            if now > deadline:
                raise TimeoutError(
                    f"{len(task_ids)} task(s) not finished after {limit:g}s "
                    f"(first: {task_ids[0]}); are workers consuming the queue?"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.02)

    # -- health ----------------------------------------------------------------------------

    def health(self) -> dict[str, Any] | None:
        raw = self.redis.get(HEALTH_REPORT_KEY)
        return None if raw is None else json.loads(raw)
