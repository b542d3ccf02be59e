"""Reading the workers' state from Redis, and what they publish as text: the health report
(`python -m producer health`, the demo, the worker's log) and the model they serve
(`python -m producer model-info`). The health task (worker/health.py) and the queue exporter
(producer/exporter.py) read the same state."""

from __future__ import annotations

import redis
from pydantic import ValidationError

from contract.names import WORKER_STATE_PREFIX, priority_lists
from contract.schemas import HealthReport, ModelInfo, WorkerState


def live_states(
    client: redis.Redis, hostname: str | None = None, queue: str | None = None
) -> list[WorkerState]:
    """The state of every live worker process (each refreshes its own key, with a TTL), or
    of those of worker `hostname`, or of those consuming `queue`."""
    match = f"{WORKER_STATE_PREFIX}{hostname}:*" if hostname else f"{WORKER_STATE_PREFIX}*"
    keys = sorted(client.scan_iter(match=match, count=500))
    if not keys:
        return []
    states = []
    for raw in client.mget(keys):
        if raw is None:  # expired between SCAN and MGET
            continue
        try:
            state = WorkerState.model_validate_json(raw)
        except ValidationError:
            continue
        if queue is None or queue in state.queues:
            states.append(state)
    return states


def queue_depths(broker: redis.Redis, queues: list[str]) -> dict[str, int]:
    """Jobs waiting on each queue, its priority lists summed, in one round trip."""
    with broker.pipeline(transaction=False) as pipe:
        for queue in queues:
            for name in priority_lists(queue):
                pipe.llen(name)
        lengths = pipe.execute()
    per = len(priority_lists(""))
    return {q: int(sum(lengths[i * per : (i + 1) * per])) for i, q in enumerate(queues)}


def format_health(report: HealthReport) -> str:
    lines = [f"status: {report.status}   queue depths: {report.queue_depths}"]
    for w in report.workers:
        lat = w.latency
        batches = ", ".join(f"{k}: {v}" for k, v in w.batch_sizes.items())
        lines.append(
            f"  {w.hostname}: {w.processes} process(es), pool {w.pool}, queues {w.queues}, "
            f"model {w.model_name}/{w.model_version} on {w.device} ({w.provider}), "
            f"done {w.jobs_done} failed {w.jobs_failed} rows {w.rows_done}, "
            f"task p50/p95/p99 {lat.p50_ms}/{lat.p95_ms}/{lat.p99_ms} ms, "
            f"up {w.uptime_s:.0f}s" + (f", row batches {batches}" if batches else "")
        )
        if w.serving is not None:
            sv = w.serving
            line = f"    serving generation {sv.generation}, loaded {sv.loaded_versions}"
            if sv.challenger_version:
                line += (
                    f", challenger {sv.challenger_version} canary {sv.canary_percent:g}%"
                    f" shadow {'on' if sv.shadow else 'off'}"
                )
            if sv.shadow_rows:
                line += (
                    f", shadow rows {sv.shadow_rows} mean |diff| {sv.shadow_mean_abs_diff}"
                    f" p99 {sv.shadow_p99_abs_diff}"
                )
            if sv.error:
                line += f", NOT APPLIED: {sv.error}"
            lines.append(line)
    if not report.workers:
        lines.append("  no live workers")
    return "\n".join(lines)


def format_model_info(info: ModelInfo) -> str:
    """What `python -m producer model-info` prints."""
    lines = [
        f"model {info.name} version {info.version}",
        f"features ({info.n_features}): {', '.join(info.feature_names)}"
        + (f"; target {info.target}" if info.target else ""),
        f"max rows per job: {info.max_batch_rows}",
    ]
    if info.metrics:
        lines.append(
            "metrics: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(info.metrics.items()))
        )
    lines.append(
        "explanations: "
        + ("not served" if info.base_value is None else f"base value {info.base_value:.6g}")
    )
    if info.importances:
        kinds = sorted(info.importances)
        key = "mean_abs_shap" if "mean_abs_shap" in kinds else kinds[0]
        width = max(len(f) for f in info.feature_names)
        lines.append("importances (most important first, by " + key + "):")
        lines.append("  " + " " * width + "".join(f"{k:>25}" for k in kinds))
        for name in sorted(info.feature_names, key=lambda f: -info.importances[key].get(f, 0.0)):
            cells = "".join(f"{info.importances[k].get(name, float('nan')):>25.4g}" for k in kinds)
            lines.append(f"  {name:>{width}}{cells}")
    return "\n".join(lines)
