"""Names both sides agree on: tasks, queues, message headers and Redis keys.

Producer and worker import them from here; nothing else spells them.
"""

from __future__ import annotations

TASK_PREDICT = "inference.predict"
TASK_PREDICT_BATCH = "inference.predict_batch"
# SHAP contributions of each row (same arguments and limits as inference.predict_batch).
TASK_EXPLAIN = "inference.explain"
TASK_HEALTH = "inference.health"
# Does nothing: Celery's own cost per message, the baseline the benchmark compares with.
TASK_NOOP = "inference.noop"

QUEUE_CPU = "inference.cpu"
QUEUE_GPU = "inference.gpu"
QUEUES: dict[str, str] = {"cpu": QUEUE_CPU, "gpu": QUEUE_GPU}

# Single-row jobs (inference.predict) and explanations (inference.explain) go to their own
# queue beside each of these, where every worker process takes them in batches
# (worker.lane); the queues above carry the rest (batches, health) through Celery's own
# consumer, and serve any of those tasks sent there directly.
ROW_QUEUE_SUFFIX = ".rows"


def row_queue(queue: str) -> str:
    """The single-row queue that goes with `queue` (itself if it already is one)."""
    return queue if queue.endswith(ROW_QUEUE_SUFFIX) else f"{queue}{ROW_QUEUE_SUFFIX}"


def queue_for(task: str, queue: str) -> str:
    """Where a `task` for the workers of `queue` is sent."""
    return row_queue(queue) if task in (TASK_PREDICT, TASK_EXPLAIN) else queue


# Optional message header (Unix seconds, float) set by the producer when it
# enqueues; the worker turns it into the queue-wait latency.
HEADER_ENQUEUED_AT = "enqueued_at"

# Optional routing of a job among the versions a worker serves, as a message header or a
# kwarg of the same name: a version or alias to pin, and the key (an entity id) that keeps a
# canary split sticky.
HEADER_MODEL_VERSION = "model_version"
HEADER_ROUTING_KEY = "routing_key"
# The versions a pin may name by role (contract.schemas.ServingDecision).
ALIAS_CHAMPION = "champion"
ALIAS_CHALLENGER = "challenger"

VERSION_TEXT = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
"""How a version or alias that can be pinned is spelled (training's 20261128-001839-22b4fe, a
registry's 3, champion): a worker loads no other pin, since it would be read as a path and
could lead out of the model directory."""
MAX_PIN_CHARS = 128
MAX_ROUTING_KEY_CHARS = 256

# Redis keys, all in the result-backend database.
HEALTH_REPORT_KEY = "inference:health:report"
WORKER_STATE_PREFIX = "inference:worker:"
MODEL_INFO_PREFIX = "inference:model:info:"
# The serving decision of each model (contract.schemas.ServingDecision), written by
# `python -m training promote` / `rollback`, which then publish the model's name on
# SERVING_CHANNEL so that every worker process reloads it at once (they also poll the key).
SERVING_PREFIX = "inference:serving:"
SERVING_CHANNEL = "inference:serving:changed"


def serving_key(name: str) -> str:
    return f"{SERVING_PREFIX}{name}"


# kombu's Redis transport (broker database): each queue is a list of that name; a message
# delivered and not yet acknowledged is kept in UNACKED_KEY (tag -> [message, exchange,
# routing key]) and UNACKED_INDEX_KEY (tag scored by delivery time), from where it is
# handed back to its queue once the visibility timeout has passed.
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"

# Beside them (broker database), which worker process holds each message: a set of delivery
# tags per holder (one consumer of one process), and a key with a TTL that the holder keeps
# alive. Once it lapses (the process died, or lost its connection), any live worker hands the
# holder's messages back (worker.broker.holders).
HELD_PREFIX = "inference:held:"
ALIVE_PREFIX = "inference:alive:"


def held_key(holder: str) -> str:
    return f"{HELD_PREFIX}{holder}"


def alive_key(holder: str) -> str:
    return f"{ALIVE_PREFIX}{holder}"


PRIORITY_SEP = "\x06\x16"
"""kombu's separator between a queue's name and a priority in the name of its list."""

PRIORITY_STEPS = (0, 3, 6, 9)
"""kombu's priorities with a list of their own, served in this order (0, the default,
is the queue's own list)."""


def priority_lists(queue: str) -> list[str]:
    """The Redis lists of `queue`, in the order kombu serves them."""
    return [queue if p == 0 else f"{queue}{PRIORITY_SEP}{p}" for p in PRIORITY_STEPS]


def all_queues() -> list[str]:
    """Every queue of the project: each of QUEUES and its row queue."""
    return sorted({q for main in QUEUES.values() for q in (main, row_queue(main))})


# Where Celery's Redis result backend keeps a task's result document.
RESULT_KEY_PREFIX = "celery-task-meta-"


def result_key(task_id: str) -> str:
    return f"{RESULT_KEY_PREFIX}{task_id}"


def model_info_key(queue: str) -> str:
    """Where the workers of `queue` publish what they serve (ModelInfo): per queue, since
    workers of different queues may serve other models or limits."""
    return f"{MODEL_INFO_PREFIX}{queue}"


def batch_bucket(size: int) -> str:
    """The key of WorkerState.batch_sizes a batch of `size` jobs counts under: power-of-two
    buckets "1", "2-3", "4-7", "8-15"..."""
    low = 1 << (max(size, 1).bit_length() - 1)
    return "1" if low == 1 else f"{low}-{2 * low - 1}"


def bucket_low(key: str) -> int:
    """The smallest batch size of a batch_bucket key, to order buckets by size."""
    return int(key.split("-")[0])


def worker_state_key(hostname: str, pid: int) -> str:
    return f"{WORKER_STATE_PREFIX}{hostname}:{pid}"
