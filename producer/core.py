"""What the sync and the asyncio client share, free of I/O: validation, message building,
the queue-depth limit, result documents read as statuses, polling and lost-job repair.

producer.client.Client and producer.aio.AsyncClient each do only their own I/O around it,
so both validate, enqueue and report errors the same way.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from contract.envelope import task_message
from contract.errors import QueueFull
from contract.names import HEADER_ENQUEUED_AT, QUEUES, queue_for, result_key
from contract.schemas import M, ModelInfo, parse_request
from producer import errors
from producer.recovery import LostJobFinder, SentJob, SentJobs
from producer.settings import ProducerSettings

READY_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})

# LPUSH of ARGV onto KEYS[1] unless the list would then hold more than ARGV[1] messages:
# the check and the push are one step, so producers racing each other cannot overshoot.
# Returns the new length, or -(the length found) when it refused.
LIMITED_PUSH = """
local depth = redis.call('LLEN', KEYS[1])
if depth + #ARGV - 1 > tonumber(ARGV[1]) then return -depth end
return redis.call('LPUSH', KEYS[1], unpack(ARGV, 2))
"""


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
        args = result.get("exc_message") or []
        message = args[0] if isinstance(args, list) and args else str(args)
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
    state = meta.get("status", "PENDING")
    if state == "SUCCESS":
        return TaskStatus(task_id=task_id, state=state, result=meta.get("result"))
    if state in ("FAILURE", "REVOKED"):
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


def parse(model: type[M], kwargs: dict[str, Any], info: ModelInfo | None) -> M:
    """The worker's own validation: shape first (when the model is known), then values."""
    if info is None:
        return parse_request(model, (), kwargs)
    return parse_request(
        model, (), kwargs, n_features=info.n_features, max_rows=info.max_batch_rows
    )


def routed(
    kwargs: dict[str, Any], model_version: str | None, routing_key: str | None
) -> dict[str, Any]:
    """`kwargs` plus a version pin and a routing key, those that are set."""
    extra = {"model_version": model_version, "routing_key": routing_key}
    return {**kwargs, **{k: v for k, v in extra.items() if v is not None}}


@dataclass
class Batch:
    """Messages of one task bound for one queue, built and not yet pushed."""

    task: str
    target: str
    kwargs: Sequence[dict[str, Any]]
    messages: list[tuple[str, str]]
    sent_at: float

    def extend(self, other: Batch) -> None:
        self.kwargs = [*self.kwargs, *other.kwargs]
        self.messages += other.messages

    @property
    def ids(self) -> list[str]:
        return [task_id for task_id, _ in self.messages]

    @property
    def texts(self) -> list[str]:
        return [text for _, text in self.messages]


@dataclass
class Poll:
    """One wait_any: when to look again, when to check for lost jobs, when to give up."""

    settings: ProducerSettings
    count: int
    first: str
    timeout: float | None = None
    delay: float = 0.0005
    limit: float = field(init=False)
    deadline: float = field(init=False)
    next_check: float = field(init=False)

    def __post_init__(self) -> None:
        self.limit = self.settings.wait_timeout_s if self.timeout is None else self.timeout
        now = time.monotonic()
        self.deadline = now + self.limit
        self.next_check = now + self.settings.lost_check_s

    def check_lost_now(self) -> bool:
        now = time.monotonic()
        if now < self.next_check:
            return False
        self.next_check = now + self.settings.lost_check_s
        return True

    def next_delay(self) -> float:
        """Seconds to sleep before the next look, backing off from 0.5 ms to 20 ms;
        TimeoutError once the deadline has passed."""
        if time.monotonic() > self.deadline:
            raise TimeoutError(
                f"{self.count} task(s) not finished after {self.limit:g}s "
                f"(first: {self.first}); are workers consuming the queue?"
            )
        delay = self.delay
        self.delay = min(self.delay * 1.5, 0.02)
        return delay


class ClientCore:
    """State both clients keep: settings, the model facts the workers published, the jobs
    sent recently (to send again if Redis lost them)."""

    def __init__(self, settings: ProducerSettings | None) -> None:
        self.settings = settings or ProducerSettings()
        self._model_info: dict[str, ModelInfo | None] = {}
        self._sent = SentJobs(self.settings.track_sent_jobs)
        self._lost = LostJobFinder()

    def _info_cached(self, queue: str, refresh: bool) -> tuple[str, bool]:
        """The queue's name, and whether its model info must be read."""
        name = resolve_queue(queue)
        return name, refresh or self._model_info.get(name) is None

    def _info_read(self, name: str, raw: bytes | str | None) -> ModelInfo | None:
        self._model_info[name] = None if raw is None else ModelInfo.model_validate_json(raw)
        return self._model_info[name]

    def _batch(
        self,
        task: str,
        kwargs_list: Sequence[dict[str, Any]],
        queue: str,
        task_ids: Sequence[str | None] | None,
    ) -> Batch:
        target = queue_for(task, resolve_queue(queue))
        now = time.time()
        headers = {HEADER_ENQUEUED_AT: now}
        ids = task_ids or [None] * len(kwargs_list)
        messages = [
            task_message(task, kwargs, target, task_id, headers)
            for kwargs, task_id in zip(kwargs_list, ids, strict=True)
        ]
        return Batch(task, target, kwargs_list, messages, now)

    def _pushed(self, batch: Batch, depth: int) -> list[str]:
        """After the push (`depth`: what LIMITED_PUSH returned; positive without a limit):
        remember the jobs, or refuse them with QueueFull."""
        if depth < 0 or (depth == 0 and batch.messages):
            limit = self.settings.max_queue_depth
            raise QueueFull(
                f"queue {batch.target} holds {-depth} job(s): {len(batch.messages)} more "
                f"would pass its limit of {limit} (INFERENCE_MAX_QUEUE_DEPTH); send them later"
            )
        for (task_id, _), kwargs in zip(batch.messages, batch.kwargs, strict=True):
            self._sent.add(task_id, SentJob(batch.task, kwargs, batch.target, batch.sent_at))
        return batch.ids

    def _settled(self, task_ids: Sequence[str], raws: Sequence[Any]) -> list[TaskStatus]:
        statuses = [status_from_meta(t, raw) for t, raw in zip(task_ids, raws, strict=True)]
        for status in statuses:
            if status.ready:
                self._sent.forget(status.task_id)
        return statuses

    @staticmethod
    def _keys(task_ids: Sequence[str]) -> list[str]:
        return [result_key(t) for t in task_ids]
