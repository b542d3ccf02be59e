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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis
from numpy.typing import NDArray

from contract.metrics import JOBS_TOTAL
from contract.names import TASK_PREDICT, row_queue
from producer.client import Client
from stack.bench.jobs import Windowed, windowed
from stack.embedded_redis import free_port
from stack.processes import CeleryProcess, celery_env, wait_ready, worker_process
from worker.health import live_states

READY_TIMEOUT_S = 120.0

ROUNDS = 6
"""Alternating rounds per side: more than the other sustained figures' (a difference of a
few per cent is measured here, on a machine that may be doing other things)."""


@dataclass
class _Side:
    queue: str
    port: int | None
    pids: list[int]
    """The worker's main process and its pool's."""


def cpu_s(pids: list[int]) -> float | None:
    """CPU seconds (user + system) the processes `pids` have used, from /proc; None where
    there is no /proc. A measure of the work done that other load on the machine barely
    moves, unlike throughput."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


@contextlib.contextmanager
def _worker(
    client: Client, model_dir: Path, log_dir: Path, side: str, processes: int, on: bool
) -> Iterator[_Side]:
    """A worker for one side, once all its processes are ready."""
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
            pool = [s.pid for s in live_states(probe, hostname=hostname)]
        finally:
            probe.close()
        assert proc.proc is not None
        yield _Side(queue, port, [proc.proc.pid, *pool])
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
    rounds: int = ROUNDS,
) -> dict[str, Any]:
    if model_dir is None:
        return {"available": False, "reason": "no local model directory to start workers with"}
    features = rows.tolist()
    with (
        _worker(client, model_dir, log_dir, "off", processes, on=False) as off,
        _worker(client, model_dir, log_dir, "on", processes, on=True) as on,
    ):
        sides = {"off": off, "on": on}
        arms = {"off": Windowed(), "on": Windowed()}
        # Over the whole measurement, idle rounds included (the same for both sides): /proc
        # counts in clock ticks (10 ms), too coarse to sum per round.
        cpu = {name: cpu_s(side.pids) for name, side in sides.items()}
        per_round: list[float | None] = []
        bounds = np.linspace(0, len(features), rounds + 1).astype(int)
        for n, (lo, hi) in enumerate(itertools.pairwise(bounds.tolist())):
            # Which side goes first alternates too.
            rate = {}
            for name in ("off", "on") if n % 2 == 0 else ("on", "off"):

                def send(r: range, q: str = sides[name].queue) -> list[str]:
                    return client.send_many(TASK_PREDICT, [{"features": features[i]} for i in r], q)

                run = windowed(client, send, range(lo, hi), window)
                rate[name] = run.jobs / run.seconds if run.seconds else 0.0
                arms[name].add(run)
            per_round.append(rate["on"] / rate["off"] if rate["off"] else None)
        for name, side in sides.items():
            before, after = cpu[name], cpu_s(side.pids)
            cpu[name] = None if before is None or after is None else after - before
        assert on.port is not None
        seen = counted(on.port, on.queue)
    say(f"monitoring on: {arms['on'].jobs} jobs counted {seen}")

    def per_job_us(name: str) -> float | None:
        used, jobs = cpu[name], arms[name].jobs
        return None if used is None or not jobs else used / jobs * 1e6

    return {
        "available": True,
        "processes": processes,
        "rounds": rounds,
        "round_ratios": [None if r is None else round(r, 3) for r in per_round],
        "off": {**arms["off"].summary(), "worker_cpu_us_per_job": per_job_us("off")},
        "on": {
            **arms["on"].summary(),
            "worker_cpu_us_per_job": per_job_us("on"),
            "jobs_counted": seen,
        },
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
