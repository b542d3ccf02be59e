"""Redis failover under Sentinel: a primary, a replica and three sentinels (real processes);
the primary SIGKILLed while single-row jobs stream in and a file is scored. Workers and
producers follow the new primary without a restart; with the replica-wait options (enqueue
and results confirmed by a replica) no job is lost, the old primary coming back as a replica.
The producer's own resending of lost jobs is off: what is measured is what Redis and the
workers keep."""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis

from contract.errors import InferenceError
from contract.names import TASK_PREDICT, UNACKED_KEY
from producer.bulk import PREDICTION_COLUMN, score_csv
from producer.client import Client
from producer.settings import ProducerSettings
from stack.embedded_sentinel import SentinelCluster
from stack.processes import celery_env, worker_process
from tests.support import TrainedModel

pytestmark = pytest.mark.integration

# Suite-sized; the figures in docs/delivery.md come from 20,000 and 200,000.
JOBS = int(os.environ.get("INFERENCE_TEST_SENTINEL_JOBS", "2000"))
SCORE_ROWS = int(os.environ.get("INFERENCE_TEST_SENTINEL_ROWS", "20000"))


def finished(settings: ProducerSettings, ids: list[str], within_s: float) -> set[str]:
    """The ids among `ids` with a result, once all have one or `within_s` has passed."""
    done: set[str] = set()
    deadline = time.monotonic() + within_s
    with Client(settings) as client:
        while len(done) < len(ids) and time.monotonic() < deadline:
            waiting = [t for t in ids if t not in done]
            for at in range(0, len(waiting), 1_000):
                chunk = client.statuses(waiting[at : at + 1_000])
                done.update(s.task_id for s in chunk if s.ready)
            time.sleep(0.5)
    return done


def run_failover(trained: TrainedModel, tmp: Path, replicas: int) -> dict[str, float]:
    rows = np.tile(trained.X_test, (SCORE_ROWS // len(trained.X_test) + 1, 1))[:SCORE_ROWS]
    header = ",".join(trained.manifest.feature_names)
    src, dst = tmp / "in.csv", tmp / "out.csv"
    src.write_text(header + "\n" + "\n".join(",".join(map(repr, r.tolist())) for r in rows) + "\n")
    with SentinelCluster() as cluster:
        common = {"sentinel_master": cluster.master}
        env = celery_env(
            cluster.url, model_dir=trained.model_dir, result_replicas=replicas, **common
        )
        name = f"sentinel-{uuid.uuid4().hex[:6]}@tests"
        worker = worker_process(
            env, tmp / "w.log", queue="inference.cpu", name=name, concurrency=2
        ).start()
        settings = ProducerSettings(
            redis_url=cluster.url, wait_timeout_s=90, track_sent_jobs=0,
            enqueue_replicas=replicas, chunk_rows=1_000, **common,
        )  # fmt: skip
        sent: list[tuple[str, float]] = []
        errors: list[BaseException] = []
        kill_at = [0.0]

        def stream() -> None:
            with Client(settings) as client:
                for at in range(0, JOBS, 20):
                    batch = [{"features": r.tolist()} for r in rows[at : at + 20]]
                    ids = [str(uuid.uuid4()) for _ in batch]
                    while True:
                        try:
                            client.send_many(TASK_PREDICT, batch, task_ids=ids)
                            break
                        except (InferenceError, redis.RedisError):
                            # Failing over, or not confirmed by a replica: send again, under
                            # the same ids (a second copy changes no result).
                            time.sleep(0.2)
                    sent.extend((task_id, time.monotonic()) for task_id in ids)
                    time.sleep(0.01)

        def score() -> None:
            with Client(settings) as client:
                try:
                    score_csv(client, src, dst, progress=False, max_in_flight=4)
                except BaseException as exc:
                    errors.append(exc)

        try:
            with Client(settings) as probe:
                deadline = time.monotonic() + 60
                while probe.model_info() is None:  # the worker has started
                    assert worker.running and time.monotonic() < deadline, worker.log_tail()
                    time.sleep(0.1)
            threads = [threading.Thread(target=stream), threading.Thread(target=score)]
            for thread in threads:
                thread.start()
            while len(sent) < JOBS // 3:
                time.sleep(0.01)
            cluster.kill_primary()
            kill_at[0] = time.monotonic()
            failover_s = cluster.wait_failover()
            if replicas:
                # Back as a replica of the new primary: until then nothing confirms a write.
                cluster.restart_old_primary()
            for thread in threads:
                thread.join(120)
            done = finished(settings, [task_id for task_id, _ in sent], within_s=60)
            with Client(settings) as client:  # where the jobs without a result are
                queued = int(client.broker.llen("inference.cpu.rows"))
                held = int(client.broker.hlen(UNACKED_KEY))
        finally:
            worker.stop()
    lost = [task_id for task_id, _ in sent if task_id not in done]
    after = [task_id for task_id, at in sent if at > kill_at[0] and task_id in done]
    resumed_s = min((at for _, at in sent if at > kill_at[0]), default=float("nan")) - kill_at[0]
    scored = dst.exists() and len(dst.read_text().splitlines()) == SCORE_ROWS + 1
    figures = {
        "sent": len(sent), "lost": len(lost), "failover_s": failover_s,
        "first_send_after_kill_s": resumed_s, "served_after_kill": len(after),
        "scored": float(scored), "queued_at_end": queued, "held_at_end": held,
    }  # fmt: skip
    print(f"\nreplica wait {replicas}: {figures}; score errors {errors}")
    assert len(sent) == JOBS and after, "service did not resume after the failover"
    if replicas:
        # Every job and chunk was on a replica before its send returned: nothing is lost,
        # and the file is scored whole.
        assert not errors, errors
        assert scored and dst.read_text().splitlines()[0] == f"{header},{PREDICTION_COLUMN}"
    return figures


def test_with_replica_waits_a_failover_loses_no_job(
    trained_model: TrainedModel, tmp_path: Path
) -> None:
    figures = run_failover(trained_model, tmp_path, replicas=1)
    assert figures["lost"] == 0


def test_without_replica_waits_service_follows_the_new_primary(
    trained_model: TrainedModel, tmp_path: Path
) -> None:
    """Redis replicates asynchronously: what the primary had not passed on (jobs, a chunk of
    the file, whose `score` then times out) is lost. Printed, not asserted: it depends on the
    instant of the kill. Jobs sent after the failover are served. The old primary stays down
    here (docs/delivery.md: restarted at once, it takes writes that are then lost)."""
    run_failover(trained_model, tmp_path, replicas=0)
