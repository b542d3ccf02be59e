"""The request and result schemas of the task contract (pydantic), and their checks.

Only plain JSON crosses the queue (float32 rows and predictions travel in it as base64
text: encode_f32 / decode_f32).
"""

from __future__ import annotations

import base64
import sys
from collections.abc import Sequence
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
from numpy.typing import ArrayLike, NDArray
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

from contract.errors import FeatureCountMismatch, InvalidInput, TooManyRows
from contract.names import MAX_PIN_CHARS, MAX_ROUTING_KEY_CHARS

# A feature value: a real, finite number. Strict, so "1.5" or true is refused
# rather than silently coerced; JSON integers are accepted as numbers.
Feature = Annotated[float, Field(strict=True, allow_inf_nan=False)]


# fail_fast: a list of bad values costs one error, not one per value; without it a
# 100,000-row batch of NaN builds 500,000 errors and a megabytes-long message.
Row = Annotated[list[Feature], Field(fail_fast=True)]


Pin = Annotated[str | None, Field(default=None, min_length=1, max_length=MAX_PIN_CHARS)]
"""A version (or alias: champion, challenger) the job must be served by; unset: the worker
routes it (champion, or the canary split)."""
RoutingKey = Annotated[str | None, Field(default=None, max_length=MAX_ROUTING_KEY_CHARS)]
"""An entity id: jobs with the same key always go to the same arm of a canary split."""


class _Routed(BaseModel):
    """A request that may pin a version or carry a routing key: both left out of its kwargs
    when unset, so a request that uses neither is sent as before they existed."""

    @model_serializer(mode="wrap")
    def _drop_unset_routing(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for key in ("model_version", "routing_key"):
            if data.get(key) is None:
                data.pop(key, None)
        return data


class PredictRequest(_Routed):
    """kwargs of `inference.predict`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    features: Row = Field(min_length=1)
    model_version: Pin = None
    routing_key: RoutingKey = None


# -- float32 rows and predictions, compactly --------------------------------------------------
# `rows_f32` and `predictions_f32` carry float32 values as base64 (standard alphabet, padded)
# of their little-endian IEEE 754 bytes, row-major: 4 bytes a value, no text to parse. The
# model runs on float32, so nothing is lost, and neither side does any work per value.

F32 = np.dtype("<f4")


def encode_f32(values: ArrayLike) -> str:
    """base64 of `values` as little-endian float32, row-major."""
    return base64.b64encode(np.ascontiguousarray(values, dtype=F32).tobytes()).decode("ascii")


def f32_size(text: str) -> int | None:
    """How many bytes the base64 `text` decodes to, from its length alone (None when no
    base64 has that length): lets a request be measured before it is decoded."""
    if len(text) % 4:
        return None
    return len(text) // 4 * 3 - (2 if text.endswith("==") else 1 if text.endswith("=") else 0)


def decode_f32(
    text: str, n_features: int | None = None, *, name: str = "rows_f32"
) -> NDArray[np.float32]:
    """The float32 values of `text` (encode_f32's form): a (rows, n_features) matrix, or flat
    without `n_features`. InvalidInput, naming the field `name`, when `text` is not base64
    of whole rows; the length is checked before anything is decoded."""
    width = 4 * (1 if n_features is None else n_features)
    size = f32_size(text)
    if size is None:
        raise InvalidInput(f"{name}: not base64 (length {len(text)} is not a multiple of 4)")
    if width <= 0 or size % width:
        raise InvalidInput(
            f"{name}: {size} bytes are not whole rows of {width // 4} float32 values "
            f"({width} bytes a row)"
        )
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:  # binascii.Error, or a character outside ASCII
        raise InvalidInput(f"{name}: not valid base64") from None
    values = np.frombuffer(raw, dtype=F32).astype(np.float32, copy=False)
    return values if n_features is None else values.reshape(-1, n_features)


def check_f32_shape(rows: int, width: int, n_features: int, max_rows: int) -> None:
    """check_shape for float32 rows: `rows` rows of `width` values each."""
    if width != n_features:
        raise FeatureCountMismatch(
            f"rows_f32 has {width} features a row; the model expects {n_features}"
        )
    if rows > max_rows:
        raise TooManyRows(f"{rows} rows exceed the maximum of {max_rows} per job")


class BatchRequest(_Routed):
    """kwargs of `inference.predict_batch`: exactly one of `rows` (lists of JSON numbers) and
    `rows_f32` (float32, encode_f32's form) with `n_features`, the values in each row."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rows: Annotated[list[Row], Field(min_length=1, fail_fast=True)] | None = None
    rows_f32: Annotated[str, Field(strict=True, min_length=1)] | None = None
    n_features: Annotated[int, Field(strict=True, ge=1)] | None = None
    model_version: Pin = None
    routing_key: RoutingKey = None

    @model_validator(mode="after")
    def _one_encoding(self) -> BatchRequest:
        if (self.rows is None) == (self.rows_f32 is None):
            raise ValueError("send exactly one of rows and rows_f32")
        if (self.rows_f32 is None) != (self.n_features is None):
            raise ValueError("n_features goes with rows_f32, and rows_f32 needs it")
        return self

    def matrix(self) -> NDArray[np.float32]:
        """The rows as a (rows, features) float32 matrix, every value finite. rows_f32 is
        decoded whole and checked with numpy, never value by value."""
        if self.rows_f32 is None:
            return np.asarray(self.rows, dtype=np.float32)
        assert self.n_features is not None  # the validator pairs them
        matrix = decode_f32(self.rows_f32, self.n_features)
        finite = np.isfinite(matrix)
        if not finite.all():
            row, column = (int(i) for i in np.argwhere(~finite)[0])
            raise InvalidInput(f"rows_f32.{row}.{column}: Input should be a finite number")
        return matrix


class ExplainRequest(BatchRequest):
    """kwargs of `inference.explain`: the rows to explain, in either of BatchRequest's forms,
    under the same limits."""


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
    arm: str | None = None
    """Which version served the job: "champion", "challenger" (canary share), "pinned"
    (the job named it), or null from a worker without a serving decision."""


class PredictResult(_ResultBase):
    """Result of `inference.predict`."""

    prediction: float
    batch_size: int = 1
    """Jobs predicted in the same onnxruntime call as this one (the row lane batches them)."""


class BatchResult(_ResultBase):
    """Result of `inference.predict_batch`: predictions in row order, as JSON numbers
    (`predictions`) for a request that sent `rows`, as float32 (`predictions_f32`,
    encode_f32's form) for one that sent `rows_f32`; the worker leaves the other out."""

    predictions: list[float] | None = None
    predictions_f32: str | None = None
    rows: int


class ExplainResult(_ResultBase):
    """Result of `inference.explain`: per row, in row order, the prediction and one SHAP
    contribution per feature (in `feature_names` order), with
    base_value + sum(contributions[i]) == predictions[i] (to ~1e-6)."""

    feature_names: list[str]
    base_value: float
    predictions: list[float]
    contributions: list[list[float]]
    rows: int

    def explanations(self) -> list[Explanation]:
        """One Explanation a row, its contributions named by feature."""
        return [
            Explanation(
                prediction=prediction,
                base_value=self.base_value,
                contributions=dict(zip(self.feature_names, row, strict=True)),
            )
            for prediction, row in zip(self.predictions, self.contributions, strict=True)
        ]


class Explanation(BaseModel):
    """One row's explanation: prediction == base_value + sum(contributions.values())."""

    prediction: float
    base_value: float
    contributions: dict[str, float]


class ModelInfo(BaseModel):
    """What the serving workers have loaded; published so producers can validate early."""

    name: str
    version: str
    n_features: int
    feature_names: list[str]
    max_batch_rows: int
    target: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    importances: dict[str, dict[str, float]] = Field(default_factory=dict)
    """As recorded at training (training.artifact.Manifest.importances)."""
    base_value: float | None = None
    """The explanations' base value; None when the workers cannot explain."""


class ServedVersion(BaseModel):
    """One version of a model, as a worker fetches it."""

    version: str
    """The artifact's version (its manifest's, and the directory's name)."""
    registry_version: str | None = None
    """Its number in the model registry (MLflow), when it was registered."""
    location: str
    """The folder holding manifest.json and the model files: a path (a folder every worker
    host can read), or an http(s) URL (MLflow's artifact REST API)."""
    sha256: dict[str, str]
    """sha256 of each model file, by file name: checked after the fetch, before loading."""
    n_features: int


class ServingDecision(BaseModel):
    """What every worker of model `name` serves, written by promote and rollback."""

    name: str
    generation: int = Field(ge=0)
    """Incremented by each change: a worker applies a decision once."""
    champion: ServedVersion
    challenger: ServedVersion | None = None
    canary_percent: float = Field(default=0.0, ge=0.0, le=100.0)
    """Share of the jobs without a pin that the challenger serves."""
    shadow: bool = False
    """The challenger also runs on the champion's batches, off the result path."""
    previous: ServedVersion | None = None
    """The champion before this one: what `rollback` restores."""
    decided_at: float


class ServingStatus(BaseModel):
    """How a worker process applies the serving decision (in its state and the health
    report)."""

    generation: int = -1
    """The last decision applied; -1: none (the plain model directory)."""
    challenger_version: str | None = None
    canary_percent: float = 0.0
    shadow: bool = False
    loaded_versions: list[str] = Field(default_factory=list)
    error: str | None = None
    """Why the last decision was not applied (the previous versions kept serving)."""
    shadow_rows: int = 0
    shadow_mean_abs_diff: float | None = None
    shadow_p99_abs_diff: float | None = None


class LatencySummary(BaseModel):
    count: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None

    @classmethod
    def of(cls, samples_ms: Sequence[float]) -> LatencySummary:
        """Percentiles of `samples_ms`, rounded to the microsecond; numpy's linear
        interpolation keeps p50 <= p95 <= p99."""
        if len(samples_ms) == 0:
            return cls(count=0, p50_ms=None, p95_ms=None, p99_ms=None)
        p50, p95, p99 = np.percentile(np.asarray(samples_ms, dtype=np.float64), [50, 95, 99])
        return cls(
            count=len(samples_ms),
            p50_ms=round(float(p50), 3),
            p95_ms=round(float(p95), 3),
            p99_ms=round(float(p99), 3),
        )


class _Serving(BaseModel):
    """What a worker process, or a whole worker, serves and has served."""

    hostname: str
    queues: list[str]
    pool: str
    model_name: str
    model_version: str
    provider: str
    device: str
    jobs_done: int = 0
    jobs_failed: int = 0
    rows_done: int = 0
    batch_sizes: dict[str, int] = Field(default_factory=dict)
    """Batches of single-row jobs predicted together, by size bucket: "1", "2-3", "4-7"..."""


class WorkerState(_Serving):
    """One worker process's state, refreshed by the process itself (a heartbeat with a TTL)."""

    pid: int
    started_at: float
    updated_at: float
    recent_task_ms: list[float] = Field(default_factory=list)
    """Recent task times (ms), newest last, bounded; the health task merges them."""
    serving: ServingStatus | None = None
    """Versions, canary and shadow, once a serving decision is applied."""


class WorkerHealth(_Serving):
    """One worker in the health report: its live processes' states merged (model_version,
    provider and device list every value its processes have, comma-separated)."""

    processes: int
    latency: LatencySummary
    uptime_s: float
    last_seen_s: float
    serving: ServingStatus | None = None
    """Its processes' serving statuses merged: the oldest generation, the first error, every
    loaded version, shadow rows summed (mean weighted by rows, the largest p99)."""


class HealthReport(BaseModel):
    status: Literal["ok", "degraded", "down"]
    generated_at: float
    workers: list[WorkerHealth]
    queue_depths: dict[str, int]


# Errors named in an InvalidInput message; the rest are counted. Unknown kwargs are
# reported one each, so without a cap a message with a million of them would store a
# message of tens of megabytes in the result backend.
MAX_ERRORS_DESCRIBED = 10


def _describe(error: ValidationError) -> str:
    items = error.errors(include_url=False)
    parts = []
    for item in items[:MAX_ERRORS_DESCRIBED]:
        where = ".".join(str(p) for p in item["loc"]) or "kwargs"
        parts.append(f"{where}: {item['msg']}")
    if len(items) > MAX_ERRORS_DESCRIBED:
        parts.append(f"and {len(items) - MAX_ERRORS_DESCRIBED} more error(s)")
    return "; ".join(parts)


M = TypeVar("M", bound=BaseModel)


def parse_request(
    model: type[M],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    n_features: int | None = None,
    max_rows: int | None = None,
) -> M:
    """Validate task arguments, turning every schema violation into InvalidInput.

    With `n_features` (and `max_rows`), the shape is checked first, in O(rows) and before
    any value is looked at, so a message with ten million rows or a ten-million-value row
    is refused with TooManyRows or FeatureCountMismatch without being validated value by
    value. A request with several faults then reports its shape fault first.
    """
    if args:
        raise InvalidInput("positional arguments are not accepted; send kwargs only")
    if n_features is not None:
        limit = sys.maxsize if max_rows is None else max_rows
        rows = _unvalidated_rows(model, kwargs)
        if rows is not None:
            check_shape(rows, n_features, limit)
        if issubclass(model, BatchRequest):
            _check_f32_request(kwargs, n_features, limit)
    try:
        return model.model_validate(kwargs)
    except ValidationError as exc:
        raise InvalidInput(_describe(exc)) from None


def _unvalidated_rows(model: type[BaseModel], kwargs: dict[str, Any]) -> list[Any] | None:
    """The request's rows as sent, for a shape check; None when there is nothing to check
    (not a list: the schema refuses it, cheaply, with its own message)."""
    if model is PredictRequest:
        features = kwargs.get("features")
        # An empty list is the schema's to refuse ("at least 1 item"), not a count mismatch.
        return [features] if isinstance(features, list) and features else None
    if issubclass(model, BatchRequest):
        rows = kwargs.get("rows")
        return rows if isinstance(rows, list) else None
    return None


def _check_f32_request(kwargs: dict[str, Any], n_features: int, max_rows: int) -> None:
    """The shape of rows_f32 as sent, from n_features and the text's length: nothing is
    decoded. Anything that is not a string and an int is left to the schema."""
    text, width = kwargs.get("rows_f32"), kwargs.get("n_features")
    if not isinstance(text, str) or isinstance(width, bool) or not isinstance(width, int):
        return
    size = f32_size(text)
    rows = 0 if size is None or width <= 0 else size // (4 * width)
    check_f32_shape(rows, width, n_features, max_rows)


def check_shape(rows: Sequence[Any], n_features: int, max_rows: int) -> None:
    """Check a batch's shape against the loaded model and the configured row limit.

    Runs on validated rows (producer) and on rows as they came off the wire (worker):
    a row that is not a list is skipped here, for the schema to refuse.
    """
    if len(rows) > max_rows:
        raise TooManyRows(f"{len(rows)} rows exceed the maximum of {max_rows} per job")
    for i, row in enumerate(rows):
        if isinstance(row, list | tuple) and len(row) != n_features:
            raise FeatureCountMismatch(
                f"row {i} has {len(row)} features; the model expects {n_features}"
            )
