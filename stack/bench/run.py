"""`python -m stack.bench`: how fast the queue serves, against what the model allows.

Against a deployment (REDIS_URL set, workers running), or with `--embedded` against a
private redis-server and a CPU worker it starts itself (training a model first if
`--model-dir` has none), it measures in one run (stack.bench.jobs, stack.bench.local):

1. single-row round trips, one at a time: `inference.predict` and the no-op task
   `inference.noop` (Celery's own cost per message), interleaved so that both see the
   same machine;
2. sustained single-row throughput, a window of jobs kept in flight, three ways: this
   product (row lane), plain Celery (send_task per row, Celery's consumer), the no-op;
3. batch jobs (`inference.predict_batch`): latency one at a time, rows/s in flight;
4. scoring a generated CSV file with producer.bulk.score_csv, end to end, with every row
   accounted for and predictions spot-checked against the model run in this process;
5. the same model in this process with onnxruntime: the limit the queue can approach.

`python -m stack.bench explain` measures SHAP explanations instead (stack.bench.explain).

It prints a table and the goal ratios (P1-P5; P4 from the model's benchmark.json) and
writes everything as JSON. Nothing here judges absolute speed: on a shared machine only
ratios from one run compare.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from contract.errors import BenchError
from contract.names import TASK_NOOP
from producer.client import Client, resolve_queue
from producer.settings import ProducerSettings, redact
from stack.bench.clients import async_vs_sync
from stack.bench.config import FULL, QUICK, BenchConfig, latency_summary
from stack.bench.deployment import Deployment, embedded
from stack.bench.gateway import gateway
from stack.bench.jobs import (
    WARMUP_JOBS,
    batch_jobs,
    probe_noop,
    single_row,
    sustained,
)
from stack.bench.local import (
    bulk,
    find_local_model,
    inprocess,
    training_summary,
)
from stack.bench.monitoring import monitoring_check, monitoring_overhead
from stack.bench.report import compute_goals, compute_ratios, cpu_cores, machine_info
from stack.bench.table import format_report
from worker.health import live_states

REPORT_VERSION = 1


# -- the run -------------------------------------------------------------------------------


def _check(items: list[dict[str, Any]], name: str, ok: bool | None, detail: str) -> None:
    status = "skipped" if ok is None else ("ok" if ok else "FAILED")
    items.append({"name": name, "status": status, "detail": detail})


def measure(
    client: Client,
    config: BenchConfig,
    model_dir: Path | None,
    work_dir: Path,
    say: Callable[[str], None],
) -> dict[str, Any]:
    queue = resolve_queue(config.queue)
    info = client.model_info(queue, refresh=True)
    if info is None:
        raise BenchError("no model info in Redis: no worker has ever started against it")
    workers = live_states(client.redis, queue=queue)
    if not workers:
        raise BenchError(f"no live worker consumes {queue}: start one, or use --embedded")
    n = info.n_features
    rng = np.random.default_rng(config.seed)
    report: dict[str, Any] = {
        "model": {
            "name": info.name,
            "version": info.version,
            "n_features": n,
            "feature_names": info.feature_names,
            "max_batch_rows": info.max_batch_rows,
        },
        "workers_seen": [
            {"hostname": w.hostname, "pid": w.pid, "pool": w.pool, "device": w.device}
            for w in workers
        ],
    }
    local, local_reason = find_local_model(model_dir, info.name, info.version)
    reference = local.predictor(1) if local else None
    report["model_goals"] = training_summary(local, local_reason)

    say(f"probing {TASK_NOOP}")
    noop_reason = probe_noop(client, queue, config.noop_probe_s)
    with_noop = noop_reason is None
    unavailable = {"available": False, "reason": noop_reason}

    say(f"single-row round trips: {config.single_jobs} each")
    rows = rng.uniform(0, 1, (config.single_jobs + WARMUP_JOBS, n))
    predict_s, noop_s, task_s = single_row(client, rows, queue, with_noop)
    report["single_row"] = {
        "predict": {
            "available": True,
            **latency_summary(predict_s),
            "worker_task": latency_summary(task_s),
        },
        "noop": {"available": True, **latency_summary(noop_s)} if with_noop else unavailable,
    }

    say(f"sustained single-row: {config.sustained_jobs} jobs each, {config.window} in flight")
    rows = rng.uniform(0, 1, (config.sustained_jobs, n))
    report["sustained"] = sustained(client, rows, queue, config.window, with_noop)
    if not with_noop:
        report["sustained"]["noop"] = unavailable

    say(f"monitoring on vs off: {config.sustained_jobs} sustained single-row jobs each")
    report["monitoring"] = monitoring_overhead(
        client,
        model_dir,
        rng.uniform(0, 1, (config.sustained_jobs, n)),
        config.window,
        config.processes or cpu_cores(),
        work_dir,
        say,
    )

    say(f"asyncio client vs sync client: {config.client_jobs} single-row jobs each")
    rows = rng.uniform(0, 1, (config.client_jobs, n))
    report["clients"] = async_vs_sync(client, rows, queue)

    say(f"HTTP gateway: {config.single_jobs} round trips, {config.sustained_jobs} sustained")
    report["gateway"] = gateway(
        client,
        rng.uniform(0, 1, (config.single_jobs + WARMUP_JOBS, n)),
        rng.uniform(0, 1, (config.sustained_jobs, n)),
        queue,
        work_dir / "bench-gateway.log",
        WARMUP_JOBS,
    )

    batch_rows = min(config.batch_rows, info.max_batch_rows)
    in_flight = config.in_flight or client.settings.max_in_flight
    say(f"batch jobs: {config.batch_jobs} x {batch_rows} rows")
    batches = [rng.uniform(0, 1, (batch_rows, n)).tolist() for _ in range(config.batch_jobs)]
    report["batch"] = batch_jobs(client, batches, queue, in_flight)

    say(f"bulk CSV: {config.bulk_rows} rows")
    report["bulk"] = bulk(
        client, work_dir, config.bulk_rows, info.feature_names, config, reference, local_reason
    )

    if local is not None:
        say(f"in-process onnxruntime: {config.inprocess_rows} rows")
        report["inprocess"] = inprocess(local, config.inprocess_rows, n, config.seed)
    else:
        report["inprocess"] = {"available": False, "reason": local_reason}
    return report


def checks(report: dict[str, Any]) -> dict[str, Any]:
    items: list[dict[str, Any]] = []
    bulk_part = report["bulk"]
    _check(
        items,
        "bulk rows out == rows in",
        bulk_part["rows_out"] == bulk_part["rows_in"] == bulk_part["rows_scored"],
        f"{bulk_part['rows_in']} in, {bulk_part['rows_out']} in the output file",
    )
    spot = bulk_part["spot_check"]
    _check(
        items,
        "bulk predictions == in-process model",
        spot["passed"],
        f"{spot['rows']} rows, max |diff| {spot['max_abs_diff']} (atol {spot['atol']:g})"
        if spot["passed"] is not None
        else f"skipped: {spot.get('reason')}",
    )
    batch = report["batch"]
    _check(
        items,
        "batch rows back == rows sent",
        batch["rows_back"] == batch["rows_sent"] and not batch["concurrent"]["failed"],
        f"{batch['rows_sent']} sent, {batch['rows_back']} back",
    )
    for task in ("predict", "plain_celery", "noop"):
        part = report["sustained"].get(task) or {}
        if part.get("available"):
            _check(
                items,
                f"sustained {task}: no failed job",
                part["failed"] == 0,
                f"{part['failed']} of {part['jobs']} failed"
                + (f" (first: {part['first_error']})" if part["first_error"] else ""),
            )
    monitored = monitoring_check(report.get("monitoring") or {})
    if monitored is not None:
        _check(items, "monitoring on: no failed job, metric counts == jobs sent", *monitored)
    gw = report.get("gateway") or {}
    if gw.get("available"):
        failed = gw["sequential"]["failed"] + gw["sustained"]["failed"]
        _check(
            items,
            "gateway: every request answered 200",
            failed == 0,
            f"{failed} of {gw['sustained']['jobs'] + gw['sequential']['gateway']['count']} failed",
        )
    clients = report.get("clients") or {}
    if clients:
        _check(
            items,
            "asyncio and sync clients: no failed job",
            clients["failed"] == 0,
            f"{clients['failed']} of {2 * clients['jobs']} failed",
        )
    return {"passed": all(i["status"] != "FAILED" for i in items), "items": items}


def run_bench(
    config: BenchConfig,
    settings: ProducerSettings | None = None,
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure, write the JSON to config.json_out, and return the report."""
    note = say or (lambda _msg: None)
    default_dir = os.environ.get("INFERENCE_MODEL_DIR", "models")
    model_dir = config.model_dir or (Path(default_dir) if config.embedded else None)
    if model_dir is None and Path(default_dir).is_dir():
        model_dir = Path(default_dir)
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        work_dir = config.work_dir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="inference-bench-"))
        )
        work_dir.mkdir(parents=True, exist_ok=True)
        if config.embedded:
            assert model_dir is not None
            log_dir = config.work_dir or config.json_out.parent
            log_dir.mkdir(parents=True, exist_ok=True)
            deployment = stack.enter_context(embedded(config, model_dir, log_dir, note))
        else:
            deployment = Deployment(settings or ProducerSettings(), "deployment", {})
        client = stack.enter_context(Client(deployment.settings))
        measured = measure(client, config, model_dir, work_dir, note)
        server_version = _redis_version(client)
    worker = deployment.worker or {
        "hostnames": sorted({w["hostname"] for w in measured["workers_seen"]}),
        "processes": len(measured["workers_seen"]),
        "start_to_ready_s": None,
    }
    report: dict[str, Any] = {
        "report_version": REPORT_VERSION,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": deployment.mode,
        "machine": machine_info(),
        "redis": {"url": redact(deployment.settings.redis_url), "server_version": server_version},
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}
        | {
            "queue": resolve_queue(config.queue),
            "model_dir": str(model_dir) if model_dir else None,
        },
        "worker": worker,
        **measured,
    }
    report["ratios"] = compute_ratios(report)
    report["goals"] = compute_goals(report)
    report["checks"] = checks(report)
    report["total_s"] = time.perf_counter() - started
    write_json(config.json_out, report)
    return report


def _redis_version(client: Client) -> str | None:
    try:
        info = client.redis.info("server")
    except Exception:  # an ACL may refuse INFO; the version is only a label
        return None
    version = info.get("redis_version") if isinstance(info, dict) else None
    return str(version) if version is not None else None


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    tmp.replace(path)


# -- command line --------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--embedded",
        action="store_true",
        help="start a private redis-server and a CPU worker (ignores REDIS_URL); "
        "trains a model first if --model-dir has none",
    )
    p.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="trained models (INFERENCE_MODEL_DIR, else 'models'); needed for the "
        "in-process reference and the spot check",
    )
    p.add_argument("--model-name", default=os.environ.get("INFERENCE_MODEL_NAME", "friedman1"))
    p.add_argument("--queue", default="cpu", help="cpu, gpu, or a queue name (default cpu)")
    p.add_argument("--processes", type=int, default=None, help="--embedded worker processes")
    p.add_argument("--quick", action="store_true", help="about 10x less of everything")
    p.add_argument("--single-jobs", type=int, default=None, help="sequential jobs per task (300)")
    p.add_argument("--sustained-jobs", type=int, default=None, help="jobs per task (3000)")
    p.add_argument("--window", type=int, default=None, help="single-row jobs in flight (256)")
    p.add_argument("--batch-jobs", type=int, default=None, help="batch jobs (20)")
    p.add_argument("--batch-rows", type=int, default=None, help="rows per batch job (5000)")
    p.add_argument("--bulk-rows", type=int, default=None, help="rows in the CSV file (1000000)")
    p.add_argument("--chunk-rows", type=int, default=None, help="bulk rows per chunk")
    p.add_argument("--in-flight", type=int, default=None, help="bulk chunks / batch jobs")
    p.add_argument("--inprocess-rows", type=int, default=None, help="in-process batch (65536)")
    p.add_argument("--client-jobs", type=int, default=None, help="asyncio vs sync jobs (10000)")
    p.add_argument("--json-out", type=Path, default=Path("out/bench.json"))
    p.add_argument("--work-dir", type=Path, default=None, help="worker log and bulk files")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker-loglevel", default="INFO", help="--embedded worker (as deployed)")
    p.add_argument(
        "--serving-decision",
        action="store_true",
        help="--embedded worker started from a serving decision (as promote publishes one)",
    )


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    sizes = QUICK if args.quick else FULL
    chosen: dict[str, Any] = {
        k: getattr(args, k) if getattr(args, k) is not None else v for k, v in sizes.items()
    }
    for key, value in chosen.items():
        if value < (0 if key in {"bulk_rows"} else 1):
            raise BenchError(f"--{key.replace('_', '-')} must be positive")
    names = {f.name for f in fields(BenchConfig)}
    rest: dict[str, Any] = {k: v for k, v in vars(args).items() if k in names and k not in chosen}
    return BenchConfig(**rest, **chosen)


def run_from_args(args: argparse.Namespace) -> int:
    """The `bench` subcommand: 0 when every check passed, 1 when one failed, 2-4 as the CLI."""

    def say(message: str) -> None:
        print(f"bench: {message}", file=sys.stderr, flush=True)

    try:
        config = config_from_args(args)
        if not config.embedded and not (
            os.environ.get("REDIS_URL") or os.environ.get("INFERENCE_REDIS_URL")
        ):
            raise BenchError("set REDIS_URL to a deployment's Redis, or pass --embedded")
        report = run_bench(config, say=say)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TimeoutError as exc:
        print(f"error: timeout: {exc}", file=sys.stderr)
        return 3
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 4
    print(format_report(report))
    print(f"\nJSON: {config.json_out}  ({report['total_s']:.1f} s in all)")
    return 0 if report["checks"]["passed"] else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["explain"]:
        from stack.bench.explain import main as explain_main

        return explain_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m stack.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
