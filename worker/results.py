"""The result documents the row lane stores, made by the app's own Celery result backend.

The lane writes many results in one pipeline instead of one round trip each, so it does not
call `backend.store_result`; it asks the backend for what that would write (the key, the
encoded meta, the exception as the backend serializes it), so a producer, or Celery's
AsyncResult.get(), reads them as if Celery had run the job.
"""

from __future__ import annotations

import datetime
from typing import Any

from celery import states
from celery.exceptions import TaskRevokedError
from celery.utils.time import maybe_iso8601


class Documents:
    """The documents of one take's jobs. Celery's meta (date_done, children...) costs ~15 us
    to build, as much as the rest of a job's result: it is built once per state and take,
    as jobs served together finish together, and each job gets its own result and id."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self._templates: dict[str, dict[str, Any]] = {}

    def document(self, task_id: str, state: str, result: Any) -> tuple[str, str]:
        """(Redis key, encoded document) of a finished job, as `backend` (the app's Redis
        result backend) writes them in store_result: `result` is the task's return value,
        or the exception it failed with."""
        template = self._templates.get(state)
        if template is None:
            template = self.backend._get_result_meta(
                result=None, state=state, traceback=None, request=None
            )
            # What Celery writes for a task that started no others (None outside a task).
            template["children"] = template.get("children") or []
            self._templates[state] = template
        meta = {**template, "result": self.backend.encode_result(result, state), "task_id": task_id}
        key = self.backend.get_key_for_task(task_id)
        doc = self.backend.encode(meta)
        return (
            key.decode() if isinstance(key, bytes) else str(key),
            doc.decode() if isinstance(doc, bytes) else str(doc),
        )

    def success(self, task_id: str, result: dict[str, Any]) -> tuple[str, str]:
        return self.document(task_id, states.SUCCESS, result)

    def failure(self, task_id: str, exc: BaseException) -> tuple[str, str]:
        return self.document(task_id, states.FAILURE, exc)

    def revoked(self, task_id: str) -> tuple[str, str]:
        """What Celery stores for a job it did not run because its `expires` had passed."""
        return self.document(task_id, states.REVOKED, TaskRevokedError("expired"))


def expired(expires: Any) -> bool:
    """Whether an `expires` header (ISO 8601, checked by envelope_problem) has passed; a time
    without a zone is taken as UTC, as Celery's own clients send UTC."""
    when = maybe_iso8601(expires) if expires is not None else None
    if when is None:
        return False
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when < datetime.datetime.now(datetime.UTC)
