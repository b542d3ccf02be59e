"""Promotes under sustained load: what a swap costs the jobs that run through it.

Starts a private redis-server (or uses REDIS_URL) and a prefork worker on a queue of its
own, serving version A of a model trained for the run (from a serving decision). A sender
thread enqueues single-row jobs at --rate a second, plus a --batch-rows batch job every
--batch-every-s (the bulk score running beside them). After --steady-s the decision moves to
version B, then back to A, --swaps times, --swap-every-s apart. Then every result is read
back and the run prints:

- jobs sent, failed, lost (no result), and the rate of single-row jobs;
- the versions that served, and whether every job sent >= 2 s after a promote (and before
  the next) was served by the version promoted;
- p99 of single-row latency (queue wait + task time, from the results) over the jobs sent
  in the 2 s after each promote, against the jobs sent at other times once the worker is
  warm, per swap and over all swaps (goal: ratio <= 2). One 2 s window holds 4,000 jobs at
  the default rate, so its p99 rests on its 40 slowest: the pooled figure is the one to
  read on a machine that also runs the sender and Redis.

    .venv/bin/python -m stack.swap_bench --swaps 6

Exit status 1 if a job failed or was lost, or a late job was served by the old version.
Ratios measured on a machine shared with other work are provisional.
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
    parser.add_argument("--steady-s", type=float, default=4.0, help="load before the first promote")
    parser.add_argument("--swaps", type=int, default=6, help="promotes, A to B and back")
    parser.add_argument("--swap-every-s", type=float, default=5.0)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rate", type=float, default=2000.0, help="single-row jobs a second")
    parser.add_argument("--jobs-per-send", type=int, default=20)
    parser.add_argument("--batch-rows", type=int, default=5000)
    parser.add_argument("--batch-every-s", type=float, default=0.5)
    parser.add_argument(
        "--timeline", action="store_true", help="also print p99 per 250 ms of send time"
    )
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
    promotes: list[tuple[float, ServedVersion]] = []
    time.sleep(args.steady_s)
    for generation in range(1, args.swaps + 1):
        new, old = (b, a) if generation % 2 else (a, b)
        promoted_at = time.time()
        publish_decision(
            probe,
            ServingDecision(
                name=name, generation=generation, champion=new, previous=old,
                decided_at=promoted_at,
            ),
        )  # fmt: skip
        promotes.append((promoted_at, new))
        time.sleep(args.swap_every_s)
    stop.set()
    sender.join()
    end = time.time()
    results, failed, pending = _collect(client, [i for _, batch, _ in sent for i in batch])
    client.close()
    return _report(args, sent, results, failed, pending, start, end, promotes)


def _collect(
    client: Client, ids: list[str]
) -> tuple[dict[str, dict[str, object] | None], int, list[str]]:
    """Every job's result (None for a failure), the failures, and the jobs with none."""
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
    return results, failed, pending


def _report(
    args: argparse.Namespace,
    sent: list[tuple[float, list[str], bool]],
    results: dict[str, dict[str, object] | None],
    failed: int,
    pending: list[str],
    start: float,
    end: float,
    promotes: list[tuple[float, ServedVersion]],
) -> dict[str, object]:
    singles = [(at, i) for at, batch, is_batch in sent if not is_batch for i in batch]
    latency_ms: dict[str, float] = {}
    for _, task_id in singles:
        result = results.get(task_id)
        if result:
            latency = result["latency"]
            assert isinstance(latency, dict)
            latency_ms[task_id] = (latency["queue_wait_ms"] or 0.0) + latency["task_ms"]
    bounds = [at for at, _ in promotes] + [end]

    def p99(spans: list[tuple[float, float]]) -> float:
        ms = [
            latency_ms[i]
            for at, i in singles
            if i in latency_ms and any(lo <= at < hi for lo, hi in spans)
        ]
        return float(np.percentile(ms, 99)) if ms else float("nan")

    swaps = [(at, at + SWITCH_S) for at, _ in promotes]
    # Steady: once the worker is warm, and not within 2 s after a promote.
    steady = [(start + 1.0, promotes[0][0])] + [
        (at + SWITCH_S, bounds[k + 1]) for k, (at, _) in enumerate(promotes)
    ]
    late = late_on_old = 0
    # Per promote: how long after it a job was still sent that the old version served.
    lag = []
    for k, (at, version) in enumerate(promotes):
        lag.append(
            max(
                (
                    sent_at - at
                    for sent_at, batch, _ in sent
                    if at <= sent_at < bounds[k + 1]
                    for i in batch
                    if results.get(i) and results[i]["model_version"] != version.version  # type: ignore[index]
                ),
                default=0.0,
            )
        )
        for sent_at, batch, _ in sent:
            if at + SWITCH_S <= sent_at < bounds[k + 1]:
                late += len(batch)
                late_on_old += sum(
                    1
                    for i in batch
                    if (results.get(i) or {}).get("model_version") != version.version
                )
    versions = sorted({str(r["model_version"]) for r in results.values() if r})
    steady_p99, swap_p99 = p99(steady), p99(swaps)
    per_swap = ", ".join(f"{p99([span]) / steady_p99:.2f}" for span in swaps)
    rate = len(singles) / max(end - start, 1e-9)
    lines = []
    if args.timeline:
        step = 0.25
        edge = start
        while edge < end:
            near = min((edge - at for at, _ in promotes), key=abs)
            lines.append(
                f"  {near:+6.2f} s from a promote: p99 {p99([(edge, edge + step)]):8.2f} ms"
            )
            edge += step
    ids = sum(len(batch) for _, batch, _ in sent)
    lines += [
        f"jobs sent {ids} (single rows {len(singles)}, ~{rate:,.0f}/s sent), "
        f"failed {failed}, lost {len(pending)}",
        f"versions that served: {versions}; {len(promotes)} promotes; jobs sent >= "
        f"{SWITCH_S:g} s after a promote: {late}, served by the version it replaced: "
        f"{late_on_old}; last job the old version served, sent after each promote: "
        + ", ".join(f"{x:.2f} s" for x in lag),
        f"single-row p99 (queue wait + task): steady {steady_p99:.2f} ms, in the "
        f"{SWITCH_S:g} s after a promote {swap_p99:.2f} ms, ratio {swap_p99 / steady_p99:.2f} "
        f"(goal <= 2); per swap: {per_swap}",
    ]
    ok = failed == 0 and not pending and late_on_old == 0
    return {"ok": ok, "text": "\n".join(lines)}


if __name__ == "__main__":
    raise SystemExit(main())
