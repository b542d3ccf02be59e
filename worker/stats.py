"""Per-process counters and a heartbeat that publishes them to Redis.

Each worker process owns one ProcessStats; a daemon thread writes it as a
WorkerState under its own key with a TTL, so a process that dies simply
disappears from the health report once its key expires.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter, deque

import redis

from contract.names import batch_bucket, worker_state_key
from contract.schemas import ServingStatus, WorkerState

log = logging.getLogger(__name__)

WINDOW = 512
"""Recent task times kept per process for the latency percentiles."""


class ProcessStats:
    def __init__(self, base: WorkerState) -> None:
        self._base = base
        self._lock = threading.Lock()
        self._done = 0
        self._failed = 0
        self._rows = 0
        self._recent: deque[float] = deque(maxlen=WINDOW)
        self._batches: Counter[str] = Counter()

    def succeeded(self, task_ms: float, rows: int) -> None:
        with self._lock:
            self._done += 1
            self._rows += rows
            self._recent.append(round(task_ms, 3))

    def batch(self, size: int) -> None:
        with self._lock:
            self._batches[batch_bucket(size)] += 1

    def failed(self) -> None:
        with self._lock:
            self._failed += 1

    def serving(self, model_version: str, status: ServingStatus) -> None:
        """What the process serves now (after a serving decision)."""
        with self._lock:
            self._base = self._base.model_copy(
                update={"model_version": model_version, "serving": status}
            )

    def snapshot(self) -> WorkerState:
        with self._lock:
            return self._base.model_copy(
                update={
                    "updated_at": time.time(),
                    "jobs_done": self._done,
                    "jobs_failed": self._failed,
                    "rows_done": self._rows,
                    "recent_task_ms": list(self._recent),
                    "batch_sizes": dict(self._batches),
                }
            )


class Heartbeat:
    """Publishes a ProcessStats every `interval_s` seconds until stopped."""

    def __init__(self, client: redis.Redis, stats: ProcessStats, interval_s: float) -> None:
        self._client = client
        self._stats = stats
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="inference-heartbeat", daemon=True)
        self._key = worker_state_key(stats.snapshot().hostname, os.getpid())

    @property
    def ttl_s(self) -> int:
        # Three missed beats before a process counts as gone.
        return max(1, int(self._interval * 3 + 0.999))

    def publish(self) -> None:
        state = self._stats.snapshot()
        self._client.set(self._key, state.model_dump_json(), ex=self.ttl_s)

    def start(self) -> None:
        self.publish()
        self._thread.start()

    def stop(self) -> None:
        """Stop beating and remove this process from the report at once."""
        self._stop.set()
        try:
            self._client.delete(self._key)
        except redis.RedisError:
            log.debug("could not delete %s on shutdown", self._key, exc_info=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.publish()
            except redis.RedisError as exc:
                # Redis may be restarting; the next beat tries again.
                log.warning("heartbeat to Redis failed: %s", exc)
