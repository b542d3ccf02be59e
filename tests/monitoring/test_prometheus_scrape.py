"""Debian's `prometheus` binary scrapes a real worker and the queue exporter; the counts
read back through Prometheus' HTTP API equal the jobs sent."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from contract.metrics import JOBS_TOTAL, QUEUE_DEPTH, ROWS_TOTAL, WORKERS_LIVE
from contract.names import TASK_PREDICT, TASK_PREDICT_BATCH
from producer.client import Client
from producer.exporter import Exporter
from producer.settings import ProducerSettings
from stack.embedded_redis import free_port
from stack.processes import CeleryProcess, wait_http
from tests.monitoring.support import MetricsWorker, binary, wait_for, write
from tests.support import TrainedModel

pytestmark = pytest.mark.integration


def query(port: int, promql: str) -> dict[tuple[str, ...], float]:
    """An instant query's vector, by the values of its labels (sorted by label name)."""
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return {
        tuple(v for _, v in sorted(r["metric"].items())): float(r["value"][1])
        for r in body["data"]["result"]
    }


@pytest.fixture
def exporter(redis_url: str, metrics_worker: MetricsWorker) -> Iterator[Exporter]:
    queues = [metrics_worker.queue, metrics_worker.rows]
    exp = Exporter(ProducerSettings(redis_url=redis_url), 0, "127.0.0.1", queues=queues)
    try:
        yield exp.start()
    finally:
        exp.close()


def test_prometheus_reads_the_counts_of_a_real_worker_and_the_exporter(
    metrics_worker: MetricsWorker,
    exporter: Exporter,
    redis_url: str,
    trained_model: TrainedModel,
    tmp_path: Path,
) -> None:
    prometheus = binary("prometheus")
    mw = metrics_worker
    config = write(
        tmp_path / "prometheus.yml",
        f"""
global: {{scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: workers
    static_configs: [{{targets: ["127.0.0.1:{mw.port}"]}}]
  - job_name: queues
    static_configs: [{{targets: ["127.0.0.1:{exporter.port}"]}}]
""",
    )
    port = free_port()
    args = [
        prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]  # fmt: skip
    server = CeleryProcess(args, {}, tmp_path / "prometheus.log").start()
    rows = trained_model.X_test[:25].astype(float).tolist()
    try:
        wait_http(server, f"http://127.0.0.1:{port}/-/ready", timeout_s=60)
        with Client(ProducerSettings(redis_url=redis_url, wait_timeout_s=30)) as client:
            ids = client.submit_many(rows, mw.queue)
            ids += [client.submit_batch(rows[:4], mw.queue) for _ in range(3)]
            ids.append(client.send(TASK_PREDICT, {"features": [1.0]}, mw.queue))
            for task_id in ids:
                wait_for(f"{task_id} to end", lambda t=task_id: client.status(t).ready)
        jobs = f'sum by (queue, task, outcome) ({JOBS_TOTAL}{{queue=~"{mw.queue}.*"}})'
        expected = {
            (mw.rows, TASK_PREDICT, "success"): len(rows),
            (mw.rows, TASK_PREDICT, "failure"): 1,
            (mw.queue, TASK_PREDICT_BATCH, "success"): 3,
        }
        # outcome, queue, task: the labels in name order.
        want = {(o, q, t): float(n) for (q, t, o), n in expected.items()}
        wait_for("Prometheus to scrape the counts", lambda: query(port, jobs) == want)
        rows_ok = f'sum({ROWS_TOTAL}{{queue=~"{mw.queue}.*", outcome="success"}})'
        assert query(port, rows_ok) == {(): float(len(rows) + 12)}
        # The exporter's figures, once Prometheus has scraped it since the jobs ended.
        live = f'{WORKERS_LIVE}{{queue="{mw.rows}"}}'
        wait_for("the exporter's live workers", lambda: list(query(port, live).values()) == [2.0])
        depth = f'{QUEUE_DEPTH}{{queue=~"{mw.queue}.*"}}'
        wait_for("the exporter's depths", lambda: sorted(query(port, depth).values()) == [0, 0])
        assert sorted(query(port, "up").values()) == [1.0, 1.0]
    finally:
        server.stop()
