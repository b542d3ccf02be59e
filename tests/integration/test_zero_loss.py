"""Nothing lost with any client: a stock Celery client (`send_task` by name), default settings.

Each run: 3,000 single-row jobs queued for two workers at once, the whole of worker A (main
process and pool) SIGKILLed once a third have been taken, while it holds jobs in hand, worker B
left to finish. Every job must
have its result within 60 s of the kill, on Celery's own queue as on the row lane. Result
writes are counted from Redis' keyspace notifications, so a job run twice shows as such.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from celery import Celery

from contract.names import TASK_PREDICT, result_key, row_queue
from stack.embedded_redis import EmbeddedRedis
from stack.processes import CeleryProcess, celery_env, wait_ready, worker_process
from tests.support import TrainedModel

pytestmark = pytest.mark.integration

JOBS = int(os.environ.get("INFERENCE_TEST_ZERO_LOSS_JOBS", "3000"))
WITHIN_S = 60.0


@pytest.fixture
def server() -> Iterator[EmbeddedRedis]:
    """A Redis of this test's own: it turns on keyspace notifications."""
    with EmbeddedRedis() as srv:
        redis.Redis.from_url(srv.url).config_set("notify-keyspace-events", "K$")
        yield srv


class WriteCounter:
    """Counts SETs of result documents, per task id, from keyspace notifications."""

    def __init__(self, url: str) -> None:
        self.writes: Counter[str] = Counter()
        self._pubsub = redis.Redis.from_url(url).pubsub(ignore_subscribe_messages=True)
        self._pubsub.psubscribe(f"__keyspace@0__:{result_key('*')}")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._stop = threading.Event()
        self._thread.start()

    def _run(self) -> None:
        prefix = len(f"__keyspace@0__:{result_key('')}")
        while not self._stop.is_set():
            message = self._pubsub.get_message(timeout=0.2)
            if message and message["data"] == b"set":
                self.writes[message["channel"].decode()[prefix:]] += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._pubsub.close()


def results(client: redis.Redis, ids: list[str]) -> dict[str, dict[str, object]]:
    found = {}
    for at in range(0, len(ids), 500):
        chunk = ids[at : at + 500]
        for task_id, raw in zip(chunk, client.mget([result_key(t) for t in chunk]), strict=True):
            if raw is not None:
                doc = json.loads(raw)
                if doc["status"] in ("SUCCESS", "FAILURE", "REVOKED"):
                    found[task_id] = doc
    return found


def start(env: dict[str, str], tmp: Path, queue: str, name: str, c: int) -> CeleryProcess:
    return worker_process(env, tmp / f"{name}.log", queue=queue, name=name, concurrency=c).start()


@pytest.mark.parametrize("lane", [False, True], ids=["celery-queue", "row-lane"])
def test_sigkill_of_a_whole_worker_loses_no_stock_client_job(
    server: EmbeddedRedis, trained_model: TrainedModel, tmp_path: Path, lane: bool
) -> None:
    queue = f"loss.{uuid.uuid4().hex[:8]}"
    target = row_queue(queue) if lane else queue
    env = celery_env(server.url, model_dir=trained_model.model_dir)  # default settings
    a_name, b_name = f"a-{queue}@tests", f"b-{queue}@tests"
    probe = redis.Redis.from_url(server.url)
    sender = Celery("stock-sender", broker=server.url)
    sender.conf.update(task_serializer="json", accept_content=["json"])
    counter = WriteCounter(server.url)
    rows = np.tile(trained_model.X_test, (JOBS // len(trained_model.X_test) + 1, 1))[:JOBS]
    ids = [str(uuid.uuid4()) for _ in range(JOBS)]
    a = start(env, tmp_path, queue, a_name, 2)
    b = start(env, tmp_path, queue, b_name, 1)
    try:
        wait_ready(a, probe, a_name, 2)
        wait_ready(b, probe, b_name, 1)
        # Both workers paused while the jobs are queued, then let go together: they drain one
        # backlog, so A has jobs in hand (taken, not yet acknowledged) when it is killed.
        for worker in (a, b):
            os.killpg(worker.proc.pid, signal.SIGSTOP)  # type: ignore[union-attr]
        for task_id, row in zip(ids, rows, strict=True):
            sender.send_task(
                TASK_PREDICT, kwargs={"features": row.tolist()}, queue=target, task_id=task_id
            )
        for worker in (a, b):
            os.killpg(worker.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
        while probe.llen(target) > JOBS * 2 // 3:
            assert a.running and b.running
            time.sleep(0.002)
        os.killpg(a.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
        killed_at = time.monotonic()
        done = results(probe, ids)
        while len(done) < JOBS and time.monotonic() - killed_at < WITHIN_S:
            time.sleep(0.25)
            done = results(probe, ids)
        last_s = time.monotonic() - killed_at
        b_log = b.log_tail(1_000_000)
    finally:
        a.stop()
        b.stop()
        counter.close()
        probe.close()
        sender.close()

    states = Counter(str(doc["status"]) for doc in done.values())
    twice = sum(1 for task_id in ids if counter.writes[task_id] > 1)
    handed_back = sum(int(n) for n in re.findall(r"handed back (\d+) job", b_log))
    by_host = Counter(str(doc["result"]["hostname"]) for doc in done.values())  # type: ignore[index]
    print(
        f"\n{target}: sent {JOBS}, results {len(done)} {dict(states)} within {last_s:.1f} s of "
        f"the kill; by worker {dict(by_host)}; handed back from A: {handed_back}; "
        f"written more than once (run twice): {twice}"
    )
    assert len(done) == JOBS, f"{JOBS - len(done)} job(s) lost:\n{b.log_tail()}"
    assert states == {"SUCCESS": JOBS}
    got = np.array([done[t]["result"]["prediction"] for t in ids])  # type: ignore[index]
    np.testing.assert_allclose(got, trained_model.reference(rows), atol=1e-6)


def test_a_redis_restart_mid_stream_loses_no_stock_client_job(
    trained_model: TrainedModel, tmp_path: Path
) -> None:
    """Redis SIGTERMed (it writes its AOF) and started again while a worker drains stock
    clients' jobs on both paths: every job has its result within 60 s of Redis being back."""
    data = tmp_path / "redis-data"
    data.mkdir()
    server = EmbeddedRedis(appendonly=True, data_dir=data).start()
    queue = f"restart.{uuid.uuid4().hex[:8]}"
    env = celery_env(server.url, model_dir=trained_model.model_dir)  # default settings
    name = f"r-{queue}@tests"
    sender = Celery("stock-sender", broker=server.url)
    sender.conf.update(task_serializer="json", accept_content=["json"])
    rows = np.tile(trained_model.X_test, (JOBS // len(trained_model.X_test) + 1, 1))[:JOBS]
    ids = [str(uuid.uuid4()) for _ in range(JOBS)]
    # Half to Celery's queue, half to the row lane.
    for i, (task_id, row) in enumerate(zip(ids, rows, strict=True)):
        target = queue if i % 2 else row_queue(queue)
        sender.send_task(
            TASK_PREDICT, kwargs={"features": row.tolist()}, queue=target, task_id=task_id
        )
    sender.close()
    worker = start(env, tmp_path, queue, name, 2)
    probe = redis.Redis.from_url(server.url)
    try:
        while len(results(probe, ids)) < JOBS // 3:
            assert worker.running
            time.sleep(0.02)
        server.stop()  # SIGTERM: Redis writes its AOF and exits, as in a restart
        time.sleep(1.0)
        server.start()
        back_at = time.monotonic()
        done = results(probe, ids)
        while len(done) < JOBS and time.monotonic() - back_at < WITHIN_S:
            time.sleep(0.25)
            done = results(probe, ids)
        last_s = time.monotonic() - back_at
        log = worker.log_tail(1_000_000)
    finally:
        worker.stop()
        probe.close()
        server.stop()
    states = Counter(str(doc["status"]) for doc in done.values())
    handed_back = sum(int(n) for n in re.findall(r"handed back (\d+) job", log))
    print(
        f"\nrestart: sent {JOBS} to {queue} and {row_queue(queue)}, results {len(done)} "
        f"{dict(states)} within {last_s:.1f} s of Redis being back; handed back {handed_back}"
    )
    assert len(done) == JOBS, f"{JOBS - len(done)} job(s) lost:\n{worker.log_tail()}"
    assert states == {"SUCCESS": JOBS}
