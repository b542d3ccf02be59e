"""The gateway's request and response bodies, with the examples its OpenAPI page shows.

Values are the task contract's (contract.schemas): finite JSON numbers, never coerced from
strings, so a request the gateway accepts is one the workers accept.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from fastapi.openapi.models import Example
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, JsonValue, model_validator

from contract.names import MAX_PIN_CHARS, MAX_ROUTING_KEY_CHARS, VERSION_TEXT
from contract.schemas import BatchResult, ExplainResult, HealthReport, PredictResult, Row

Queue = Literal["cpu", "gpu"]
"""The workers a job is for: inference.cpu or inference.gpu (single rows: their row queue)."""

ROW: list[JsonValue] = [0.1, 0.2, 0.3, 0.4, 0.5]
ROWS: list[JsonValue] = [[0.1, 0.2, 0.3, 0.4, 0.5], [1.0, 2.0, 3.0, 4.0, 5.0]]
# ROWS as encode_f32 writes them: 40 bytes of little-endian float32.
ROWS_F32 = "zczMPc3MTD6amZk+zczMPgAAAD8AAIA/AAAAQAAAQEAAAIBAAACgQA=="

Rows = Annotated[list[Row], Field(min_length=1, fail_fast=True)]
QUEUE_HELP = "cpu or gpu: the workers that run the job"

VERSION_EXAMPLE = "20261128-001839-22b4fe"

_VERSION = re.compile(VERSION_TEXT)
# Visible ASCII, spaces inside only: the same text whether it comes in the body or in a header
# (which carries no other characters, and loses spaces at its ends), so an entity gets the
# same arm either way.
_ROUTING_KEY_TEXT = r"[!-~]([ -~]*[!-~])?"
_ROUTING_KEY = re.compile(_ROUTING_KEY_TEXT)


def _spelled_as_version(value: str) -> str:
    if not _VERSION.fullmatch(value):
        raise ValueError(
            "a version or alias is letters, digits, '.', '_' and '-', "
            "starting with a letter or a digit"
        )
    return value


def _spelled_as_routing_key(value: str) -> str:
    if not _ROUTING_KEY.fullmatch(value):
        raise ValueError(
            "a routing key is visible ASCII characters, with spaces between them only "
            "(send a non-ASCII id percent-encoded, or its hash)"
        )
    return value


# The patterns are checked by the validators, for a message that says what is wrong; they
# are in the schema too, for the clients generated from it.
ModelVersion = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_PIN_CHARS,
        description=(
            "the version that must serve the job: a version, a registry number, or an alias "
            "(champion, challenger); a version the workers cannot serve fails the job with "
            "UnknownModelVersion. Unset: the workers choose (the champion, or the canary split)"
        ),
        examples=["challenger", VERSION_EXAMPLE],
        json_schema_extra={"pattern": f"^{VERSION_TEXT}$"},
    ),
    AfterValidator(_spelled_as_version),
]
RoutingKey = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_ROUTING_KEY_CHARS,
        description=(
            "an entity id (a user, an account): under a canary split, jobs with the same key "
            "always get the same version"
        ),
        examples=["user-42"],
        json_schema_extra={"pattern": f"^{_ROUTING_KEY_TEXT}$"},
    ),
    AfterValidator(_spelled_as_routing_key),
]


class Routing(BaseModel):
    """Which version serves a job: the fields every prediction request may carry."""

    model_version: ModelVersion | None = None
    routing_key: RoutingKey | None = None


class PredictRequest(Routing):
    """One row, as the seed's API takes it."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"data": ROW},
                {"data": ROW, "routing_key": "user-42"},
                {"data": ROW, "model_version": "challenger"},
            ]
        },
    )

    data: Row = Field(min_length=1, description="the row's features, as many as the model has")
    queue: Queue = Field(default="cpu", description=QUEUE_HELP)


class BatchPredictRequest(Routing):
    """Rows, answered in one job, predictions in row order."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"data": ROWS}, {"data": ROWS, "routing_key": "user-42"}]},
    )

    data: Rows = Field(description="the rows, each with as many features as the model has")
    queue: Queue = Field(default="cpu", description=QUEUE_HELP)


class ExplainRequest(Routing):
    """Rows to explain, in one inference.explain job: each row's prediction and SHAP
    contributions, in row order."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"data": [ROW]}, {"data": [ROW], "model_version": "challenger"}]
        },
    )

    data: Rows = Field(description="the rows, each with as many features as the model has")
    queue: Queue = Field(default="cpu", description=QUEUE_HELP)


class JobRequest(Routing):
    """Exactly one of `features` (one row: inference.predict), `rows` (inference.predict_batch)
    and `rows_f32` with `n_features` (inference.predict_batch, float32 in base64); a version
    pin or a routing key with any of them."""

    model_config = ConfigDict(extra="forbid")

    features: Row | None = Field(default=None, min_length=1, description="one row")
    rows: Rows | None = Field(default=None, description="a batch of rows")
    rows_f32: Annotated[str, Field(strict=True, min_length=1)] | None = Field(
        default=None,
        description="a batch as base64 of little-endian float32 values, row-major",
    )
    n_features: Annotated[int, Field(strict=True, ge=1)] | None = Field(
        default=None, description="values per row of rows_f32 (with it only)"
    )
    queue: Queue = Field(default="cpu", description=QUEUE_HELP)

    @model_validator(mode="after")
    def _one_input(self) -> JobRequest:
        given = [self.features is not None, self.rows is not None, self.rows_f32 is not None]
        if sum(given) != 1:
            raise ValueError("send exactly one of features, rows and rows_f32")
        if (self.rows_f32 is None) != (self.n_features is None):
            raise ValueError("n_features goes with rows_f32, and rows_f32 needs it")
        return self


JOB_EXAMPLES: dict[str, Example] = {
    "one row": {"summary": "one row (inference.predict)", "value": {"features": ROW}},
    "rows": {"summary": "a batch (inference.predict_batch)", "value": {"rows": ROWS}},
    "rows_f32": {
        "summary": "a batch as float32 (answered with predictions_f32)",
        "value": {"rows_f32": ROWS_F32, "n_features": 5, "queue": "cpu"},
    },
    "pinned": {
        "summary": "one row, served by the challenger whatever the canary share",
        "value": {"features": ROW, "model_version": "challenger"},
    },
    "sticky": {
        "summary": "a batch for one entity: under a canary, its jobs always get the same arm",
        "value": {"rows": ROWS, "routing_key": "user-42"},
    },
}


JOB_STATUS_EXAMPLES: dict[str, Example] = {
    "served": {
        "summary": "finished: the result names the version that served it, and its arm",
        "value": {
            "task_id": "5f0c6a3e-7d1b-4e0f-9a51-2f9d8c3b7e10",
            "state": "SUCCESS",
            "result": {
                "prediction": 12.6496,
                "batch_size": 1,
                "model_name": "friedman1",
                "model_version": VERSION_EXAMPLE,
                "arm": "pinned",
                "provider": "CPUExecutionProvider",
                "device": "cpu",
                "hostname": "cpu1@host",
                "latency": {"queue_wait_ms": 3.7, "inference_ms": 0.17, "task_ms": 0.24},
            },
        },
    },
    "unknown version": {
        "summary": "failed: it pinned a version the workers cannot serve",
        "value": {
            "task_id": "5f0c6a3e-7d1b-4e0f-9a51-2f9d8c3b7e10",
            "state": "FAILURE",
            "error": {
                "type": "UnknownModelVersion",
                "message": "model version '9' is not served here",
                "retryable": False,
            },
        },
    },
    "pending": {
        "summary": "queued, running, or an id nobody sent",
        "value": {"task_id": "5f0c6a3e-7d1b-4e0f-9a51-2f9d8c3b7e10", "state": "PENDING"},
    },
}


class JobAccepted(BaseModel):
    task_id: str = Field(examples=["5f0c6a3e-7d1b-4e0f-9a51-2f9d8c3b7e10"])
    state: Literal["PENDING"] = "PENDING"
    status_url: str = Field(examples=["/api/v1/jobs/5f0c6a3e-7d1b-4e0f-9a51-2f9d8c3b7e10"])
    """Where to read the job's status (also the Location header)."""


class _SeedFields(BaseModel):
    # The result document's own fields pass through, new ones included.
    model_config = ConfigDict(extra="allow")

    task_id: str
    total_time_ms: float
    """Milliseconds the gateway spent on the request once it was read and validated:
    enqueue, wait, read the result."""


class PredictResponse(PredictResult, _SeedFields):
    """The worker's result document, plus the job's id and the seed API's own fields."""

    latency_ms: float
    """The model's time (latency.inference_ms), as the seed API reported it."""

    model_format: Literal["ONNX"] = "ONNX"
    features_count: int

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "prediction": 12.6496,
                    "batch_size": 1,
                    "model_name": "friedman1",
                    "model_version": VERSION_EXAMPLE,
                    "arm": "champion",
                    "provider": "CPUExecutionProvider",
                    "device": "cpu",
                    "hostname": "cpu1@host",
                    "latency": {"queue_wait_ms": 3.7, "inference_ms": 0.17, "task_ms": 0.24},
                    "task_id": "5f0c6a3e-7d1b-4e0f-9a51-2f9d8c3b7e10",
                    "latency_ms": 0.17,
                    "total_time_ms": 5.1,
                    "model_format": "ONNX",
                    "features_count": 5,
                }
            ]
        },
    )


class BatchPredictResponse(BatchResult, _SeedFields):
    """The worker's batch result document, plus the job's id."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "predictions": [12.6496, 20.1173],
                    "rows": 2,
                    "model_name": "friedman1",
                    "model_version": "20261202-094512-9c01aa",
                    "arm": "challenger",
                    "provider": "CPUExecutionProvider",
                    "device": "cpu",
                    "hostname": "cpu1@host",
                    "latency": {"queue_wait_ms": 2.1, "inference_ms": 0.3, "task_ms": 0.9},
                    "task_id": "5f0c6a3e-7d1b-4e0f-9a51-2f9d8c3b7e10",
                    "total_time_ms": 6.4,
                }
            ]
        },
    )


class HealthResponse(HealthReport):
    """The latest health report (python -m producer health), plus the seed API's fields."""

    model_loaded: bool
    """Whether some live worker has a model loaded (the report lists at least one)."""

    model_format: Literal["ONNX"] = "ONNX"


class ExplainResponse(ExplainResult, _SeedFields):
    """The worker's explanation document, plus the job's id: per row, base_value plus the sum
    of its contributions is its prediction."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "feature_names": ["x0", "x1", "x2", "x3", "x4"],
                    "base_value": 14.4034,
                    "predictions": [14.91],
                    "contributions": [[1.02, -0.61, 0.08, 0.33, -0.31]],
                    "rows": 1,
                    "model_name": "friedman1",
                    "model_version": VERSION_EXAMPLE,
                    "arm": "pinned",
                    "provider": "CPUExecutionProvider",
                    "device": "cpu",
                    "hostname": "cpu1@host",
                    "latency": {"queue_wait_ms": 0.4, "inference_ms": 1.3, "task_ms": 1.5},
                    "task_id": "5f0c6a3e-7d1b-4e0f-9a51-2f9d8c3b7e10",
                    "total_time_ms": 3.2,
                }
            ]
        },
    )
