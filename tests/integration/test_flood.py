"""A producer flood cannot sink Redis: the queue-depth limit holds, with what each queued job
costs Redis measured, every accepted job is served, and `score` waits for room instead of
failing."""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis

from contract.errors import QueueFull
from contract.names import TASK_PREDICT, row_queue
from producer.bulk import PREDICTION_COLUMN, score_csv
from producer.client import Client
from producer.settings import ProducerSettings
from stack.embedded_redis import EmbeddedRedis
from stack.processes import celery_env, wait_ready, worker_process
from tests.support import TrainedModel

pytestmark = pytest.mark.integration

# Suite-sized; INFERENCE_TEST_FLOOD_JOBS=1000000 INFERENCE_TEST_FLOOD_LIMIT=100000 for the
# figures in docs/delivery.md.
LIMIT = int(os.environ.get("INFERENCE_TEST_FLOOD_LIMIT", "2000"))
FLOOD = int(os.environ.get("INFERENCE_TEST_FLOOD_JOBS", "20000"))


def test_a_flood_stops_at_the_limit_and_every_accepted_job_is_served(
    trained_model: TrainedModel, tmp_path: Path
) -> None:
    queue = f"flood.{uuid.uuid4().hex[:8]}"
    rows = np.tile(trained_model.X_test, (FLOOD // len(trained_model.X_test) + 1, 1))[:FLOOD]
    with EmbeddedRedis() as server:
        probe = redis.Redis.from_url(server.url)
        settings = ProducerSettings(redis_url=server.url, max_queue_depth=LIMIT, wait_timeout_s=60)
        with Client(settings) as client:
            before = int(probe.info("memory")["used_memory"])
            accepted: list[str] = []
            refused = 0
            # No worker yet: the producer outruns the workers by all of it.
            for at in range(0, FLOOD, 100):
                kwargs = [{"features": r.tolist()} for r in rows[at : at + 100]]
                try:
                    accepted += client.send_many(TASK_PREDICT, kwargs, queue)
                except QueueFull:
                    refused += len(kwargs)
            depth = int(probe.llen(row_queue(queue)))
            peak = int(probe.info("memory")["used_memory_peak"])
            per_job = (int(probe.info("memory")["used_memory"]) - before) / max(depth, 1)
            print(
                f"\nflood of {FLOOD}: accepted {len(accepted)}, refused {refused}, queue depth "
                f"{depth} (limit {LIMIT}); Redis memory per queued single-row job {per_job:.0f} B, "
                f"peak {peak / 2**20:.1f} MiB"
            )
            assert depth == len(accepted) == LIMIT and refused == FLOOD - LIMIT

            name = f"flood-{queue}@tests"
            env = celery_env(server.url, model_dir=trained_model.model_dir)
            worker = worker_process(env, tmp_path / "w.log", queue=queue, name=name).start()
            try:
                wait_ready(worker, probe, name, 1)
                finished = dict((s.task_id, s) for s in client.iter_finished(accepted, timeout=60))
            finally:
                worker.stop()
            probe.close()
    assert len(finished) == LIMIT
    assert {s.state for s in finished.values()} == {"SUCCESS"}
    got = np.array([finished[t].result["prediction"] for t in accepted])  # type: ignore[index]
    np.testing.assert_allclose(got, trained_model.reference(rows[:LIMIT]), atol=1e-6)


def test_score_waits_for_room_in_a_full_queue_instead_of_failing(
    trained_model: TrainedModel, tmp_path: Path
) -> None:
    queue = f"flood.{uuid.uuid4().hex[:8]}"
    header = ",".join(trained_model.manifest.feature_names)
    rows = np.tile(trained_model.X_test, (3_000 // len(trained_model.X_test) + 1, 1))[:3_000]
    src, dst = tmp_path / "in.csv", tmp_path / "out.csv"
    src.write_text(header + "\n" + "\n".join(",".join(map(repr, r.tolist())) for r in rows) + "\n")
    with EmbeddedRedis() as server:
        settings = ProducerSettings(redis_url=server.url, max_queue_depth=2, wait_timeout_s=60)
        with Client(settings) as filler:
            # Another producer has filled the queue to its limit, and no worker runs yet.
            filler.send_many(TASK_PREDICT, [{"features": rows[0].tolist()}] * 2, queue)
            with pytest.raises(QueueFull):
                filler.send(TASK_PREDICT, {"features": rows[0].tolist()}, queue)
        errors: list[BaseException] = []

        def score() -> None:
            with Client(settings) as client:
                try:
                    score_csv(client, src, dst, queue=queue, chunk_rows=500, progress=False)
                except BaseException as exc:
                    errors.append(exc)

        scorer = threading.Thread(target=score)
        scorer.start()
        time.sleep(1.5)
        assert scorer.is_alive() and not errors and not dst.exists()  # waiting, not failed
        name = f"flood-{queue}@tests"
        env = celery_env(server.url, model_dir=trained_model.model_dir)
        worker = worker_process(env, tmp_path / "w.log", queue=queue, name=name).start()
        try:
            scorer.join(90)
        finally:
            worker.stop()
    assert not scorer.is_alive() and not errors, errors
    lines = dst.read_text().splitlines()
    assert lines[0] == f"{header},{PREDICTION_COLUMN}" and len(lines) == 3_001
    got = np.array([float(line.rsplit(",", 1)[1]) for line in lines[1:]])
    np.testing.assert_allclose(got, trained_model.reference(rows), atol=1e-5)
