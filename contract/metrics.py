"""The Prometheus metrics' names, labels and buckets: the workers (worker/metrics.py) and the
queue exporter (producer/exporter.py) publish them, dashboards and alerts read them.

Base units (seconds, jobs, rows); every label has a bounded set of values (queues, task
names, models, devices, outcomes), never a task id.
"""

from __future__ import annotations

# -- per worker (each worker's INFERENCE_METRICS_PORT) ---------------------------------------
JOBS_TOTAL = "inference_jobs_total"
"""Counter{queue,task,model,version,device,outcome}: jobs ended, by outcome."""
ROWS_TOTAL = "inference_rows_total"
"""Counter{queue,model,version,device,outcome}: rows of those jobs."""
QUEUE_WAIT_SECONDS = "inference_queue_wait_seconds"
"""Histogram{queue}: from the producer's enqueue (HEADER_ENQUEUED_AT) to the job's start."""
COMPUTE_SECONDS = "inference_compute_seconds"
"""Histogram{queue,model,version,device}: one model run (a lane batch or a batch job)."""
TASK_SECONDS = "inference_task_seconds"
"""Histogram{queue,task}: a whole job in the worker, from its receipt to its result written."""
LANE_BATCH_SIZE = "inference_lane_batch_size"
"""Histogram{queue}: jobs taken in one row-lane batch."""
MODEL_LOAD_SECONDS = "inference_model_load_seconds"
"""Gauge{model,version,device}: the last model load (session creation and checks)."""
MODEL_WARMUP_SECONDS = "inference_model_warmup_seconds"
"""Gauge{model,version,device}: the last model warm-up."""
MODEL_INFO = "inference_model_info"
"""Gauge{model,version,device,provider,hostname}: 1 for each model a worker has loaded."""
SERVING_DECISIONS_TOTAL = "inference_serving_decisions_total"
"""Counter{model,outcome}: serving decisions (`python -m training promote`) a worker process
applied, or refused because a version failed a check (it keeps serving the old ones)."""
SHADOW_ROWS_TOTAL = "inference_shadow_rows_total"
"""Counter{model,version,challenger,device}: rows the champion (`version`) served that the
challenger also ran on in shadow."""
SHADOW_SKIPPED_ROWS_TOTAL = "inference_shadow_skipped_rows_total"
"""Counter{model,version,challenger,device,reason}: rows left without their shadow run."""
SHADOW_ABS_DIFF = "inference_shadow_abs_diff"
"""Histogram{model,version,challenger,device}: |challenger - champion| per shadowed row, in
the model's output units."""

# -- from one place: the queue exporter (python -m producer metrics) -------------------------
QUEUE_DEPTH = "inference_queue_depth"
"""Gauge{queue}: jobs waiting, every priority list of the queue summed."""
QUEUE_OLDEST_AGE_SECONDS = "inference_queue_oldest_age_seconds"
"""Gauge{queue}: age of the oldest waiting job by its enqueued_at header; 0 for an empty
queue, NaN when that job carries no such header."""
WORKERS_LIVE = "inference_workers_live"
"""Gauge{queue}: live worker processes consuming the queue (from their heartbeats)."""
JOBS_HELD = "inference_jobs_held"
"""Gauge{queue}: jobs delivered to a worker and not yet acknowledged."""

# Outcomes of a job: a result (success), its error (failure), not run because revoked or
# expired (revoked), or its message refused before it was read as a job (refused).
SUCCESS = "success"
FAILURE = "failure"
REVOKED = "revoked"
REFUSED = "refused"
OUTCOMES = (SUCCESS, FAILURE, REVOKED, REFUSED)

# Outcomes of a serving decision in a worker process.
APPLIED = "applied"
DECISION_REFUSED = "refused"
DECISION_OUTCOMES = (APPLIED, DECISION_REFUSED)
# Why a row got no shadow run: the runs had used their share of the process's time
# (INFERENCE_SHADOW_MAX_SHARE), the shadow queue was full, or the challenger failed on it.
SHADOW_SKIP_SHARE = "share"
SHADOW_SKIP_QUEUE_FULL = "queue_full"
SHADOW_SKIP_ERROR = "error"
SHADOW_SKIP_REASONS = (SHADOW_SKIP_SHARE, SHADOW_SKIP_QUEUE_FULL, SHADOW_SKIP_ERROR)

OTHER_TASK = "other"
"""The task label of a message that names no task of this project."""

# Buckets, in the metrics' units: latencies from 100 us (a lane row) to a minute (a batch
# job near the time limit); batch sizes in powers of two up to the lane's largest batch.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 10_000)
# |challenger - champion| in output units: from float32 rounding (identical models) to
# a disagreement as large as typical targets.
ABS_DIFF_BUCKETS = (
    1e-6, 1e-5, 1e-4, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 100.0,
)  # fmt: skip
