"""Building the health report from worker heartbeats (fakeredis)."""

from __future__ import annotations

import time

import fakeredis
import pytest

from contract.names import HEALTH_REPORT_KEY, worker_state_key
from contract.schemas import WorkerState
from worker.health import build_report, store_report


def state(
    hostname: str, pid: int, queues: list[str], done: int, ms: list[float], age: float = 0
) -> WorkerState:
    now = time.time()
    return WorkerState(
        hostname=hostname, pid=pid, queues=queues, pool="prefork", model_name="m",
        model_version="v1", provider="CPUExecutionProvider", device="cpu",
        started_at=now - 100, updated_at=now - age, jobs_done=done, jobs_failed=1,
        rows_done=done * 2, recent_task_ms=ms,
    )  # fmt: skip


@pytest.fixture
def r() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


def put(r: fakeredis.FakeRedis, s: WorkerState, ttl: int = 10) -> None:
    r.set(worker_state_key(s.hostname, s.pid), s.model_dump_json(), ex=ttl)


def test_no_worker_means_down(r: fakeredis.FakeRedis) -> None:
    report = build_report(r, r, ["inference.cpu"])
    assert report.status == "down" and report.workers == []


def test_processes_are_grouped_per_worker(r: fakeredis.FakeRedis) -> None:
    put(r, state("a@h", 1, ["inference.cpu"], 10, [1.0] * 90 + [10.0] * 10))
    put(r, state("a@h", 2, ["inference.cpu"], 5, [2.0] * 10))
    put(r, state("b@h", 7, ["inference.gpu"], 1, []))
    report = build_report(r, r, ["inference.cpu", "inference.gpu"])
    assert report.status == "ok"
    a, b = report.workers
    assert (a.hostname, a.processes, a.jobs_done, a.jobs_failed, a.rows_done) == (
        "a@h",
        2,
        15,
        2,
        30,
    )
    assert a.latency.count == 110
    assert a.latency.p50_ms == 1.0 and a.latency.p99_ms == 10.0
    assert b.latency.count == 0 and b.latency.p50_ms is None
    assert 99 < a.uptime_s < 110


def test_queue_depths_and_unserved_queues(r: fakeredis.FakeRedis) -> None:
    put(r, state("a@h", 1, ["inference.cpu"], 0, []))
    r.rpush("inference.gpu", "job1", "job2")
    report = build_report(r, r, ["inference.cpu", "inference.gpu"])
    assert report.queue_depths == {"inference.cpu": 0, "inference.gpu": 2}
    assert report.status == "degraded"  # jobs wait on a queue nobody consumes


def test_garbage_and_expired_states_are_ignored(r: fakeredis.FakeRedis) -> None:
    r.set(worker_state_key("x@h", 1), b"not json")
    put(r, state("gone@h", 3, ["inference.cpu"], 0, []), ttl=1)
    r.pexpire(worker_state_key("gone@h", 3), 1)
    time.sleep(0.01)
    assert build_report(r, r, ["inference.cpu"]).workers == []


def test_report_is_stored_with_a_ttl(r: fakeredis.FakeRedis) -> None:
    report = build_report(r, r, ["inference.cpu"])
    store_report(r, report, ttl_s=7)
    assert 0 < r.ttl(HEALTH_REPORT_KEY) <= 7
