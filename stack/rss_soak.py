"""Worker memory under a long stream of jobs: does a prefork worker's RSS stay flat?

Starts a prefork worker on a queue of its own (against REDIS_URL, or a private
redis-server), sends --jobs single-row predicts in windows (two windows in flight, so the
producer's memory stays bounded and the worker never idles), and prints the RSS of the
worker's main process and of its pool processes after a warm-up, every --report-every
jobs and at the end, with the throughput. The model is --model-dir's, or a small one
trained for the run (3,000 rows).

    .venv/bin/python -m stack.rss_soak --jobs 100000
    REDIS_URL=redis://127.0.0.1:6379/0 .venv/bin/python -m stack.rss_soak --model-dir models

Exit status 1 if any job failed or RSS grew by more than --max-growth-mib after the warm-up.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

MIB = 1024 * 1024


def children(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc/<n>/stat (no psutil; /proc/<pid>/task/*/children
    needs CONFIG_PROC_CHILDREN, which not every kernel has)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process ended while we looked
            continue
        # The command name may hold spaces and parentheses: the fields follow the last ")".
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return sorted(found)


def rss_bytes(pid: int) -> int:
    """Resident set size of one process (VmRSS), 0 if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def worker_rss(pid: int) -> tuple[int, dict[int, int]]:
    """RSS of a worker's main process and of each of its pool processes."""
    return rss_bytes(pid), {child: rss_bytes(child) for child in children(pid)}


def _redis_url() -> Iterator[str]:
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    from stack.embedded_redis import EmbeddedRedis

    with EmbeddedRedis() as server:
        yield server.url


def _line(label: str, pid: int, done: int, rate: float | None) -> int:
    main, pool = worker_rss(pid)
    total = main + sum(pool.values())
    pool_text = " ".join(f"{rss / MIB:.1f}" for rss in pool.values())
    rate_text = f"{rate:8.0f} jobs/s" if rate is not None else " " * 15
    print(
        f"{label:>10} {done:>8} jobs  main {main / MIB:6.1f} MiB  pool [{pool_text}] MiB"
        f"  total {total / MIB:6.1f} MiB  {rate_text}",
        flush=True,
    )
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--warmup", type=int, default=2_000)
    parser.add_argument("--window", type=int, default=2_000, help="jobs per window")
    parser.add_argument("--report-every", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--log", type=Path, default=Path(tempfile.gettempdir()) / "rss-soak.log")
    parser.add_argument("--max-growth-mib", type=float, default=30.0)
    args = parser.parse_args(argv)

    import numpy as np
    import redis

    from contract.names import TASK_PREDICT
    from producer.client import Client
    from producer.settings import ProducerSettings
    from stack.processes import celery_env, wait_ready, worker_process

    with contextlib.ExitStack() as stack:
        redis_url = stack.enter_context(contextlib.contextmanager(_redis_url)())
        model_dir = args.model_dir
        if model_dir is None:
            from training.config import TrainConfig
            from training.train import run_training

            model_dir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            run_training(TrainConfig(model_dir=model_dir, n_samples=3_000, n_jobs=1))
        queue = f"soak-{uuid.uuid4().hex[:8]}"
        hostname = f"{queue}@soak"
        env = celery_env(redis_url, model_dir=model_dir.resolve())
        args.log.unlink(missing_ok=True)
        worker = worker_process(
            env, args.log, queue=queue, name=hostname, concurrency=args.concurrency,
            loglevel="WARNING",
        )  # fmt: skip
        worker.start()
        stack.callback(worker.stop)
        state = redis.Redis.from_url(redis_url)
        stack.callback(state.close)
        wait_ready(worker, state, hostname, processes=args.concurrency)
        assert worker.proc is not None
        pid = worker.proc.pid
        client = stack.enter_context(Client(ProducerSettings(redis_url=redis_url)))
        rows = np.random.default_rng(0).random((4_096, 5)).round(6).tolist()
        print(f"worker pid {pid}, {args.concurrency} pool processes, queue {queue}, log {args.log}")

        failed = 0

        def run(n: int, on_progress: Callable[[int], None] | None = None) -> None:
            """Send n jobs, two windows in flight; report every --report-every jobs."""
            nonlocal failed
            sent = done = 0
            in_flight: list[list[str]] = []
            next_report = args.report_every
            while done < n:
                while sent < n and len(in_flight) < 2:
                    size = min(args.window, n - sent)
                    window = [rows[(sent + i) % len(rows)] for i in range(size)]
                    in_flight.append(
                        [client.send(TASK_PREDICT, {"features": row}, queue) for row in window]
                    )
                    sent += size
                ids = in_flight.pop(0)
                for status in client.iter_finished(ids, timeout=120):
                    failed += status.state != "SUCCESS"
                done += len(ids)
                if on_progress is not None and done >= next_report:
                    on_progress(done)
                    next_report += args.report_every

        run(args.warmup)
        before = _line("warm-up", pid, args.warmup, None)
        started = time.perf_counter()

        def progress(done: int) -> None:
            _line("", pid, done, done / (time.perf_counter() - started))

        run(args.jobs, progress)
        elapsed = time.perf_counter() - started
        after = _line("after", pid, args.jobs, args.jobs / elapsed)
        growth = (after - before) / MIB
        print(
            f"{args.jobs} jobs in {elapsed:.1f} s ({args.jobs / elapsed:.0f} jobs/s), "
            f"{failed} failed; RSS growth after warm-up {growth:+.1f} MiB",
            flush=True,
        )
        return 0 if failed == 0 and growth <= args.max_growth_mib else 1


if __name__ == "__main__":
    sys.exit(main())
