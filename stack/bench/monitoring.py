"""What the worker's monitoring costs (M1): sustained single-row throughput of a worker with
its metrics port and task events on (`INFERENCE_METRICS_PORT`, `-E`), against one with
both off, in one run.

Two workers are started for it, beside whatever else serves, each on a queue of its own
and with the same number of processes; the rounds alternate between them, so that a burst
of load from elsewhere on the machine does not land on one side of the ratio only, and
only one of them has work at a time. Nobody consumes the task events: the worker pays for
building and publishing them, whoever listens.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import redis
from numpy.typing import NDArray

from contract.metrics import JOBS_TOTAL
from contract.names import TASK_PREDICT, row_queue
from producer.client import Client
from stack.bench.jobs import SUSTAINED_ROUNDS, Windowed, windowed
from stack.embedded_redis import free_port
from stack.processes import CeleryProcess, celery_env, wait_ready, worker_process

READY_TIMEOUT_S = 120.0


@contextlib.contextmanager
def _worker(
    client: Client, model_dir: Path, log_dir: Path, side: str, processes: int, on: bool
) -> Iterator[tuple[str, int | None]]:
    """A worker for one side: (its queue, its metrics port or None)."""
    queue = f"bench.monitoring-{side}.{os.getpid()}"
    hostname = f"bench-monitoring-{side}-{os.getpid()}@bench"
    port = free_port() if on else None
    extra: dict[str, object] = {"metrics_port": port, "metrics_addr": "127.0.0.1"} if on else {}
    env = celery_env(
        client.settings.redis_url,
        model_dir=model_dir.resolve(),
        intra_op_threads=1,
        **extra,
    )
    for name in ("INFERENCE_BROKER_URL", "INFERENCE_RESULT_BACKEND", "INFERENCE_METRICS_PORT"):
        if not (on and name == "INFERENCE_METRICS_PORT"):
            env.pop(name, None)
    proc: CeleryProcess = worker_process(
        env,
        log_dir / f"bench-monitoring-{side}.log",
        queue=queue,
        name=hostname,
        concurrency=processes,
        events=on,
    )
    proc.start()
    try:
        probe = redis.Redis.from_url(client.settings.redis_url)
        try:
            wait_ready(proc, probe, hostname, processes, timeout_s=READY_TIMEOUT_S)
        finally:
            probe.close()
        yield queue, port
    finally:
        proc.stop()


def counted(port: int, queue: str) -> int:
    """Jobs the metrics of the worker on `port` count on `queue`'s row queue."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return int(
        sum(
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == JOBS_TOTAL and s.labels.get("queue") == row_queue(queue)
        )
    )


def monitoring_overhead(
    client: Client,
    model_dir: Path | None,
    rows: NDArray[np.float64],
    window: int,
    processes: int,
    log_dir: Path,
    say: Callable[[str], None],
    rounds: int = SUSTAINED_ROUNDS,
) -> dict[str, Any]:
    if model_dir is None:
        return {"available": False, "reason": "no local model directory to start workers with"}
    features = rows.tolist()
    with (
        _worker(client, model_dir, log_dir, "off", processes, on=False) as (off_queue, _),
        _worker(client, model_dir, log_dir, "on", processes, on=True) as (on_queue, port),
    ):
        queues = {"off": off_queue, "on": on_queue}
        arms = {"off": Windowed(), "on": Windowed()}
        bounds = np.linspace(0, len(features), rounds + 1).astype(int)
        for lo, hi in itertools.pairwise(bounds.tolist()):
            for side, total in arms.items():

                def send(r: range, q: str = queues[side]) -> list[str]:
                    return client.send_many(TASK_PREDICT, [{"features": features[i]} for i in r], q)

                total.add(windowed(client, send, range(lo, hi), window))
        assert port is not None
        seen = counted(port, on_queue)
    say(f"monitoring on: {arms['on'].jobs} jobs counted {seen}")
    return {
        "available": True,
        "processes": processes,
        "off": arms["off"].summary(),
        "on": {**arms["on"].summary(), "jobs_counted": seen},
    }


def monitoring_check(part: dict[str, Any]) -> tuple[bool, str] | None:
    """(passed, detail) of the run's check, None when it was not measured."""
    if not part.get("available"):
        return None
    on, off = part["on"], part["off"]
    passed = on["failed"] == 0 and off["failed"] == 0 and on["jobs_counted"] == on["jobs"]
    detail = (
        f"{on['jobs']} sent, {on['jobs_counted']} counted, {on['failed'] + off['failed']} failed"
    )
    return passed, detail
