"""The pure logic of the metrics and events: no Redis, no worker."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery
from prometheus_client import CollectorRegistry, Histogram

from contract.metrics import LATENCY_BUCKETS, OUTCOMES
from contract.names import TASK_NOOP, TASK_PREDICT, TASK_PREDICT_BATCH
from worker import metrics
from worker.events import EventsSwitch, LaneEvents, task_events_on
from worker.observe import outcome_of, rows_of, task_label


def histogram_samples(h: Any) -> list[tuple[str, dict[str, str], float]]:
    return [
        (s.name, s.labels, s.value)
        for m in h.collect()
        for s in m.samples
        if "created" not in s.name
    ]


def test_observe_many_counts_as_observe_does() -> None:
    # Values on the bounds, between them, beyond the last (+Inf), and repeated.
    amounts = [0.0, 0.0001, 0.00011, 0.001, 0.7, 60.0, 61.0, 1e6, 0.0025, 0.0025]
    one = Histogram("a", "a", buckets=LATENCY_BUCKETS, registry=CollectorRegistry())
    many = Histogram("a", "a", buckets=LATENCY_BUCKETS, registry=CollectorRegistry())
    for amount in amounts:
        for _ in range(3):
            one.observe(amount)
    metrics.observe_many(many, amounts, times=3)
    assert histogram_samples(many) == histogram_samples(one)


def test_observe_many_falls_back_to_observe() -> None:
    seen: list[float] = []
    metrics.observe_many(SimpleNamespace(observe=seen.append), [1.0, 2.0], times=2)
    assert seen == [1.0, 1.0, 2.0, 2.0]


def test_drop_dead_gauges_keeps_live_processes_and_every_counter(tmp_path: Path) -> None:
    dead = 2**22 + 12345  # above any pid this machine hands out (pid_max <= 2**22)
    names = [
        f"gauge_livemax_{dead}.db",
        f"gauge_livemax_{os.getpid()}.db",
        f"counter_{dead}.db",
        f"histogram_{dead}.db",
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert metrics.drop_dead_gauges(str(tmp_path)) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])


def job(**fields: Any) -> SimpleNamespace:
    base = dict(
        task_id="t", task=TASK_PREDICT, headers={}, error=None, revoked=False, refused=False,
        result={"prediction": 1.0},
    )  # fmt: skip
    return SimpleNamespace(**{**base, **fields})


def test_outcomes_of_lane_jobs() -> None:
    assert outcome_of(job()) == "success"
    assert outcome_of(job(error=ValueError(), result=None)) == "failure"
    assert outcome_of(job(revoked=True, result=None)) == "revoked"
    assert outcome_of(job(refused=True, error=ValueError(), result=None)) == "refused"
    assert {outcome_of(j) for j in (job(), job(revoked=True))} <= set(OUTCOMES)


def test_rows_and_task_labels_are_bounded() -> None:
    assert rows_of(TASK_PREDICT, None) == 1
    assert rows_of(TASK_PREDICT_BATCH, {"rows": 20_000}) == 20_000
    assert rows_of(TASK_PREDICT_BATCH, None) == 0
    assert rows_of(TASK_NOOP, {}) == 0
    assert task_label(TASK_PREDICT) == TASK_PREDICT
    assert task_label("tasks.whatever.someone.sent") == "other"
    assert task_label(["not", "a", "name"]) == "other"


@pytest.mark.parametrize(
    ("enabled", "groups", "on"),
    [
        (True, set(), True),  # -E: every group
        (True, {"worker"}, False),  # heartbeats only
        (True, {"worker", "task"}, True),  # after enable_events
        (False, set(), False),
    ],
)
def test_task_events_on_follows_the_dispatcher(enabled: bool, groups: set[str], on: bool) -> None:
    assert task_events_on(SimpleNamespace(enabled=enabled, groups=groups)) is on
    assert task_events_on(None) is False


def _wait_for_switch(switch: EventsSwitch, want: bool) -> None:
    deadline = time.monotonic() + 10
    while switch.on is not want:
        if time.monotonic() > deadline:
            os._exit(1)
        time.sleep(0.01)
    os._exit(0)


def test_switch_set_in_the_parent_reaches_forked_children() -> None:
    switch = EventsSwitch()
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_wait_for_switch, args=(switch, True))
    child.start()
    switch.set(True)  # after the fork, as a remote enable_events comes
    child.join(15)
    assert child.exitcode == 0


def test_follow_reads_the_consumers_dispatcher() -> None:
    dispatcher = SimpleNamespace(enabled=True, groups={"worker"})
    worker = SimpleNamespace(consumer=SimpleNamespace(event_dispatcher=dispatcher))
    switch = EventsSwitch()
    switch.follow(worker, interval_s=0.01)
    try:
        dispatcher.groups.add("task")
        deadline = time.monotonic() + 10
        while not switch.on and time.monotonic() < deadline:
            time.sleep(0.01)
        assert switch.on
        dispatcher.groups.discard("task")
        while switch.on and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not switch.on
    finally:
        switch.stop()


def test_a_batch_of_lane_events_is_one_publish() -> None:
    app = Celery("unit", broker="memory://")
    events = LaneEvents(app, "w@host")
    dispatcher = events._open()
    published: list[tuple[Any, str]] = []
    dispatcher._publish = lambda event, producer, routing_key, **_: published.append(
        (event, routing_key)
    )
    t0 = time.time()
    events.job("a", TASK_PREDICT, {"argsrepr": "()"}, t0, t0 + 0.5, "success", result={"x": 1})
    events.job("b", TASK_PREDICT, {}, t0, t0 + 0.25, "failure", error=ValueError("bad"))
    events.job("c", TASK_PREDICT_BATCH, {}, t0, t0 + 0.1, "revoked")
    assert published == []
    events.flush()
    ((batch, routing_key),) = published
    assert routing_key == "task.multi"
    assert [(e["type"], e["uuid"]) for e in batch] == [
        ("task-received", "a"), ("task-started", "a"), ("task-succeeded", "a"),
        ("task-received", "b"), ("task-started", "b"), ("task-failed", "b"),
        ("task-received", "c"), ("task-revoked", "c"),
    ]  # fmt: skip
    assert {e["hostname"] for e in batch} == {"w@host"}
    assert {e["pid"] for e in batch} == {os.getpid()}
    succeeded, failed = batch[2], batch[5]
    assert succeeded["runtime"] == pytest.approx(0.5)
    assert succeeded["result"] == "{}"
    assert "bad" in failed["exception"]
    assert batch[0]["name"] == TASK_PREDICT and batch[0]["timestamp"] == t0
    events.close()


def test_a_job_the_pool_parent_fails_counts_once_and_only_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from worker import observe

    calls: list[tuple[Any, ...]] = []
    recorder = SimpleNamespace(ended=lambda *args: calls.append(args))
    monkeypatch.setattr(metrics, "_recorder", recorder)
    request = SimpleNamespace(delivery_info={"routing_key": "inference.cpu"})
    task = SimpleNamespace(name=TASK_PREDICT_BATCH, request=request)
    monkeypatch.setattr(observe, "_pool_parent", None)
    observe._failed_by_parent(sender=task, task_id="t")  # a pool process: its postrun counts
    assert calls == []
    observe.mark_pool_parent()
    observe._failed_by_parent(sender=task, task_id="t")
    assert calls == [("inference.cpu", TASK_PREDICT_BATCH, "failure", 1, 0)]
