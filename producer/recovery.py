"""Finding jobs that Redis no longer holds anywhere, so the producer can send them again.

kombu's Redis transport takes a job off its queue with BRPOP and only then
records it as unacknowledged. A worker killed (SIGKILL, OOM) between the two
takes that one job with it: it is in no queue, not unacknowledged, and has no
result. The producer still has the job's arguments, so it re-sends it under the
same task id; the job then runs at most twice, which is harmless because a
prediction has no side effect.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SentJob:
    task: str
    kwargs: dict[str, Any]
    queue: str
    sent_at: float


class SentJobs:
    """The arguments of recently sent jobs, bounded, forgotten once they finish."""

    def __init__(self, limit: int) -> None:
        self._jobs: OrderedDict[str, SentJob] = OrderedDict()
        self._limit = limit

    def add(self, task_id: str, job: SentJob) -> None:
        self._jobs[task_id] = job
        while len(self._jobs) > self._limit:
            self._jobs.popitem(last=False)

    def get(self, task_id: str) -> SentJob | None:
        return self._jobs.get(task_id)

    def forget(self, task_id: str) -> None:
        self._jobs.pop(task_id, None)

    def __len__(self) -> int:
        return len(self._jobs)


class LostJobFinder:
    """Declares a pending job lost when, on two checks at least `confirm_s` apart, its
    queue is empty and no worker holds it unacknowledged.

    Free of I/O, so the sync and the asyncio client share it: `candidates` says what to
    read (the jobs' queues), `judge` decides from what was read (their lengths and the
    broker's held messages)."""

    def __init__(self, confirm_s: float = 1.0) -> None:
        self._confirm_s = confirm_s
        self._suspects: dict[str, float] = {}

    def candidates(self, pending: list[str], jobs: SentJobs) -> tuple[list[str], list[str]]:
        """The pending jobs this client sent (and still remembers), and their queues."""
        known = [t for t in pending if jobs.get(t) is not None]
        queues = sorted({jobs.get(t).queue for t in known})  # type: ignore[union-attr]
        return known, queues

    def judge(
        self, known: list[str], queue_lengths: list[int], held: list[bytes | str] | None
    ) -> list[str]:
        """The jobs among `known` lost for good. `held`: the values of kombu's unacked hash,
        read only when every queue was empty (None otherwise)."""
        if not known or any(queue_lengths) or held is None:
            # Queued jobs may be behind others: nothing can be told apart cheaply.
            self._suspects.clear()
            return []
        text = b"\x00".join(v if isinstance(v, bytes) else v.encode() for v in held)
        now = time.monotonic()
        suspects = {t: self._suspects.get(t, now) for t in known if t.encode() not in text}
        self._suspects = suspects
        return [t for t, since in suspects.items() if now - since >= self._confirm_s]
