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
)

P5_GOAL_S = 3.0


def _meets(value: float, goal: str) -> bool:
    op, _, bound = goal.partition(" ")
    return value >= float(bound) if op == ">=" else value <= float(bound)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def compute_ratios(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    ratios: dict[str, dict[str, Any]] = {}
    for spec in RATIOS:
        num = _number(lookup(report, spec.numerator))
        den = _number(lookup(report, spec.denominator))
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
    speedup = _number(goals.get("one_row_speedup"))
    size = _number(goals.get("artifact_bytes"))
    loss = _number(goals.get("r2_loss"))
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
    ready = _number(lookup(report, "worker.start_to_ready_s"))
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
    }


# -- the printed table ---------------------------------------------------------------------


def _f(value: Any, spec: str = ",.2f") -> str:
    number = _number(value)
    return "-" if number is None else format(number, spec)


def _latency_row(label: str, count: Any, lat: dict[str, Any] | None, extra: str = "") -> str:
    lat = lat or {}
    return (
        f"  {label:<46}{_f(count, ',.0f'):>8}{_f(lat.get('p50_ms')):>10}"
        f"{_f(lat.get('p95_ms')):>10}{_f(lat.get('p99_ms')):>10}  {extra}"
    )


def _cpu(part: dict[str, Any]) -> str:
    cpu, seconds = _number(part.get("producer_cpu_s")), _number(part.get("seconds"))
    return f" (producer CPU {cpu / seconds:.0%})" if cpu is not None and seconds else ""


def _unavailable(label: str, reason: Any) -> str:
    return f"  {label:<46}  unavailable: {reason}"


def format_report(report: dict[str, Any]) -> str:
    m = report["machine"]
    model = report.get("model") or {}
    worker = report.get("worker") or {}
    lines = [
        f"queue-inference bench ({report['mode']}{', quick' if report['config']['quick'] else ''})",
        f"machine: {m['cores']} cores, {m['cpu_model']}, Python {m['python']}, "
        f"onnxruntime {m['onnxruntime'] or 'absent'}, celery {m['celery']}, "
        f"redis-server {report.get('redis', {}).get('server_version') or '?'}",
        f"model {model.get('name')}/{model.get('version')} ({model.get('n_features')} features); "
        f"queue {report['config']['queue']}; worker(s) {', '.join(worker.get('hostnames', []))} "
        f"({worker.get('processes')} process(es))",
        f"note: {NOISE_NOTE}",
        "",
        f"  {'measurement':<46}{'n':>8}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}  throughput",
    ]
    single = report.get("single_row", {})
    for task in ("predict", "noop"):
        part = single.get(task) or {}
        label = f"single-row {task}, sequential round trip"
        if part.get("available", True):
            in_worker = (part.get("worker_task") or {}).get("p50_ms")
            extra = (
                f"(task in worker: p50 {_f(in_worker, ',.3f')} ms)" if in_worker is not None else ""
            )
            lines.append(_latency_row(label, part.get("count"), part, extra))
        else:
            lines.append(_unavailable(label, part.get("reason")))
    sustained = report.get("sustained", {})
    for task in ("predict", "plain_celery", "noop"):
        part = sustained.get(task) or {}
        label = f"single-row {task}, {_f(part.get('window'), ',.0f')} in flight"
        if not part:
            continue
        if part.get("available", True):
            lines.append(
                _latency_row(
                    label,
                    part.get("jobs"),
                    part.get("latency"),
                    f"{_f(part.get('jobs_per_s'), ',.0f')} jobs/s{_cpu(part)}",
                )
            )
        else:
            lines.append(_unavailable(label, part.get("reason")))
    histogram = (sustained.get("predict") or {}).get("batch_sizes")
    if histogram:
        text = ", ".join(f"{size}: {count}" for size, count in histogram.items())
        lines.append(f"  {'':<46}  row-lane batches by size: {text}")
    batch = report.get("batch") or {}
    if batch:
        shape = f"{_f(batch.get('jobs'), ',.0f')} x {_f(batch.get('rows_per_job'), ',.0f')} rows"
        seq = batch.get("sequential") or {}
        lines.append(
            _latency_row(
                f"batch {shape}, sequential",
                batch.get("jobs"),
                seq.get("latency"),
                f"{_f(seq.get('rows_per_s'), ',.0f')} rows/s",
            )
        )
        conc = batch.get("concurrent") or {}
        lines.append(
            _latency_row(
                f"batch {shape}, {_f(conc.get('in_flight'), ',.0f')} in flight",
                batch.get("jobs"),
                conc.get("latency"),
                f"{_f(conc.get('rows_per_s'), ',.0f')} rows/s{_cpu(conc)}",
            )
        )
    bulk = report.get("bulk") or {}
    if bulk:
        label = (
            f"bulk CSV, chunks of {_f(bulk.get('chunk_rows'), ',.0f')}, "
            f"{_f(bulk.get('in_flight'), ',.0f')} in flight"
        )
        lines.append(
            f"  {label:<46}{_f(bulk.get('rows_in'), ',.0f'):>8}{'':>30}  "
            f"{_f(bulk.get('rows_per_s'), ',.0f')} rows/s ({_f(bulk.get('seconds'))} s end to end)"
        )
    inproc = report.get("inprocess") or {}
    if inproc.get("available"):
        one = inproc.get("one_row") or {}
        lines.append(
            f"  {'in-process onnxruntime, 1 row, 1 thread (us)':<46}"
            f"{_f(one.get('calls'), ',.0f'):>8}"
            f"{_f(one.get('p50_us'), ',.1f'):>10}{_f(one.get('p95_us'), ',.1f'):>10}"
        )
        for key in ("batch_all_cores", "batch_one_thread"):
            part = inproc.get(key) or {}
            label = (
                f"in-process onnxruntime, {_f(part.get('rows'), ',.0f')} rows, "
                f"{_f(part.get('threads'), ',.0f')} thread(s)"
            )
            lines.append(f"  {label:<46}{'':>38}  {_f(part.get('rows_per_s'), ',.0f')} rows/s")
        if inproc.get("warning"):
            lines.append(f"  {'':<46}  warning: {inproc['warning']}")
    else:
        lines.append(_unavailable("in-process onnxruntime", inproc.get("reason")))
    if worker.get("start_to_ready_s") is not None:
        lines.append(f"  {'worker start -> ready':<46}{'':>38}  {_f(worker['start_to_ready_s'])} s")

    lines += ["", "goals (ratios from this run)"]
    for key, r in report.get("ratios", {}).items():
        if r["value"] is None:
            lines.append(f"  {key:<8}{r['label']}: {r['unavailable']}")
            continue
        verdict = "" if r["met"] is None else ("  met" if r["met"] else "  NOT met")
        goal = f"  goal {r['goal']}" if r["goal"] else "  (information)"
        lines.append(f"  {key:<8}{r['value']:>8.3f}  {r['label']}{goal}{verdict}")
        if r["note"]:
            lines.append(f"  {'':<18}({r['note']})")
    for key, g in report.get("goals", {}).items():
        if g["value"] is None:
            lines.append(f"  {key:<8}{g['label']}: {g['unavailable']}")
            continue
        verdict = "  met" if g["met"] else "  NOT met"
        lines.append(f"  {key:<8}{g['value']:>8.2f}  {g['label']}  goal {g['goal']}{verdict}")
        if g.get("detail"):
            lines.append(f"  {'':<18}({g['detail']})")

    checks = report.get("checks") or {}
    lines += ["", f"checks: {'passed' if checks.get('passed') else 'FAILED'}"]
    for item in checks.get("items", []):
        lines.append(f"  [{item['status']}] {item['name']}: {item['detail']}")
    return "\n".join(lines)
