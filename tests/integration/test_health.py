"""The beat-scheduled health task gathers live workers and queue depths into Redis."""

from __future__ import annotations

import json
import time
import uuid

import pytest
import redis

from contract.names import HEALTH_REPORT_KEY, QUEUE_CPU, QUEUE_GPU, row_queue
from contract.schemas import HealthReport
from producer.client import Client
from stack.processes import beat_process, celery_env
from tests.support import RunningWorker, TrainedModel

pytestmark = pytest.mark.integration


def test_beat_publishes_a_report_naming_the_live_worker(
    redis_url: str, redis_client: redis.Redis, cpu_worker: RunningWorker,
    trained_model: TrainedModel, producer_settings, tmp_path,
) -> None:  # fmt: skip
    with Client(producer_settings) as client:
        ids = [client.submit(r.tolist()) for r in trained_model.X_test[:10]]
        list(client.iter_finished(ids))
        client.send("inference.predict", {"features": [1.0]})  # one failure to count

    # The shared worker serves the CPU queues and no worker of this session serves the GPU
    # ones, so one job left waiting on inference.gpu decides the status: "degraded", whatever
    # other tests left on the CPU queues.
    waiting = json.dumps({"health-test": uuid.uuid4().hex})
    redis_client.lpush(QUEUE_GPU, waiting)
    started = time.time()
    env = celery_env(redis_url, health_interval_s=1, model_dir=trained_model.model_dir)
    beat = beat_process(env, tmp_path / "beat.log", tmp_path / "beat-schedule").start()
    try:
        report = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            raw = redis_client.get(HEALTH_REPORT_KEY)
            if raw is not None:
                candidate = HealthReport.model_validate_json(raw)
                mine = [w for w in candidate.workers if w.hostname == cpu_worker.hostname]
                if candidate.generated_at > started and mine and mine[0].jobs_failed >= 1:
                    report = candidate
                    break
            time.sleep(0.2)
        assert report is not None, beat.log_tail()
    finally:
        beat.stop()
        redis_client.lrem(QUEUE_GPU, 0, waiting)

    me = next(w for w in report.workers if w.hostname == cpu_worker.hostname)
    assert me.processes == 2
    assert me.queues == [QUEUE_CPU, row_queue(QUEUE_CPU)]
    assert me.pool == "prefork"
    assert me.model_version == trained_model.manifest.version
    assert me.provider == "CPUExecutionProvider"
    assert me.jobs_done >= 10
    assert me.jobs_failed >= 1
    assert me.latency.count >= 10 and me.latency.p50_ms is not None
    assert me.latency.p50_ms <= me.latency.p95_ms <= me.latency.p99_ms  # type: ignore[operator]
    assert me.uptime_s > 0
    assert set(report.queue_depths) == {
        QUEUE_CPU, row_queue(QUEUE_CPU), QUEUE_GPU, row_queue(QUEUE_GPU)
    }  # fmt: skip
    # The 10 single-row jobs went through the row lane, in batches it counted.
    assert sum(me.batch_sizes.values()) >= 1
    # Power-of-two buckets, in size order (the shared worker has served other tests too).
    lows = [int(k.split("-")[0]) for k in me.batch_sizes]
    assert lows == sorted(lows) and all(low & (low - 1) == 0 for low in lows)
    # What the status rests on: no live worker consumes the queue the job waits on.
    assert not [w.hostname for w in report.workers if QUEUE_GPU in w.queues]
    assert report.queue_depths[QUEUE_GPU] >= 1
    assert report.status == "degraded"
    # The report expires unless beat keeps refreshing it.
    assert 0 < redis_client.ttl(HEALTH_REPORT_KEY) <= 4
    assert json.loads(redis_client.get(HEALTH_REPORT_KEY))["workers"]
