"""The benchmark's report: the machine it ran on, the goal ratios, and the printed table.

Pure functions over the JSON document `stack.bench.run` builds, so the figures printed
are exactly the ones written, and a ratio can be checked against its own inputs.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from importlib import metadata
from typing import Any

# Figures are compared against these; a ratio is only as good as one run on one machine.
NOISE_NOTE = "noisy machine: compare ratios from one run, not absolute figures across runs"


def cpu_cores() -> int:
    """Cores this process may run on (a container's CPU set, not the host's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in {"model name", "Model", "cpu model"}:
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _version(*distributions: str) -> str | None:
    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def machine_info() -> dict[str, Any]:
    return {
        "cores": cpu_cores(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        # Metadata, not imports: the producer install has no onnxruntime, and either
        # distribution (CPU or GPU build) provides the same import package.
        "onnxruntime": _version("onnxruntime", "onnxruntime-gpu"),
        "celery": _version("celery"),
        "kombu": _version("kombu"),
        "redis_py": _version("redis"),
        "numpy": _version("numpy"),
    }


def lookup(report: dict[str, Any], path: str) -> Any:
    """The value at a dotted path of the report, or None where any step is missing."""
    node: Any = report
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


@dataclass(frozen=True)
class RatioSpec:
    key: str
    label: str
    numerator: str
    denominator: str
    goal: str | None
    """'>= x' or '<= x'; None for figures shown for information."""
    note: str = ""


RATIOS: tuple[RatioSpec, ...] = (
    RatioSpec(
        "P1",
        "bulk CSV rows/s / in-process onnxruntime all-core batch rows/s",
        "bulk.rows_per_s",
        "inprocess.batch_all_cores.rows_per_s",
        ">= 0.75",
    ),
    RatioSpec(
        "P2",
        "sustained single-row jobs/s, this product / plain Celery (send_task per row)",
        "sustained.predict.jobs_per_s",
        "sustained.plain_celery.jobs_per_s",
        ">= 3",
    ),
    RatioSpec(
        "P3",
        "single-row predict p50 / noop p50 (sequential round trips)",
        "single_row.predict.p50_ms",
        "single_row.noop.p50_ms",
        "<= 1.2",
    ),
    RatioSpec(
        "G1",
        "gateway single-row jobs/s (64 connections) / plain Celery (send_task per row)",
        "gateway.sustained.jobs_per_s",
        "sustained.plain_celery.jobs_per_s",
        ">= 3",
    ),
    RatioSpec(
        "G2",
        "gateway POST /api/v1/predict p50 / direct client p50 (sequential, interleaved)",
        "gateway.sequential.gateway.p50_ms",
        "gateway.sequential.direct_client.p50_ms",
        "<= 2",
    ),
    RatioSpec(
        "M1",
        "sustained single-row jobs/s, worker metrics + task events on / both off",
        "monitoring.on.jobs_per_s",
        "monitoring.off.jobs_per_s",
        ">= 0.9",
    ),
    RatioSpec(
        "A1",
        "asyncio client jobs/s / sync client jobs/s (send_many + iter_finished, one loop)",
        "clients.async.jobs_per_s",
        "clients.sync.jobs_per_s",
        ">= 0.8",
    ),
)

P5_GOAL_S = 3.0
A2_GOAL_MS = 20.0


def _meets(value: float, goal: str) -> bool:
    op, _, bound = goal.partition(" ")
    return value >= float(bound) if op == ">=" else value <= float(bound)


def as_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def compute_ratios(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    ratios: dict[str, dict[str, Any]] = {}
    for spec in RATIOS:
        num = as_number(lookup(report, spec.numerator))
        den = as_number(lookup(report, spec.denominator))
        value = num / den if num is not None and den else None
        missing = [
            path
            for path, v in ((spec.numerator, num), (spec.denominator, den))
            if v is None or v == 0
        ]
        ratios[spec.key] = {
            "label": spec.label,
            "value": value,
            "numerator": {"path": spec.numerator, "value": num},
            "denominator": {"path": spec.denominator, "value": den},
            "goal": spec.goal,
            "met": None if value is None or spec.goal is None else _meets(value, spec.goal),
            "note": spec.note,
            "unavailable": None if value is not None else f"not measured: {', '.join(missing)}",
        }
    return ratios


P4_SPEEDUP = 50.0
P4_MAX_BYTES = 5_000_000
P4_MAX_R2_LOSS = 0.01


def _p4(goals: dict[str, Any]) -> dict[str, Any]:
    label = "onnxruntime vs scikit-learn per row (1-row p50), x"
    if not goals.get("available"):
        return {
            "label": label,
            "value": None,
            "goal": None,
            "met": None,
            "unavailable": goals.get("reason") or "no training benchmark",
        }
    speedup = as_number(goals.get("one_row_speedup"))
    size = as_number(goals.get("artifact_bytes"))
    loss = as_number(goals.get("r2_loss"))
    met = (
        speedup is not None
        and speedup >= P4_SPEEDUP
        and size is not None
        and size <= P4_MAX_BYTES
        and (loss is None or loss <= P4_MAX_R2_LOSS)
    )
    size_text = f"{size / 1e6:.2f} MB" if size is not None else "?"
    loss_text = f"{loss:.4f}" if loss is not None else "none (unpruned)"
    return {
        "label": label,
        "value": speedup,
        "goal": f">= {P4_SPEEDUP:g}, model.onnx <= {P4_MAX_BYTES / 1e6:g} MB, "
        f"R2 loss vs unpruned <= {P4_MAX_R2_LOSS:g}",
        "met": met,
        "detail": f"model.onnx {size_text}, R2 loss {loss_text}; measured by `python -m "
        f"training` at {goals.get('measured_at')} on {goals.get('cores')} cores",
        "unavailable": None,
    }


def compute_goals(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    ready = as_number(lookup(report, "worker.start_to_ready_s"))
    return {
        "P5": {
            "label": "worker start -> ready (all processes loaded and warmed), seconds",
            "path": "worker.start_to_ready_s",
            "value": ready,
            "goal": f"<= {P5_GOAL_S:g}",
            "met": None if ready is None else ready <= P5_GOAL_S,
            "unavailable": None
            if ready is not None
            else "measured only with --embedded (the bench starts the worker)",
        },
        "P4": _p4(report.get("model_goals") or {}),
        "A2": _loop_lag(lookup(report, "clients.loop_lag.held_max_ms")),
    }


def _loop_lag(value: Any) -> dict[str, Any]:
    lag = as_number(value)
    return {
        "label": "most the asyncio client held its loop (a 1 ms ticker late while it ran), ms",
        "path": "clients.loop_lag.held_max_ms",
        "value": lag,
        "goal": f"<= {A2_GOAL_MS:g}",
        "met": None if lag is None else lag <= A2_GOAL_MS,
        "unavailable": None if lag is not None else "not measured",
    }
