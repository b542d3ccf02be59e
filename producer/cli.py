"""`python -m producer`: enqueue, poll, wait, score files, read the health report, export
the queues' metrics."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from contract.errors import InferenceError, JournalError
from contract.schemas import ExplainResult, HealthReport
from producer.client import Client, TaskStatus
from producer.health import format_health, format_model_info
from producer.settings import ProducerSettings, redact


def _print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _print_status(status: TaskStatus) -> int:
    _print_json(status.model_dump(exclude_none=True))
    return 1 if status.error is not None and status.ready else 0


def _finish(client: Client, task_id: str, wait: bool, timeout: float | None) -> int:
    if not wait:
        print(task_id)
        return 0
    (status,) = client.wait_any([task_id], timeout)
    return _print_status(status)


def cmd_predict(client: Client, args: argparse.Namespace) -> int:
    task_id = client.submit(args.features, queue=args.queue)
    return _finish(client, task_id, not args.no_wait, args.timeout)


def cmd_explain(client: Client, args: argparse.Namespace) -> int:
    task_id = client.submit_explain([args.features], queue=args.queue)
    if args.no_wait:
        print(task_id)
        return 0
    (status,) = client.wait_any([task_id], args.timeout)
    if status.state != "SUCCESS" or status.result is None:
        return _print_status(status)
    result = ExplainResult.model_validate(status.result)
    (explanation,) = result.explanations()
    _print_json(
        {
            "task_id": task_id,
            **explanation.model_dump(),
            **result.model_dump(include={"model_name", "model_version", "provider", "device"}),
            "latency": result.latency.model_dump(),
        }
    )
    return 0


def cmd_model_info(client: Client, args: argparse.Namespace) -> int:
    info = client.model_info(args.queue, refresh=True)
    if info is None:
        print(f"no worker of queue {args.queue!r} has published its model yet", file=sys.stderr)
        return 1
    if args.json:
        _print_json(info.model_dump())
    else:
        print(format_model_info(info))
    return 0


def cmd_batch(client: Client, args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.rows == "-" else Path(args.rows).read_text()
    rows = json.loads(text)
    if isinstance(rows, dict):
        rows = rows.get("rows")
    task_id = client.submit_batch(rows, queue=args.queue)
    return _finish(client, task_id, not args.no_wait, args.timeout)


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    return _print_status(client.status(args.task_id))


def cmd_wait(client: Client, args: argparse.Namespace) -> int:
    return _finish(client, args.task_id, True, args.timeout)


def cmd_score(client: Client, args: argparse.Namespace) -> int:
    # Bulk scoring brings pyarrow: only this command pays for importing it.
    from producer.bulk import journal_path, score_csv
    from producer.parquet_score import is_parquet, score_parquet

    output = Path(args.output)
    parquet = args.format == "parquet" or (args.format is None and is_parquet(Path(args.input)))

    def note(message: str) -> None:
        print(message, file=sys.stderr)

    options: dict[str, Any] = {
        "queue": args.queue,
        "chunk_rows": args.chunk_rows,
        "max_in_flight": args.in_flight,
        "features": args.features.split(",") if args.features else None,
        "timeout_s": args.timeout,
        "restart": args.restart,
        "explain": args.explain,
        "log": note,
    }
    try:
        if parquet:
            summary = score_parquet(client, Path(args.input), output, **options)
        else:
            summary = score_csv(
                client, Path(args.input), output, progress=not args.no_progress, **options
            )
    except KeyboardInterrupt:
        kept = journal_path(output)
        note(
            f"interrupted; the same command resumes from {kept}" if kept.exists() else "interrupted"
        )
        return 130
    except Exception as exc:
        if not isinstance(exc, JournalError) and journal_path(output).exists():
            note(f"finished chunks are kept in {journal_path(output)}: the same command resumes")
        raise
    if summary.was_resumed:
        note(
            f"resumed: {summary.resumed} of {summary.chunks} chunks already done, "
            f"{summary.recollected} collected from an earlier run's results, "
            f"{summary.sent} sent"
        )
    note(
        f"scored {summary.rows} rows in {summary.chunks} chunks in {summary.seconds:.2f}s "
        f"({summary.rows_per_s:,.0f} rows/s) -> {args.output}"
    )
    if len(summary.models) > 1:
        note(f"warning: the predictions come from several models: {sorted(summary.models)}")
    return 0


def cmd_health(client: Client, args: argparse.Namespace) -> int:
    report = client.health()
    if report is None:
        print("no health report yet: is `celery -A worker beat` running?", file=sys.stderr)
        return 1
    if args.json:
        _print_json(report)
    else:
        print(format_health(HealthReport.model_validate(report)))
    return 0 if report["status"] == "ok" else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m producer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def add_queue_wait(p: argparse.ArgumentParser) -> None:
        p.add_argument("--queue", default="cpu", help="cpu, gpu, or a queue name (default cpu)")
        p.add_argument("--no-wait", action="store_true", help="print the task id and return")
        p.add_argument("--timeout", type=float, default=None, help="seconds to wait")

    p = sub.add_parser("predict", help="one row: python -m producer predict 0.1 0.2 0.3 0.4 0.5")
    p.add_argument("features", nargs="+", type=float)
    add_queue_wait(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "explain", help="one row's SHAP contributions: python -m producer explain 0.1 0.2 ..."
    )
    p.add_argument("features", nargs="+", type=float)
    add_queue_wait(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("batch", help="rows from a JSON file ([[...], ...]) or - for stdin")
    p.add_argument("rows")
    add_queue_wait(p)
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("status", help="a task's state, result or error, without waiting")
    p.add_argument("task_id")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("wait", help="wait for a task and print its result or error")
    p.add_argument("task_id")
    p.add_argument("--timeout", type=float, default=None)
    p.set_defaults(func=cmd_wait)

    p = sub.add_parser(
        "score", help="score a CSV or Parquet file: every row back, in order, resumable"
    )
    p.add_argument("input")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--queue", default="cpu")
    p.add_argument("--chunk-rows", type=int, default=None)
    p.add_argument("--in-flight", type=int, default=None)
    p.add_argument("--features", default=None, help="comma-separated feature column names")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait for one chunk")
    p.add_argument(
        "--format",
        choices=["csv", "parquet"],
        default=None,
        help="of the input and the output (default: by the input's extension, .parquet/.pq)",
    )
    p.add_argument(
        "--explain",
        action="store_true",
        help="also write each row's SHAP contributions (shap_<feature>) and shap_base",
    )
    p.add_argument(
        "--restart",
        action="store_true",
        help="discard an earlier run's journal for this output instead of resuming it",
    )
    p.set_defaults(func=cmd_score)

    p = sub.add_parser(
        "model-info", help="what the workers serve: version, features, metrics, importances"
    )
    p.add_argument("--queue", default="cpu", help="cpu, gpu, or a queue name (default cpu)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_model_info)

    p = sub.add_parser("health", help="the latest health report")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_health)

    p = sub.add_parser(
        "metrics", help="serve the queues' Prometheus metrics (depth, oldest age, workers)"
    )
    p.add_argument("--port", type=int, required=True, help="HTTP port of /metrics")
    p.add_argument("--addr", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    p.set_defaults(func=None)
    return parser


def cmd_metrics(settings: ProducerSettings, args: argparse.Namespace) -> int:
    import logging

    from producer.exporter import serve_forever

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        serve_forever(settings, args.port, args.addr)
    except KeyboardInterrupt:
        return 0
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = ProducerSettings()
    try:
        if args.command == "metrics":
            return cmd_metrics(settings, args)
        with Client(settings) as client:
            return int(args.func(client, args))
    except InferenceError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except TimeoutError as exc:
        print(f"error: timeout: {exc}", file=sys.stderr)
        return 3
    except OSError as exc:
        print(f"error: {exc} (redis: {redact(settings.redis_url)})", file=sys.stderr)
        return 4
