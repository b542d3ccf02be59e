"""Nothing lost when a worker is killed or stopped, or when Redis restarts."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import redis

from contract.names import TASK_PREDICT
from producer.bulk import PREDICTION_COLUMN, score_csv
from producer.client import Client
from producer.settings import ProducerSettings
from stack.embedded_redis import EmbeddedRedis, free_port
from stack.processes import CeleryProcess, celery_env, wait_ready, worker_process
from tests.support import TrainedModel
from worker.health import live_states

pytestmark = pytest.mark.integration

JOBS = 3_000
# Short limits so a dead worker's unacknowledged jobs come back within seconds.
FAST_RECOVERY = {
    "visibility_timeout_s": 10,
    "task_time_limit_s": 1,
    "task_soft_time_limit_s": 0.5,
    "restore_interval_s": 1,
    "heartbeat_s": 0.3,
    "held_ttl_s": 2,
}


def start_worker(env: dict[str, str], tmp: Path, queue: str, name: str, c: int) -> CeleryProcess:
    return worker_process(env, tmp / f"{name}.log", queue=queue, name=name, concurrency=c).start()


def processes_done(client: redis.Redis, hostname: str) -> int:
    return sum(state.jobs_done for state in live_states(client, hostname=hostname))


def stream_with_interruption(
    redis_url: str, trained: TrainedModel, tmp: Path, interrupt: str, **settings: object
) -> None:
    queue = f"faults.{uuid.uuid4().hex[:8]}"
    env = celery_env(redis_url, model_dir=trained.model_dir, **settings)
    a_name, b_name = f"a-{queue}@tests", f"b-{queue}@tests"
    a = start_worker(env, tmp, queue, a_name, 2)
    b = start_worker(env, tmp, queue, b_name, 1)
    probe = redis.Redis.from_url(redis_url)
    rows = np.tile(trained.X_test, (JOBS // len(trained.X_test) + 1, 1))[:JOBS]
    try:
        wait_ready(a, probe, a_name, 2)
        wait_ready(b, probe, b_name, 1)
        with Client(
            ProducerSettings(redis_url=redis_url, wait_timeout_s=60, lost_check_s=0.5)
        ) as client:
            ids = [client.send(TASK_PREDICT, {"features": r.tolist()}, queue) for r in rows]
            finished = {}
            a_done_before = 0
            for status in client.iter_finished(ids, timeout=60):
                finished[status.task_id] = status
                if len(finished) == JOBS // 3 and a.running:
                    a_done_before = processes_done(probe, a_name)
                    if interrupt == "kill":
                        os.killpg(a.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
                    else:
                        a.signal(signal.SIGTERM)
            a_code = a.wait(timeout_s=30) if interrupt == "term" else a.stop()
            b_done = processes_done(probe, b_name)
    finally:
        a.stop()
        b.stop()
        probe.close()

    states = Counter(s.state for s in finished.values())
    hosts = Counter(s.result["hostname"] for s in finished.values() if s.result)
    print(
        f"\n{interrupt}: sent {JOBS}, finished {len(finished)} {dict(states)}, results by worker "
        f"{dict(hosts)}; jobs run by A before the {interrupt} >= {a_done_before}, by B {b_done}"
    )
    assert len(finished) == JOBS and states == {"SUCCESS": JOBS}
    got = np.array([finished[t].result["prediction"] for t in ids])  # type: ignore[index]
    np.testing.assert_allclose(got, trained.reference(rows), atol=1e-6)
    assert hosts[b_name] > 0 and hosts[a_name] > 0
    if interrupt == "term":
        assert a_code == 0  # warm shutdown: finished or returned its jobs, then exited


def test_sigkill_of_a_worker_loses_no_job(
    redis_url: str, trained_model: TrainedModel, tmp_path: Path
) -> None:
    stream_with_interruption(redis_url, trained_model, tmp_path, "kill", **FAST_RECOVERY)


def test_sigterm_of_a_worker_loses_no_job(
    redis_url: str, trained_model: TrainedModel, tmp_path: Path
) -> None:
    # Default visibility timeout (10 min): only a clean hand-back can deliver in time.
    stream_with_interruption(redis_url, trained_model, tmp_path, "term", heartbeat_s=0.3)


def test_redis_restart_during_bulk_scoring_loses_no_row(
    trained_model: TrainedModel, tmp_path: Path
) -> None:
    port = free_port()
    data = tmp_path / "redis-data"
    data.mkdir()
    server = EmbeddedRedis(port, appendonly=True, data_dir=data).start()
    # Limits long enough for a result write to wait out the restart.
    env = celery_env(
        server.url, model_dir=trained_model.model_dir, visibility_timeout_s=12,
        task_time_limit_s=2, task_soft_time_limit_s=1.5, restore_interval_s=1, heartbeat_s=0.3,
        held_ttl_s=3,
    )  # fmt: skip
    name = f"restart-{uuid.uuid4().hex[:6]}@tests"
    worker = start_worker(env, tmp_path, "inference.cpu", name, 2)
    rows = np.tile(trained_model.X_test, (20_000 // len(trained_model.X_test) + 1, 1))[:20_000]
    src, dst = tmp_path / "in.csv", tmp_path / "out.csv"
    header = ",".join(trained_model.manifest.feature_names)
    src.write_text(
        header + "\n" + "\n".join(",".join(repr(float(v)) for v in r) for r in rows) + "\n"
    )
    errors: list[BaseException] = []
    try:
        probe = redis.Redis.from_url(server.url)
        wait_ready(worker, probe, name, 2)
        probe.close()
        settings = ProducerSettings(redis_url=server.url, wait_timeout_s=60, lost_check_s=0.5)
        client = Client(settings)

        def score() -> None:
            try:
                score_csv(client, src, dst, chunk_rows=250, max_in_flight=4, progress=False)
            except BaseException as exc:
                errors.append(exc)

        scorer = threading.Thread(target=score)
        scorer.start()
        time.sleep(1.0)
        server.stop()  # SIGTERM: Redis writes its AOF and exits, as in a restart
        time.sleep(1.0)
        server.start()
        scorer.join(120)
        assert not scorer.is_alive(), "scoring never finished after the restart"
        client.close()
    finally:
        worker.stop()
        server.stop()
    assert not errors, errors
    lines = dst.read_text().splitlines()
    assert lines[0] == f"{header},{PREDICTION_COLUMN}"
    got = np.array([float(line.rsplit(",", 1)[1]) for line in lines[1:]])
    np.testing.assert_allclose(got, trained_model.reference(rows), atol=1e-6)
