"""Celery's remote inspection, told about the row lanes: `inspect active_queues` lists the
row queues the worker's processes serve themselves, and `inspect stats` counts their jobs.

Celery's own commands see only its consumer: the queues it consumes and the tasks its main
process handed to the pool. These replace the two commands by name in Celery's registry of
remote commands (the Panel), answering what Celery answers plus the row lanes.
"""

from __future__ import annotations

from typing import Any

from celery.worker.control import inspect_command
from kombu import Exchange, Queue

from worker import metrics


def lane_queue_dicts(lanes: list[str]) -> list[dict[str, Any]]:
    """The row queues as `inspect active_queues` describes a queue, declared as Celery
    declares a queue named in -Q (a direct exchange of its own name)."""
    return [dict(Queue(q, Exchange(q), routing_key=q).as_dict(recurse=True)) for q in lanes]


def register_commands(identity: dict[str, Any]) -> None:
    """Replace active_queues and stats; `identity` is the worker's, filled at its start."""

    @inspect_command(name="active_queues")
    def active_queues(state: Any) -> list[dict[str, Any]]:
        """List the task queues a worker is currently consuming from, row queues included."""
        consumer = state.consumer.task_consumer
        queues = [dict(q.as_dict(recurse=True)) for q in consumer.queues] if consumer else []
        return queues + lane_queue_dicts(identity["lanes"])

    @inspect_command(name="stats")
    def stats(state: Any, **_: Any) -> dict[str, Any]:
        """Request worker statistics/information, the row lanes' jobs counted in `total`."""
        info = dict(state.consumer.controller.stats())
        path = identity.get("metrics_dir")
        lane = metrics.job_counts(path, identity["lanes"]) if path else {}
        total = dict(info.get("total") or {})
        for task, n in lane.items():
            total[task] = total.get(task, 0) + n
        info["total"] = total
        info["row_lanes"] = {
            "queues": list(identity["lanes"]),
            "total": lane if path else "uncounted: INFERENCE_METRICS_PORT is unset",
        }
        return info
