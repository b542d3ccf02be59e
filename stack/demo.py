"""The whole system on one machine: `python -m stack.demo`.

Trains a model if none exists, starts Redis (a private one unless REDIS_URL is
set), a CPU worker and beat, sends sample jobs and a bulk file through the
queue, prints results with their latency and the health report, sends jobs from
an asyncio event loop and through the HTTP gateway (with the `gateway` extra),
then stops everything it started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import importlib.util
import json
import os
import socket
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import redis

from contract.names import HEALTH_REPORT_KEY, TASK_PREDICT
from contract.schemas import HealthReport
from producer import AsyncClient
from producer.bulk import score_csv
from producer.client import Client
from producer.health import format_health
from producer.settings import ProducerSettings, redact
from stack.embedded_redis import EmbeddedRedis, free_port
from stack.processes import (
    beat_process,
    celery_env,
    gateway_process,
    wait_http,
    wait_ready,
    worker_process,
)
from training.ensure import ensure_model


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    url = os.environ.get("REDIS_URL") or os.environ.get("INFERENCE_REDIS_URL")
    if url:
        say(f"using Redis at {redact(url)} (REDIS_URL)")
        yield url
        return
    with EmbeddedRedis() as server:
        say(f"started a private redis-server on {redact(server.url)}")
        yield server.url


def write_sample_csv(path: Path, rows: int, n_features: int, names: list[str]) -> np.ndarray:
    rng = np.random.default_rng(7)
    data = rng.uniform(0, 1, size=(rows, n_features)).astype(np.float32)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["row_id", *names])
        for i, row in enumerate(data):
            writer.writerow([i, *(repr(float(v)) for v in row)])
    return data


def wait_for_health(client: Client, hostname: str, since: float, timeout_s: float) -> HealthReport:
    deadline = time.monotonic() + timeout_s
    while True:
        raw = client.redis.get(HEALTH_REPORT_KEY)
        if raw is not None:
            report = HealthReport.model_validate_json(raw)
            mine = [w for w in report.workers if w.hostname == hostname]
            if report.generated_at > since and mine and mine[0].jobs_done > 0:
                return report
        if time.monotonic() > deadline:
            raise TimeoutError("no health report arrived; see the beat log")
        time.sleep(0.2)


def run(args: argparse.Namespace) -> int:
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model_dir)
    if not ensure_model(model_dir, args.model_name, log=print):
        say(f"serving the existing model under {model_dir}/{args.model_name}")

    with redis_server() as url:
        env = celery_env(
            url, model_dir=model_dir.resolve(), model_name=args.model_name,
            health_interval_s=args.health_interval, heartbeat_s=1,
        )  # fmt: skip
        hostname = f"demo-cpu-{os.getpid()}@{socket.gethostname()}"
        worker = worker_process(
            env, out_dir / "worker.log", queue="inference.cpu", name=hostname,
            concurrency=args.processes,
        )  # fmt: skip
        beat = beat_process(env, out_dir / "beat.log", out_dir / "celerybeat-schedule")
        say(f"starting a CPU worker ({args.processes} processes) and beat; logs in {out_dir}/")
        started = time.monotonic()
        worker.start()
        beat.start()
        try:
            probe = redis.Redis.from_url(url)
            wait_ready(worker, probe, hostname, args.processes, timeout_s=120)
            probe.close()
            print(f"worker ready (model loaded and warmed) in {time.monotonic() - started:.1f}s")
            settings = ProducerSettings(redis_url=url)
            code = demo_jobs(settings, hostname, out_dir, args)
            asyncio.run(demo_asyncio(settings))
            demo_gateway(url, out_dir, settings)
            return code
        finally:
            say("stopping worker and beat")
            print(f"worker exit code {worker.stop()}, beat exit code {beat.stop()}")


def demo_jobs(
    settings: ProducerSettings, hostname: str, out_dir: Path, args: argparse.Namespace
) -> int:
    since = time.time()
    with Client(settings) as client:
        info = client.model_info(refresh=True)
        assert info is not None, "the worker published no model info"

        say(f"single-row jobs on inference.cpu.rows (model {info.name}/{info.version})")
        rng = np.random.default_rng(0)
        for row in rng.uniform(0, 1, size=(5, info.n_features)).round(3):
            task_id = client.submit(row.tolist())
            result = client.wait(task_id)
            lat = result["latency"]
            print(
                f"  {row.tolist()} -> {result['prediction']:.4f}   "
                f"queue {lat['queue_wait_ms']} ms, "
                f"inference {lat['inference_ms']} ms, task {lat['task_ms']} ms   [{task_id[:8]}]"
            )

        say("a batch job of 1,000 rows")
        batch = client.wait(
            client.submit_batch(rng.uniform(0, 1, size=(1000, info.n_features)).tolist())
        )
        print(
            f"  {batch['rows']} predictions, first {batch['predictions'][:3]}, "
            f"latency {batch['latency']}"
        )

        say("why: exact SHAP contributions of one row (inference.explain)")
        (why,) = client.explain([rng.uniform(0, 1, size=info.n_features).round(3).tolist()])
        parts = ", ".join(f"{name} {value:+.3f}" for name, value in why.contributions.items())
        print(f"  {why.prediction:.4f} = base {why.base_value:.4f} + ({parts})")

        say("bad input sent straight to the queue: a clear, typed error; the worker keeps serving")
        bad_id = client.send(TASK_PREDICT, {"features": [1.0, "two"]})
        (status,) = client.wait_any([bad_id])
        if status.error is not None:
            print(f"  {status.state}: {status.error.type}: {status.error.message}")

        say(f"bulk scoring a CSV file of {args.rows:,} rows")
        src, dst = out_dir / "sample.csv", out_dir / "scored.csv"
        write_sample_csv(src, args.rows, info.n_features, info.feature_names)
        # A fresh sample each run: never resume an earlier, interrupted demo.
        summary = score_csv(client, src, dst, progress=sys.stderr.isatty(), restart=True)
        with dst.open(newline="") as fh:
            scored = sum(1 for _ in fh) - 1
        print(
            f"  {summary.rows:,} rows in {summary.chunks} chunks, {summary.seconds:.2f}s "
            f"({summary.rows_per_s:,.0f} rows/s); {dst} has {scored:,} rows"
        )
        if scored != args.rows:
            print("  ERROR: rows lost", file=sys.stderr)
            return 1

        say("health report (celery beat -> inference.health)")
        report = wait_for_health(client, hostname, since, timeout_s=args.health_interval * 4 + 30)
        print(format_health(report))
        if args.json:
            print(json.dumps(report.model_dump(), indent=2))
    return 0


async def demo_asyncio(settings: ProducerSettings) -> None:
    """What an asyncio service writes: AsyncClient never blocks its event loop."""
    say("the asyncio client: 1,000 single-row jobs from one event loop")
    async with AsyncClient(settings) as client:
        info = await client.model_info()
        assert info is not None, "the worker published no model info"
        rows = np.random.default_rng(1).uniform(0, 1, size=(1000, info.n_features)).tolist()
        started = time.perf_counter()
        ids = await client.submit_many(rows)
        results = await asyncio.gather(*(client.wait(t) for t in ids))
        elapsed = time.perf_counter() - started
    print(
        f"  {len(results):,} predictions in {elapsed:.2f}s; first "
        f"{[round(r['prediction'], 4) for r in results[:3]]}"
    )


def demo_gateway(redis_url: str, out_dir: Path, settings: ProducerSettings) -> None:
    """The HTTP gateway in front of the same queues, called as curl would."""
    if importlib.util.find_spec("fastapi") is None:
        say("HTTP gateway: skipped (install the `gateway` extra to see it)")
        return
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = celery_env(redis_url)
    say(f"the HTTP gateway (python -m gateway) on {base}; log in {out_dir}/gateway.log")
    gateway = gateway_process(env, out_dir / "gateway.log", port).start()
    try:
        wait_http(gateway, f"{base}/openapi.json")
        with Client(settings) as client:
            info = client.model_info()
        n = info.n_features if info is not None else 5
        body = {"data": [round(0.1 * (i + 1), 1) for i in range(n)]}
        print(
            f"  $ curl -s -X POST {base}/api/v1/predict -H 'Content-Type: application/json' "
            f"-d '{json.dumps(body)}'"
        )
        answer = _http("POST", f"{base}/api/v1/predict", body)
        print(f"  prediction {answer['prediction']:.4f}, model {answer['model_version']}, "
              f"latency {answer['latency']}")  # fmt: skip
        print(f"  $ curl -s -X POST {base}/api/v1/jobs ... then GET the Location it answers")
        job = _http("POST", f"{base}/api/v1/jobs", {"rows": [[0.5] * n, [0.9] * n]})
        status = _http("GET", f"{base}{job['status_url']}?wait=10")
        print(f"  job {job['task_id'][:8]}: {status['state']}, {status['result']['rows']} rows")
        print(f"  OpenAPI page to try it in a browser: {base}/docs")
    finally:
        gateway.stop()


def _http(method: str, url: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stack.demo", description=__doc__)
    parser.add_argument("--model-dir", default=os.environ.get("INFERENCE_MODEL_DIR", "models"))
    parser.add_argument("--model-name", default=os.environ.get("INFERENCE_MODEL_NAME", "friedman1"))
    parser.add_argument("--out-dir", default="out/demo", help="logs, sample and scored CSV")
    parser.add_argument("--rows", type=int, default=20_000, help="rows in the bulk-scoring file")
    parser.add_argument("--processes", type=int, default=2, help="worker processes")
    parser.add_argument("--health-interval", type=float, default=2.0)
    parser.add_argument("--json", action="store_true", help="also print the health report as JSON")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
