"""What the row lane stores for a job: the result documents Celery's Redis backend writes,
so a producer reads them, or Celery's AsyncResult.get() does, as if Celery had run the job."""

from __future__ import annotations

import datetime
import json
from typing import Any

from celery.utils.time import maybe_iso8601

# What Celery stores for a job it did not run because its `expires` time had passed.
REVOKED: dict[str, Any] = {
    "exc_type": "TaskRevokedError",
    "exc_message": ["expired"],
    "exc_module": "celery.exceptions",
}


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat()


def result_document(task_id: str, state: str, result: Any) -> str:
    """What Celery's Redis backend stores for a finished task."""
    meta = {
        "status": state,
        "result": result,
        "traceback": None,
        "children": [],
        "date_done": utc_now(),
        "task_id": task_id,
    }
    return json.dumps(meta, separators=(",", ":"))


def error_document(exc: BaseException) -> dict[str, Any]:
    """An exception as Celery's backend serializes it for a JSON result."""
    return {
        "exc_type": type(exc).__name__,
        "exc_message": list(exc.args),
        "exc_module": type(exc).__module__,
    }


def expired(expires: Any) -> bool:
    """Whether an `expires` header (ISO 8601, checked by envelope_problem) has passed; a time
    without a zone is taken as UTC, as Celery's own clients send UTC."""
    when = maybe_iso8601(expires) if expires is not None else None
    if when is None:
        return False
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when < datetime.datetime.now(datetime.UTC)
