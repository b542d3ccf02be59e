"""The Celery tasks: thin wrappers that hand their arguments to worker.service."""

from __future__ import annotations

from typing import Any

import redis
from celery import Task

from producer.contract import (
    HEADER_ENQUEUED_AT,
    QUEUES,
    TASK_HEALTH,
    TASK_PREDICT,
    TASK_PREDICT_BATCH,
)
from producer.errors import PermanentError, TransientError
from worker import health, runtime, service
from worker.app import app, settings

# Bad input is an expected outcome: logged without a traceback, never retried.
# A process without its model may recover: retried with backoff.
_POLICY: dict[str, Any] = {
    "throws": (PermanentError,),
    "autoretry_for": (TransientError,),
    "retry_backoff": True,
    "max_retries": 3,
}


@app.task(name=TASK_PREDICT, bind=True, **_POLICY)
def predict(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return service.predict_one(
        runtime.current(),
        args,
        kwargs,
        getattr(self.request, HEADER_ENQUEUED_AT, None),
        self.request.hostname or "",
    )


@app.task(name=TASK_PREDICT_BATCH, bind=True, track_started=True, **_POLICY)
def predict_batch(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return service.predict_batch(
        runtime.current(),
        args,
        kwargs,
        getattr(self.request, HEADER_ENQUEUED_AT, None),
        self.request.hostname or "",
    )


@app.task(name=TASK_HEALTH, ignore_result=True)
def report_health(ttl_s: int | None = None) -> dict[str, Any]:
    state = redis.Redis.from_url(settings.backend)
    broker = redis.Redis.from_url(settings.broker)
    try:
        report = health.build_report(state, broker, sorted(QUEUES.values()))
        default_ttl = int(settings.health_interval_s * 3) + 1
        ttl = ttl_s if isinstance(ttl_s, int) and ttl_s > 0 else default_ttl
        health.store_report(state, report, ttl_s=ttl)
    finally:
        state.close()
        broker.close()
    health.log_report(report)
    return report.model_dump()
