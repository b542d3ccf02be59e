"""Shadow runs of the challenger, off the result path: one daemon thread per process.

A job the champion served hands its rows and the champion's predictions to a bounded queue
(submit() never waits); the thread runs the challenger on them and reports how far apart
the two are. Work is dropped, and counted as skipped, rather than ever delaying a job: when
the queue holds too many rows, when the shadow runs have used up their share of the
process's time, or when the challenger fails. Each piece of work carries the challenger of
the serving snapshot that served its rows, so a hot swap between a job and its shadow run
compares the rows against the version they were meant for, not the one serving by then.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from contract.metrics import SHADOW_SKIP_ERROR, SHADOW_SKIP_QUEUE_FULL, SHADOW_SKIP_SHARE
from training.artifact import Manifest

log = logging.getLogger(__name__)

SHARE_WINDOW_S = 10.0
"""The share is kept over this many seconds: an idle hour buys no burst longer than
share x window."""


class Challenger(Protocol):
    manifest: Manifest

    def predict(self, rows: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True, eq=False)
class ShadowWork:
    """Rows the champion served, its predictions, and the challenger to compare them with."""

    rows: np.ndarray
    served: np.ndarray
    champion: str
    """The champion's version (a label of the metrics)."""
    challenger: Challenger

    @property
    def pair(self) -> tuple[str, str]:
        return self.champion, self.challenger.manifest.version


class ShareBudget:
    """Seconds the shadow runs may still take: credit accrues at `share` seconds per second
    of wall time, up to `share * window_s`, and each run spends what it took. A run is
    allowed while there is credit, so over any long stretch the runs take at most `share`
    of the time (one run may overdraw; the next wait pays it back)."""

    def __init__(
        self,
        share: float,
        window_s: float = SHARE_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.share = share
        self.cap = share * window_s
        self._clock = clock
        self._credit = self.cap
        self._at = clock()

    def allows(self) -> bool:
        now = self._clock()
        self._credit = min(self.cap, self._credit + (now - self._at) * self.share)
        self._at = now
        return self.share > 0 and self._credit > 0

    def spend(self, seconds: float) -> None:
        self._credit -= seconds


class ShadowRunner:
    """The queue and its thread. The thread starts with the first work submitted, in the
    process that submits it (a prefork child, never the parent before fork)."""

    def __init__(
        self,
        max_share: float,
        max_rows: int,
        on_compared: Callable[[ShadowWork, np.ndarray], None],
        on_skipped: Callable[[ShadowWork, str], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_rows = max_rows
        self._on_compared = on_compared
        self._on_skipped = on_skipped
        self._clock = clock
        self._budget = ShareBudget(max_share, clock=clock)
        self._cond = threading.Condition()
        self._queue: deque[ShadowWork] = deque()
        self._rows = 0
        self._busy = False
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._pid = 0

    @property
    def pending_rows(self) -> int:
        with self._cond:
            return self._rows

    def submit(self, work: ShadowWork) -> bool:
        """Queue `work`, or skip it (counted) if over the share or the queue is full; True
        when queued. Takes a lock held only for queue updates: it never waits on a run."""
        n = len(work.rows)
        if n == 0:
            return False
        with self._cond:
            if self._stopped:
                return False
            if not self._budget.allows():
                reason = SHADOW_SKIP_SHARE
            elif self._rows + n > self.max_rows:
                reason = SHADOW_SKIP_QUEUE_FULL
            else:
                self._queue.append(work)
                self._rows += n
                self._ensure_thread()
                self._cond.notify()
                return True
        self._skip(work, reason)
        return False

    def _ensure_thread(self) -> None:
        if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._run, name="inference-shadow", daemon=True)
            self._thread.start()

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until every queued work has run; True if it did within `timeout`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Drop what is queued and end the thread once its run in hand is done."""
        with self._cond:
            self._stopped = True
            self._queue.clear()
            self._rows = 0
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            thread.join(timeout)

    def _take(self) -> ShadowWork | None:
        while True:
            with self._cond:
                self._busy = False
                self._cond.notify_all()  # drain() waits on an empty queue and an idle thread
                while not self._queue and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return None
                work = self._queue.popleft()
                self._rows -= len(work.rows)
                self._busy = True
                if self._budget.allows():
                    return work
            # Queued while there was credit; the runs before it spent the rest.
            self._skip(work, SHADOW_SKIP_SHARE)

    def _run(self) -> None:
        while (work := self._take()) is not None:
            t0 = self._clock()
            try:
                other = np.asarray(work.challenger.predict(work.rows), dtype=np.float64)
                diffs = np.abs(other.reshape(-1) - np.asarray(work.served, np.float64).reshape(-1))
            except Exception:
                log.exception("shadow run of %s failed", work.challenger.manifest.version)
                self._skip(work, SHADOW_SKIP_ERROR)
                continue
            finally:
                with self._cond:
                    self._budget.spend(self._clock() - t0)
            try:
                self._on_compared(work, diffs)
            except Exception:
                log.exception("recording a shadow comparison failed")

    def _skip(self, work: ShadowWork, reason: str) -> None:
        try:
            self._on_skipped(work, reason)
        except Exception:
            log.exception("recording skipped shadow work failed")
