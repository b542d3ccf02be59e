"""Hostile input costs a worker nothing it keeps: huge rows and padded batches, sent by a
stock Celery client to Celery's queue and to the row lane, each fail with a clear error, and
no process of the worker grows by more than 50 MiB after the first of each."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from contract.names import TASK_PREDICT, TASK_PREDICT_BATCH, result_key, row_queue
from stack.processes import celery_env, wait_ready, worker_process
from stack.rss_soak import MIB, worker_rss
from tests.support import TrainedModel

pytestmark = pytest.mark.integration

ROUNDS = 16
HUGE_ROW = {"features": [0.5] * 1_000_000}
PADDED_BATCH = {"rows": [[0.5] * 5], "padding": "x" * (20 * 1024 * 1024)}
GROWTH_MIB = 50


@pytest.fixture
def worker(
    redis_url: str, trained_model: TrainedModel, tmp_path: Path
) -> Iterator[tuple[str, int]]:
    queue = f"hostile.{uuid.uuid4().hex[:8]}"
    name = f"hostile-{queue}@tests"
    env = celery_env(redis_url, model_dir=trained_model.model_dir)
    proc = worker_process(env, tmp_path / "w.log", queue=queue, name=name, concurrency=2).start()
    probe = redis.Redis.from_url(redis_url)
    try:
        wait_ready(proc, probe, name, 2)
        assert proc.proc is not None
        yield queue, proc.proc.pid
    finally:
        probe.close()
        proc.stop()


def rss(pid: int) -> dict[int, int]:
    main, pool = worker_rss(pid)
    return {pid: main, **pool}


def run(sender: Celery, probe: redis.Redis, task: str, kwargs: dict, queue: str) -> dict:
    task_id = sender.send_task(task, kwargs=kwargs, queue=queue).id
    deadline = time.monotonic() + 60
    while True:
        raw = probe.get(result_key(task_id))
        doc: dict = json.loads(raw) if raw is not None else {}
        if doc.get("status") in ("SUCCESS", "FAILURE"):
            return doc
        assert time.monotonic() < deadline, f"no result for {task} on {queue}"
        time.sleep(0.02)


CELERY_PATH_RETAINS = pytest.mark.xfail(
    strict=True,
    reason="open: on Celery's own path a padded 20 MB batch leaves a high-water mark of about "
    "its size times 3-4 in the main and pool processes (+68 and +81 MiB measured after the "
    "first job); flat from the second job on, but over the 50 MiB allowed after the first",
)


@pytest.mark.parametrize(
    ("task", "kwargs", "error", "lane"),
    [
        pytest.param(TASK_PREDICT, HUGE_ROW, "MessageTooLarge", False, id="huge-row-celery-queue"),
        pytest.param(TASK_PREDICT, HUGE_ROW, "MessageTooLarge", True, id="huge-row-row-lane"),
        pytest.param(
            TASK_PREDICT_BATCH,
            PADDED_BATCH,
            "",
            False,
            id="padded-batch-celery-queue",
            marks=CELERY_PATH_RETAINS,
        ),
        pytest.param(TASK_PREDICT_BATCH, PADDED_BATCH, "", True, id="padded-batch-row-lane"),
    ],
)
def test_hostile_jobs_fail_clearly_and_leave_memory_flat(
    redis_url: str, worker: tuple[str, int], task: str, kwargs: dict, error: str, lane: bool
) -> None:
    queue, pid = worker
    target = row_queue(queue) if lane else queue
    sender = Celery("stock-sender", broker=redis_url)
    sender.conf.update(task_serializer="json", accept_content=["json"])
    probe = redis.Redis.from_url(redis_url)
    try:
        first = run(sender, probe, task, kwargs, target)
        after_first = rss(pid)
        docs = [run(sender, probe, task, kwargs, target) for _ in range(ROUNDS - 1)]
        after_all = rss(pid)
    finally:
        probe.close()
        sender.close()
    for doc in [first, *docs]:
        assert doc["status"] == "FAILURE"
        assert doc["result"]["exc_type"] in (error or "InvalidInput", "InvalidInput")
    growth = {p: (after_all.get(p, 0) - before) / MIB for p, before in after_first.items()}
    print(f"\n{task} on {target}: RSS growth after the first, MiB per process: {growth}")
    assert set(after_all) == set(after_first), "a process was replaced"
    assert max(growth.values()) <= GROWTH_MIB, growth
