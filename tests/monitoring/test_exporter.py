"""The queue exporter (`python -m producer metrics`) against a real Redis: depths with every
priority list, the oldest job's age from its enqueued_at header, held jobs, live workers."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from celery import Celery

from contract.metrics import JOBS_HELD, QUEUE_DEPTH, QUEUE_OLDEST_AGE_SECONDS, WORKERS_LIVE
from contract.names import (
    TASK_PREDICT,
    UNACKED_KEY,
    all_queues,
    priority_lists,
    row_queue,
    worker_state_key,
)
from contract.schemas import WorkerState
from producer.client import Client
from producer.exporter import Exporter
from producer.settings import ProducerSettings
from stack.embedded_redis import free_port
from stack.processes import CeleryProcess, celery_env, wait_http
from tests.monitoring.support import promtool_check_metrics, samples, scrape, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def queue() -> str:
    return f"exp.{uuid.uuid4().hex[:8]}"


@pytest.fixture
def exporter(redis_url: str, queue: str) -> Iterator[Exporter]:
    settings = ProducerSettings(redis_url=redis_url)
    exp = Exporter(settings, 0, "127.0.0.1", queues=[queue, row_queue(queue)]).start()
    try:
        yield exp
    finally:
        exp.close()


def value(text: str, name: str, queue: str) -> float:
    (found,) = samples(text, name, queue=queue)
    return found[1]


def test_empty_queues_read_zero(exporter: Exporter, queue: str) -> None:
    text = scrape(exporter.port)
    for name in (QUEUE_DEPTH, QUEUE_OLDEST_AGE_SECONDS, WORKERS_LIVE, JOBS_HELD):
        assert value(text, name, queue) == 0.0
        assert value(text, name, row_queue(queue)) == 0.0


def test_depth_sums_priority_lists_and_age_comes_from_the_header(
    exporter: Exporter,
    queue: str,
    redis_url: str,
    redis_client: redis.Redis,
    celery_sender: Celery,
) -> None:
    rows = row_queue(queue)
    sent_at = time.time()
    with Client(ProducerSettings(redis_url=redis_url)) as client:
        # No worker serves these queues: the jobs wait. Model info is absent: send() skips
        # the checks that need it.
        for _ in range(3):
            client.send(TASK_PREDICT, {"features": [1.0, 2.0]}, queue)
    celery_sender.send_task(TASK_PREDICT, kwargs={"features": [1.0]}, queue=rows, priority=6)
    assert redis_client.llen(priority_lists(rows)[2]) == 1  # kombu's list for priority 6
    text = scrape(exporter.port)
    assert value(text, QUEUE_DEPTH, rows) == 4
    assert value(text, QUEUE_DEPTH, queue) == 0
    # The stock sender's job has no enqueued_at header: the age is unknown, not 0.
    assert math.isnan(value(text, QUEUE_OLDEST_AGE_SECONDS, rows))
    redis_client.delete(priority_lists(rows)[2])
    time.sleep(0.05)
    age = value(scrape(exporter.port), QUEUE_OLDEST_AGE_SECONDS, rows)
    assert 0.05 <= age <= time.time() - sent_at


def test_held_jobs_counted_by_routing_key(
    exporter: Exporter, queue: str, redis_client: redis.Redis
) -> None:
    tags = [f"tag-{queue}-{i}" for i in range(3)]
    held = {
        tags[0]: json.dumps(['{"body": "x"}', "", queue]),
        tags[1]: json.dumps(['{"body": "]\\""}', queue, queue]),
        # The row lane's record: no space after the commas (worker/lane/transport.py).
        tags[2]: '{"body":"y"},"", "' + row_queue(queue) + '"]',
    }
    redis_client.hset(UNACKED_KEY, mapping=held)
    try:
        text = scrape(exporter.port)
    finally:
        redis_client.hdel(UNACKED_KEY, *tags)
    assert value(text, JOBS_HELD, queue) == 2
    assert value(text, JOBS_HELD, row_queue(queue)) == 1


def test_live_workers_from_heartbeats(
    exporter: Exporter, queue: str, redis_client: redis.Redis
) -> None:
    now = time.time()
    keys = []
    for pid in (101, 102):
        state = WorkerState(
            hostname=f"w-{queue}", pid=pid, queues=[queue, row_queue(queue)], pool="prefork",
            model_name="m", model_version="1", provider="cpu", device="cpu",
            started_at=now, updated_at=now,
        )  # fmt: skip
        key = worker_state_key(state.hostname, pid)
        redis_client.set(key, state.model_dump_json(), ex=30)
        keys.append(key)
    try:
        text = scrape(exporter.port)
    finally:
        redis_client.delete(*keys)
    assert value(text, WORKERS_LIVE, queue) == 2
    assert value(text, WORKERS_LIVE, row_queue(queue)) == 2
    assert value(scrape(exporter.port), WORKERS_LIVE, queue) == 0


def test_cli_serves_every_queue_and_passes_promtool(redis_url: str, tmp_path) -> None:
    port = free_port()
    args = [sys.executable, "-m", "producer", "metrics", "--port", str(port), "--addr", "127.0.0.1"]
    proc = CeleryProcess(args, celery_env(redis_url), tmp_path / "exporter.log").start()
    try:
        wait_http(proc, f"http://127.0.0.1:{port}/metrics")
        text = scrape(port)
    finally:
        proc.stop()
    assert {labels["queue"] for labels, _ in samples(text, QUEUE_DEPTH)} == set(all_queues())
    checked = promtool_check_metrics(text)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    wait_for("the exporter to stop", lambda: not proc.running)
    assert subprocess.run([sys.executable, "-m", "producer", "metrics", "--help"]).returncode == 0
