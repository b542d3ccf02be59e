"""A promote under sustained load: what the swap costs the jobs that run through it.

Starts a private redis-server (or uses REDIS_URL) and a prefork worker on a queue of its
own, serving version A of a model trained for the run (from a serving decision). A sender
thread enqueues single-row jobs at --rate a second, plus a --batch-rows batch job every
--batch-every-s (the bulk score running beside them); at half time the decision moves to
version B. Then every result is read back and the run prints:

- jobs sent, failed, lost (no result), and the rate of single-row jobs;
- the versions that served, and whether every job sent >= 2 s after the promote was B's;
- p99 of single-row latency (queue wait + task time, from the results) over the steady
  window before the promote and the 2 s window after it, and their ratio (goal <= 2).

    .venv/bin/python -m stack.swap_bench --seconds 10

Exit status 1 if a job failed or was lost, or a late job was served by A. Ratios measured on
a machine shared with other work are provisional.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import redis

from contract.names import TASK_PREDICT, TASK_PREDICT_BATCH
from contract.schemas import ServedVersion, ServingDecision
from producer.client import Client
from producer.settings import ProducerSettings
from stack.embedded_redis import EmbeddedRedis
from stack.processes import celery_env, wait_ready, worker_process
from training.fetch import file_hashes
from training.promote import publish_decision
from training.train import TrainConfig, run_training

SWITCH_S = 2.0


@contextlib.contextmanager
def redis_url() -> Iterator[str]:
    external = os.environ.get("REDIS_URL")
    if external:
        yield external
        return
    with EmbeddedRedis() as server:
        yield server.url


def served(version_dir: Path, n_features: int) -> ServedVersion:
    return ServedVersion(
        version=version_dir.name,
        location=str(version_dir),
        sha256=file_hashes(str(version_dir)),
        n_features=n_features,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stack.swap_bench", description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0, help="load duration")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rate", type=float, default=2000.0, help="single-row jobs a second")
    parser.add_argument("--jobs-per-send", type=int, default=20)
    parser.add_argument("--batch-rows", type=int, default=5000)
    parser.add_argument("--batch-every-s", type=float, default=0.5)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="swap-bench-"))
    name = f"swap{uuid.uuid4().hex[:6]}"
    config = TrainConfig(model_dir=work / "models", name=name, n_samples=5000, n_jobs=1)
    first = run_training(config)
    second = run_training(config.model_copy(update={"seed": 1}))
    n_features = first.manifest.n_features
    a, b = served(first.version_dir, n_features), served(second.version_dir, n_features)
    rows = first.X_test.astype(np.float32).astype(np.float64)
    queue = f"swap-{uuid.uuid4().hex[:6]}"

    with redis_url() as url:
        probe = redis.Redis.from_url(url)
        publish_decision(
            probe, ServingDecision(name=name, generation=0, champion=a, decided_at=time.time())
        )
        env = celery_env(
            url, model_dir=work / "models", model_name=name, model_cache_dir=work / "cache"
        )
        hostname = f"swap-{os.getpid()}@bench"
        worker = worker_process(
            env, work / "worker.log", queue=queue, name=hostname, concurrency=args.processes
        )
        worker.start()
        try:
            wait_ready(worker, probe, hostname, args.processes)
            report = _run(url, probe, args, name, queue, rows, a, b)
        finally:
            worker.stop()
            probe.close()
    print(report["text"])
    print(f"worker log: {work / 'worker.log'}", file=sys.stderr)
    return 0 if report["ok"] else 1


def _run(
    url: str,
    probe: redis.Redis,
    args: argparse.Namespace,
    name: str,
    queue: str,
    rows: np.ndarray,
    a: ServedVersion,
    b: ServedVersion,
) -> dict[str, object]:
    sent: list[tuple[float, list[str], bool]] = []
    stop = threading.Event()
    client = Client(ProducerSettings(redis_url=url, wait_timeout_s=120))

    def load() -> None:
        rng = np.random.default_rng(0)
        last_batch = 0.0
        began = time.monotonic()
        count = 0
        while not stop.is_set():
            # Paced: an open loop faster than the workers would measure the backlog's growth.
            ahead = began + count / args.rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
            count += args.jobs_per_send
            picks = rng.integers(0, len(rows), args.jobs_per_send)
            kwargs = [{"features": rows[i].tolist()} for i in picks]
            sent.append((time.time(), client.send_many(TASK_PREDICT, kwargs, queue), False))
            if time.monotonic() - last_batch >= args.batch_every_s:
                last_batch = time.monotonic()
                batch = rows[rng.integers(0, len(rows), args.batch_rows)].tolist()
                ids = [client.send(TASK_PREDICT_BATCH, {"rows": batch}, queue)]
                sent.append((time.time(), ids, True))

    sender = threading.Thread(target=load)
    start = time.time()
    sender.start()
    time.sleep(args.seconds / 2)
    promoted_at = time.time()
    publish_decision(
        probe,
        ServingDecision(name=name, generation=1, champion=b, previous=a, decided_at=promoted_at),
    )
    time.sleep(args.seconds / 2)
    stop.set()
    sender.join()
    ids = [i for _, batch, _ in sent for i in batch]
    results: dict[str, dict[str, object] | None] = {}
    failed = 0
    deadline = time.monotonic() + 300
    pending = list(ids)
    while pending and time.monotonic() < deadline:
        still = []
        for chunk in range(0, len(pending), 5000):
            part = pending[chunk : chunk + 5000]
            for task_id, status in zip(part, client.statuses(part), strict=True):
                if status.state == "SUCCESS":
                    results[task_id] = status.result
                elif status.state in ("FAILURE", "REVOKED"):
                    results[task_id] = None
                    failed += 1
                else:
                    still.append(task_id)
        pending = still
        if pending:
            time.sleep(0.5)
    client.close()

    singles = [(at, i) for at, batch, is_batch in sent if not is_batch for i in batch]
    late = [i for at, batch, _ in sent if at >= promoted_at + SWITCH_S for i in batch]
    late_on_a = sum(1 for i in late if (results.get(i) or {}).get("model_version") != b.version)
    versions = sorted({str(r["model_version"]) for r in results.values() if r})

    def p99(lo: float, hi: float) -> float:
        ms = []
        for at, task_id in singles:
            result = results.get(task_id)
            if lo <= at < hi and result:
                latency = result["latency"]
                assert isinstance(latency, dict)
                ms.append((latency["queue_wait_ms"] or 0.0) + latency["task_ms"])
        return float(np.percentile(ms, 99)) if ms else float("nan")

    steady = p99(start + 1.0, promoted_at)
    swap = p99(promoted_at, promoted_at + SWITCH_S)
    rate = len([1 for at, _ in singles if at < promoted_at]) / max(promoted_at - start, 1e-9)
    ok = failed == 0 and not pending and late_on_a == 0
    text = "\n".join(
        [
            f"jobs sent {len(ids)} (single rows {len(singles)}, ~{rate:,.0f}/s sent), "
            f"failed {failed}, lost {len(pending)}",
            f"versions that served: {versions}; jobs sent >= {SWITCH_S:g} s after the promote: "
            f"{len(late)}, served by the old version: {late_on_a}",
            f"single-row p99 (queue wait + task): steady {steady:.2f} ms, during the swap "
            f"{swap:.2f} ms, ratio {swap / steady:.2f} (goal <= 2)",
        ]
    )
    return {"ok": ok, "text": text}


if __name__ == "__main__":
    raise SystemExit(main())
