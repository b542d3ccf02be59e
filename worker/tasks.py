"""The Celery tasks: thin wrappers that hand their arguments to worker.service.

Registered with `shared_task`, so importing this module builds no app: the app in
worker.celery includes it. Every task message passes worker.guards.checked_strategy in the
worker's main process before Celery's own handling.
"""

from __future__ import annotations

import contextlib
from typing import Any

from celery import Task, shared_task

from contract.errors import MessageTooLarge, ModelNotReady, PermanentError, TransientError
from contract.names import (
    HEADER_ENQUEUED_AT,
    HEADER_MODEL_VERSION,
    HEADER_ROUTING_KEY,
    TASK_EXPLAIN,
    TASK_HEALTH,
    TASK_NOOP,
    TASK_PREDICT,
    TASK_PREDICT_BATCH,
    all_queues,
)
from producer.connections import redis_client
from worker import health, runtime, service
from worker.guards import refuse_oversized
from worker.settings import load

# By name: a function set as a task class attribute would be bound as a method.
CHECKED_STRATEGY = "worker.guards:checked_strategy"


def _runtime_for(task: Task) -> runtime.Runtime:
    """The process's runtime, once the message has passed the size limit.

    Checked before runtime.current(): an oversized message carries no kwargs any more, and
    must not reach autoretry (on ModelNotReady), which would re-send it without them.
    """
    try:
        refuse_oversized(task.request)
    except MessageTooLarge:
        with contextlib.suppress(ModelNotReady):
            runtime.current().stats.failed()
        raise
    return runtime.current()


# Bad input is an expected outcome: logged without a traceback, never retried.
# A process without its model may recover: retried with backoff.
_POLICY: dict[str, Any] = {
    "base": Task,
    "throws": (PermanentError,),
    "autoretry_for": (TransientError,),
    "retry_backoff": True,
    "max_retries": 3,
}


def _job(task: Task, args: tuple[Any, ...], kwargs: dict[str, Any]) -> service.Job:
    request = task.request
    return service.Job(
        args,
        kwargs,
        getattr(request, HEADER_ENQUEUED_AT, None),
        request.hostname or "",
        request.id or "",
        getattr(request, HEADER_MODEL_VERSION, None),
        getattr(request, HEADER_ROUTING_KEY, None),
    )


@shared_task(name=TASK_PREDICT, bind=True, Strategy=CHECKED_STRATEGY, **_POLICY)
def predict(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return service.predict_one(_runtime_for(self), _job(self, args, kwargs))


@shared_task(
    name=TASK_PREDICT_BATCH, bind=True, track_started=True, Strategy=CHECKED_STRATEGY, **_POLICY
)
def predict_batch(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return service.predict_batch(_runtime_for(self), _job(self, args, kwargs))


@shared_task(name=TASK_EXPLAIN, bind=True, track_started=True, Strategy=CHECKED_STRATEGY, **_POLICY)
def explain(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return service.explain(_runtime_for(self), _job(self, args, kwargs))


@shared_task(name=TASK_HEALTH, bind=True, base=Task, ignore_result=True, Strategy=CHECKED_STRATEGY)
def report_health(self: Task, ttl_s: int | None = None) -> dict[str, Any]:
    refuse_oversized(self.request)
    settings = load()
    state = redis_client(settings.backend, settings)
    broker = redis_client(settings.broker, settings)
    try:
        queues = all_queues()
        report = health.build_report(state, broker, queues)
        default_ttl = int(settings.health_interval_s * 3) + 1
        ttl = ttl_s if isinstance(ttl_s, int) and ttl_s > 0 else default_ttl
        health.store_report(state, report, ttl_s=ttl)
    finally:
        state.close()
        broker.close()
    health.log_report(report)
    return report.model_dump()


@shared_task(name=TASK_NOOP, bind=True, base=Task, Strategy=CHECKED_STRATEGY)
def noop(self: Task) -> dict[str, Any]:
    """Does nothing: Celery's own cost per message, the baseline `python -m stack.bench`
    measures inference.predict against. Behind the same message checks as every task."""
    refuse_oversized(self.request)
    return {}
