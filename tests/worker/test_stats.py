from __future__ import annotations

import os
import time

import fakeredis

from contract.names import worker_state_key
from contract.schemas import WorkerState
from worker.stats import WINDOW, Heartbeat, ProcessStats


def make_stats() -> ProcessStats:
    return ProcessStats(
        WorkerState(
            hostname="w@h",
            pid=os.getpid(),
            queues=["q"],
            pool="solo",
            model_name="m",
            model_version="v",
            provider="p",
            device="cpu",
            started_at=1.0,
            updated_at=1.0,
        )
    )


def test_counters_and_bounded_window() -> None:
    stats = make_stats()
    for i in range(WINDOW + 10):
        stats.succeeded(float(i), rows=2)
    stats.failed()
    snap = stats.snapshot()
    assert (snap.jobs_done, snap.jobs_failed, snap.rows_done) == (WINDOW + 10, 1, 2 * (WINDOW + 10))
    assert len(snap.recent_task_ms) == WINDOW and snap.recent_task_ms[-1] == WINDOW + 9


def test_heartbeat_publishes_with_ttl_and_removes_on_stop() -> None:
    r = fakeredis.FakeRedis()
    stats = make_stats()
    beat = Heartbeat(r, stats, interval_s=0.05)
    key = worker_state_key("w@h", os.getpid())
    beat.start()
    stats.succeeded(1.0, 1)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        raw = r.get(key)
        if raw and WorkerState.model_validate_json(raw).jobs_done == 1:
            break
        time.sleep(0.01)
    else:
        raise AssertionError("heartbeat never published the new count")
    assert 0 < r.pttl(key) <= 1000
    beat.stop()
    assert r.get(key) is None
