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
    if not report.workers:
        lines.append("  no live workers")
    return "\n".join(lines)
