"""The wire contract between producers and workers.

Task names, queue names, request and result schemas and Redis key names live
here and nowhere else: the producer, the worker and the tests import them.
Only plain JSON crosses the queue.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from producer.errors import InvalidInput

TASK_PREDICT = "inference.predict"
TASK_PREDICT_BATCH = "inference.predict_batch"
TASK_HEALTH = "inference.health"

QUEUE_CPU = "inference.cpu"
QUEUE_GPU = "inference.gpu"
QUEUES: dict[str, str] = {"cpu": QUEUE_CPU, "gpu": QUEUE_GPU}

# Optional message header (Unix seconds, float) set by the producer when it
# enqueues; the worker turns it into the queue-wait latency.
HEADER_ENQUEUED_AT = "enqueued_at"

# Redis keys, all in the result-backend database.
HEALTH_REPORT_KEY = "inference:health:report"
WORKER_STATE_PREFIX = "inference:worker:"
MODEL_INFO_KEY = "inference:model:info"


def worker_state_key(hostname: str, pid: int) -> str:
    return f"{WORKER_STATE_PREFIX}{hostname}:{pid}"


# A feature value: a real, finite number. Strict, so "1.5" or true is refused
# rather than silently coerced; JSON integers are accepted as numbers.
Feature = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class PredictRequest(BaseModel):
    """kwargs of `inference.predict`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    features: list[Feature] = Field(min_length=1)


class BatchRequest(BaseModel):
    """kwargs of `inference.predict_batch`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rows: list[list[Feature]] = Field(min_length=1)


class Latency(BaseModel):
    """Milliseconds. queue_wait_ms is null when the message had no enqueued_at header."""

    queue_wait_ms: float | None
    inference_ms: float
    task_ms: float


class _ResultBase(BaseModel):
    model_name: str
    model_version: str
    provider: str
    device: str
    hostname: str
    latency: Latency


class PredictResult(_ResultBase):
    """Result of `inference.predict`."""

    prediction: float


class BatchResult(_ResultBase):
    """Result of `inference.predict_batch`: predictions in row order."""

    predictions: list[float]
    rows: int


class ModelInfo(BaseModel):
    """What the serving workers have loaded; published so producers can validate early."""

    name: str
    version: str
    n_features: int
    feature_names: list[str]
    max_batch_rows: int


class LatencySummary(BaseModel):
    count: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None


class WorkerState(BaseModel):
    """One worker process's state, refreshed by the process itself (a heartbeat with a TTL)."""

    hostname: str
    pid: int
    queues: list[str]
    pool: str
    model_name: str
    model_version: str
    provider: str
    device: str
    started_at: float
    updated_at: float
    jobs_done: int = 0
    jobs_failed: int = 0
    rows_done: int = 0
    # Recent task times (ms), newest last, bounded; the health task merges them.
    recent_task_ms: list[float] = Field(default_factory=list)


class WorkerHealth(BaseModel):
    hostname: str
    processes: int
    queues: list[str]
    pool: str
    model_name: str
    model_version: str
    provider: str
    device: str
    jobs_done: int
    jobs_failed: int
    rows_done: int
    latency: LatencySummary
    uptime_s: float
    last_seen_s: float


class HealthReport(BaseModel):
    status: Literal["ok", "degraded", "down"]
    generated_at: float
    workers: list[WorkerHealth]
    queue_depths: dict[str, int]


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors(include_url=False):
        where = ".".join(str(p) for p in item["loc"]) or "kwargs"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


M = TypeVar("M", bound=BaseModel)


def parse_request(model: type[M], args: tuple[Any, ...], kwargs: dict[str, Any]) -> M:
    """Validate task arguments, turning every schema violation into InvalidInput."""
    if args:
        raise InvalidInput("positional arguments are not accepted; send kwargs only")
    try:
        return model.model_validate(kwargs)
    except ValidationError as exc:
        raise InvalidInput(_describe(exc)) from None


def check_shape(rows: list[list[float]], n_features: int, max_rows: int) -> None:
    """Check a validated batch against the loaded model and the configured row limit."""
    from producer.errors import FeatureCountMismatch, TooManyRows

    if len(rows) > max_rows:
        raise TooManyRows(f"{len(rows)} rows exceed the maximum of {max_rows} per job")
    for i, row in enumerate(rows):
        if len(row) != n_features:
            raise FeatureCountMismatch(
                f"row {i} has {len(row)} features; the model expects {n_features}"
            )
