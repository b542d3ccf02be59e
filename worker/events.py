"""Celery's task events for the jobs the row lane serves, so that `celery events`, Flower
and anything else that follows Celery's event stream sees them as it sees any task.

Celery's own path sends task events from the worker's main process; the row lane serves
its jobs in the pool's processes, so each lane has an event dispatcher of its own and
sends the same events (task-received, task-started, then task-succeeded, task-failed or
task-revoked) with the worker's hostname and the serving process's pid. A batch's events
are buffered and published together: one message, one Redis round trip per batch, which
Celery's event receivers read as a list of events.

Whether task events are on is decided in the main process, where `-E`,
worker_send_task_events and Flower's enable_events / disable_events remote commands act on
the consumer's dispatcher. EventsSwitch follows that dispatcher from a thread of the main
process and publishes its state in a byte of shared memory, which the pool's processes,
forked after it was created, read before each batch.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing.sharedctypes
import sys
import threading
from typing import Any

from celery.utils.time import utcoffset as celery_utcoffset

log = logging.getLogger(__name__)

TASK_GROUP = "task"
"""The group of Celery's task events (task-received, task-started, ...)."""

RESULT_CHARS = 1024
"""Most characters of a result in a task-succeeded event (Celery's resultrepr_maxsize)."""

_SHOWN = ("prediction", "rows", "model_name", "model_version", "device")
"""What a task-succeeded event shows of a result document: the prediction (or a batch's
row count) and the model that made it. Every byte of a lane batch's events is encoded
twice (JSON, then base64 in kombu's envelope) in the process that serves the jobs; the
whole document is in the result backend."""


def result_text(result: Any) -> str:
    """A result as a task-succeeded event shows it (see _SHOWN), up to RESULT_CHARS."""
    if isinstance(result, dict):
        result = {k: result[k] for k in _SHOWN if k in result}
    text = repr(result)
    return text if len(text) <= RESULT_CHARS else text[: RESULT_CHARS - 3] + "..."


_OPTIONAL = (("root_id", "root_id"), ("parent_id", "parent_id"), ("expires", "expires"))
"""task-received fields taken from the message's headers when they are set."""


def task_events_on(dispatcher: Any) -> bool:
    """Whether Celery's event dispatcher `dispatcher` sends task events now."""
    if dispatcher is None or not getattr(dispatcher, "enabled", False):
        return False
    groups = getattr(dispatcher, "groups", None)
    return not groups or TASK_GROUP in groups


class EventsSwitch:
    """Task events on or off, shared by a worker's main process and its pool's processes.
    Created in the main process before the pool forks."""

    def __init__(self) -> None:
        self._flag = multiprocessing.sharedctypes.RawValue("b", 0)
        self._stop = threading.Event()

    @property
    def on(self) -> bool:
        return bool(self._flag.value)

    def set(self, on: bool) -> None:
        self._flag.value = 1 if on else 0

    def follow(self, worker: Any, interval_s: float = 0.5) -> None:
        """Follow the event dispatcher of `worker`'s consumer (the celery WorkController),
        from a daemon thread of this process, until stop()."""

        def run() -> None:
            while not self._stop.wait(interval_s):
                consumer = getattr(worker, "consumer", None)
                on = task_events_on(getattr(consumer, "event_dispatcher", None))
                if on != self.on:
                    log.info("task events of the row lanes %s", "on" if on else "off")
                    self.set(on)

        threading.Thread(target=run, name="inference-events-switch", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()


class LaneEvents:
    """One row lane's task events: buffered per batch, published by flush().

    The events are the dicts EventDispatcher.send builds (type, hostname, utcoffset, pid,
    clock, timestamp and the event's fields), built here in one step each and added to the
    dispatcher's buffer of the task group; its flush() publishes that buffer as one message.
    send() would cost a group check, a local-time read and keyword plumbing per event: about
    half of what the events cost a row (tests/monitoring checks the buffer is flushed as one).
    """

    def __init__(self, app: Any, hostname: str) -> None:
        self.app = app
        self.hostname = hostname
        self._dispatcher: Any = None
        self._buffer: list[dict[str, Any]] = []
        self._base: dict[str, Any] = {}

    def _open(self) -> Any:
        if self._dispatcher is None:
            self._dispatcher = self.app.events.Dispatcher(
                self.app.connection_for_write(),
                hostname=self.hostname,
                enabled=True,
                buffer_group=[TASK_GROUP],
                # Published by flush() only: one message per batch, however large.
                buffer_limit=sys.maxsize,
            )
        return self._dispatcher

    def job(
        self,
        task_id: str,
        name: str,
        headers: dict[str, Any],
        received: float,
        ended: float,
        outcome: str,
        result: Any = None,
        error: BaseException | None = None,
    ) -> None:
        """The events of one job served (received at `received`, ended at `ended`, Unix
        seconds), buffered. `outcome`: success, failure, revoked or refused."""
        dispatcher = self._open()
        if not self._base:
            # Once a batch: Celery's send() reads the local time per event.
            self._base = {
                "hostname": self.hostname,
                "utcoffset": celery_utcoffset(),
                "pid": dispatcher.pid,
            }
        base, tick, add = self._base, dispatcher.clock.forward, self._buffer.append
        # Fields Celery sends as None are left out (a receiver reads them as None): every
        # byte is encoded twice in this process.
        optional = {k: headers[h] for k, h in _OPTIONAL if headers.get(h) is not None}
        add({
            "type": "task-received", "uuid": task_id, "name": name,
            "args": headers.get("argsrepr"), "kwargs": headers.get("kwargsrepr"),
            "retries": headers.get("retries") or 0, "timestamp": received, "clock": tick(),
            **optional, **base,
        })  # fmt: skip
        if outcome == "revoked":
            add({
                "type": "task-revoked", "uuid": task_id, "terminated": False, "signum": None,
                "expired": True, "timestamp": ended, "clock": tick(), **base,
            })  # fmt: skip
            return
        add(
            {
                "type": "task-started",
                "uuid": task_id,
                "timestamp": received,
                "clock": tick(),
                **base,
            }
        )
        runtime = max(0.0, ended - received)
        if outcome == "success":
            add({
                "type": "task-succeeded", "uuid": task_id, "result": result_text(result),
                "runtime": runtime, "timestamp": ended, "clock": tick(), **base,
            })  # fmt: skip
        else:
            add({
                "type": "task-failed", "uuid": task_id, "exception": repr(error),
                "traceback": None, "runtime": runtime, "timestamp": ended, "clock": tick(),
                **base,
            })  # fmt: skip

    def flush(self) -> None:
        """Publish what is buffered, as one message; should the broker be away, Celery's
        dispatcher keeps it for the next flush."""
        self._base = {}
        if self._dispatcher is None:
            return
        if self._buffer:
            # EventDispatcher.send's own buffering (buffer_group), without its per-event cost.
            self._dispatcher._group_buffer[TASK_GROUP].extend(self._buffer)
            self._buffer = []
        try:
            self._dispatcher.flush()
        except Exception:
            log.warning("row lane: could not publish task events", exc_info=True)

    def close(self) -> None:
        if self._dispatcher is not None:
            with contextlib.suppress(Exception):
                self.flush()
                self._dispatcher.close()
                self._dispatcher.connection.release()
            self._dispatcher = None
