"""The health report as text: what `python -m producer health`, the demo and the worker's
log print."""

from __future__ import annotations

from contract.schemas import HealthReport


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
