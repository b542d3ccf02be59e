"""The Celery application and its configuration, built from WorkerSettings.

`celery -A worker` imports this module (Celery's `proj/celery.py` layout); it is the only
module of `worker` whose import builds anything. Tasks come in through `include`, process
start-up through lifecycle's signal handlers; patches to kombu wait for `worker_init`.
"""

from __future__ import annotations

from celery import Celery

from contract.names import QUEUE_CPU, TASK_HEALTH, TASK_PREDICT, TASK_PREDICT_BATCH, row_queue
from producer.connections import celery_ssl_options
from worker import lifecycle
from worker.broker.transport import transport_for
from worker.settings import load

settings = load()

app = Celery(
    "inference", broker=settings.broker, backend=settings.backend, include=["worker.tasks"]
)
app.conf.update(
    # Only JSON crosses the queue; a pickled message is refused, never deserialized.
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    # At-least-once: a job is acknowledged after it ran, and handed to another
    # worker if its process dies. Predictions are idempotent, so a rerun is harmless.
    task_acks_late=True,
    # kombu's Redis transport with an atomic take (worker.broker): a job is recorded as held
    # in the step that takes it off the queue, so no instant of a worker's death loses it.
    broker_transport=transport_for(settings.broker),
    task_reject_on_worker_lost=True,
    worker_cancel_long_running_tasks_on_connection_loss=True,
    broker_transport_options={
        "visibility_timeout": settings.visibility_timeout_s,
        # Scan for jobs of dead workers every few seconds (kombu's default is
        # every ~100 s), so they come back soon after the visibility timeout.
        "unacked_restore_interval": settings.restore_interval_s,
        "unacked_restore_throttle": 1,
        # The scan's lock outlives a worker that dies holding it (or a Redis restart) by
        # this long; kombu's 5 minutes would hold back every redelivery that long.
        "unacked_mutex_expire": 30,
        "held_ttl_s": settings.held_ttl_s,
        # Read by kombu's Sentinel transport only (sentinel:// URLs).
        "master_name": settings.sentinel_master,
    },
    result_backend_transport_options={"master_name": settings.sentinel_master},
    broker_connection_retry_on_startup=True,
    # A result that cannot be written while Redis restarts is retried, not lost.
    result_backend_always_retry=True,
    result_backend_max_retries=60,
    worker_prefetch_multiplier=settings.prefetch_multiplier,
    task_soft_time_limit=settings.task_soft_time_limit_s,
    task_time_limit=settings.task_time_limit_s,
    result_expires=settings.result_ttl_s,
    task_default_queue=QUEUE_CPU,
    task_routes={
        TASK_PREDICT: {"queue": row_queue(QUEUE_CPU)},
        TASK_PREDICT_BATCH: {"queue": QUEUE_CPU},
        TASK_HEALTH: {"queue": settings.health_queue},
    },
    beat_schedule={
        "inference-health": {
            "task": TASK_HEALTH,
            "schedule": settings.health_interval_s,
            # The report outlives three missed runs of the beat that scheduled it.
            "kwargs": {"ttl_s": int(settings.health_interval_s * 3) + 1},
            # A report nobody ran in time is stale: drop it rather than pile them up.
            "options": {"queue": settings.health_queue, "expires": settings.health_interval_s},
        }
    },
    worker_hijack_root_logger=True,
    # A message Celery's consumer cannot handle is dropped (and failed if it has an id)
    # instead of stopping the worker or stalling the queue: see worker.guards.GuardedConsumer.
    worker_consumer="worker.guards:GuardedConsumer",
)
app.conf.update(celery_ssl_options(settings))
lifecycle.connect(app)
