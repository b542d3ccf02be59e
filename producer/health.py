"""What the workers publish, as text: the health report (`python -m producer health`, the
demo, the worker's log) and the model they serve (`python -m producer model-info`)."""

from __future__ import annotations

from contract.schemas import HealthReport, ModelInfo


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
