"""The health report: live worker processes, grouped per worker, plus queue depths."""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from typing import Literal

import redis

from contract.names import HEALTH_REPORT_KEY, bucket_low
from contract.schemas import HealthReport, LatencySummary, ServingStatus, WorkerHealth, WorkerState
from producer.health import format_health, live_states, queue_depths

__all__ = [
    "build_report",
    "live_states",
    "log_report",
    "merge_serving",
    "queue_depths",
    "store_report",
]

log = logging.getLogger(__name__)


def _merge_counts(counts: list[dict[str, int]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for c in counts:
        total.update(c)
    # Buckets in size order ("1", "2-3", "4-7", ...), not as strings sort.
    return dict(sorted(total.items(), key=lambda kv: bucket_low(kv[0])))


def group_by_worker(states: list[WorkerState], now: float) -> list[WorkerHealth]:
    groups: dict[str, list[WorkerState]] = defaultdict(list)
    for state in states:
        groups[state.hostname].append(state)
    workers = []
    for hostname, procs in sorted(groups.items()):
        first = min(procs, key=lambda s: s.started_at)
        workers.append(
            WorkerHealth(
                hostname=hostname,
                processes=len(procs),
                queues=sorted({q for s in procs for q in s.queues}),
                pool=first.pool,
                model_name=first.model_name,
                model_version=",".join(sorted({s.model_version for s in procs})),
                provider=",".join(sorted({s.provider for s in procs})),
                device=",".join(sorted({s.device for s in procs})),
                jobs_done=sum(s.jobs_done for s in procs),
                jobs_failed=sum(s.jobs_failed for s in procs),
                rows_done=sum(s.rows_done for s in procs),
                latency=LatencySummary.of([ms for s in procs for ms in s.recent_task_ms]),
                batch_sizes=_merge_counts([s.batch_sizes for s in procs]),
                uptime_s=round(now - first.started_at, 1),
                last_seen_s=round(now - max(s.updated_at for s in procs), 1),
                serving=merge_serving([s.serving for s in procs if s.serving is not None]),
            )
        )
    return workers


def merge_serving(statuses: list[ServingStatus]) -> ServingStatus | None:
    if not statuses:
        return None
    rows = sum(s.shadow_rows for s in statuses)
    weighted = sum(s.shadow_rows * (s.shadow_mean_abs_diff or 0.0) for s in statuses)
    p99s = [s.shadow_p99_abs_diff for s in statuses if s.shadow_p99_abs_diff is not None]
    oldest = min(statuses, key=lambda s: s.generation)
    return ServingStatus(
        generation=oldest.generation,
        challenger_version=oldest.challenger_version,
        canary_percent=oldest.canary_percent,
        shadow=oldest.shadow,
        loaded_versions=sorted({v for s in statuses for v in s.loaded_versions}),
        error=next((s.error for s in statuses if s.error), None),
        shadow_rows=rows,
        shadow_mean_abs_diff=round(weighted / rows, 6) if rows else None,
        shadow_p99_abs_diff=max(p99s) if p99s else None,
    )


def build_report(
    state_client: redis.Redis, broker_client: redis.Redis, queues: list[str]
) -> HealthReport:
    now = time.time()
    workers = group_by_worker(live_states(state_client), now)
    depths = queue_depths(broker_client, queues)
    served = {q for w in workers for q in w.queues}
    status: Literal["ok", "degraded", "down"]
    if not workers:
        status = "down"
    elif all(q in served for q in queues if depths.get(q)):
        status = "ok"
    else:
        # Jobs are waiting on a queue that no live worker consumes.
        status = "degraded"
    return HealthReport(status=status, generated_at=now, workers=workers, queue_depths=depths)


def store_report(client: redis.Redis, report: HealthReport, ttl_s: int) -> None:
    client.set(HEALTH_REPORT_KEY, report.model_dump_json(), ex=ttl_s)


def log_report(report: HealthReport) -> None:
    log.info("health report\n%s", format_health(report))
