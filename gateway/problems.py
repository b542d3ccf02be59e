"""Every error the gateway answers, as a problem document (RFC 9457, application/problem+json).

An error of the task contract (contract/errors.py) keeps its name: `type` is
ERROR_TYPE_BASE + the name, `title` the name, `detail` its message. An error of HTTP itself
(no or a wrong token, an unknown path, a body too large) has `type` "about:blank" and the
status's reason phrase as `title`, as RFC 9457 asks. Every document carries `retryable`: whether
the same request, sent again later, may succeed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from contract.errors import InferenceError, PermanentError, QueueFull, TransientError

log = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"

ERROR_TYPE_BASE = "https://queue-inference/errors/"
"""Prefix of the `type` of a contract error: an identifier to compare, not a page to fetch."""

MAX_FIELD_ERRORS = 10
"""Faults of a request named one by one; the rest are counted (a 100,000-row batch of
strings would otherwise answer megabytes)."""


class FieldError(BaseModel):
    field: str = Field(examples=["data.1"])
    """Where in the request: body keys and list indices joined by dots, or a path or query
    parameter's name."""

    message: str = Field(examples=["Input should be a finite number"])


class ProblemDocument(BaseModel):
    """An error, as RFC 9457 problem details."""

    type: str = Field(examples=[f"{ERROR_TYPE_BASE}FeatureCountMismatch", "about:blank"])
    """ERROR_TYPE_BASE + the error's name for an error of the task contract; about:blank for
    an HTTP error (401, 404, 405, 413, 415)."""

    title: str = Field(examples=["FeatureCountMismatch"])
    """The error's name in the task contract, or the HTTP reason phrase (about:blank)."""

    status: int = Field(examples=[422])
    detail: str = Field(examples=["row 0 has 2 features; the model expects 5"])
    retryable: bool = Field(examples=[False])
    """Whether sending the same request again later may succeed."""

    task_id: str | None = None
    """The job's id, when the error came after it was enqueued (a timeout, a failed job)."""

    status_url: str | None = None
    """Where the job's status can be read, with task_id."""

    errors: list[FieldError] | None = None
    """A request that breaks the schema: each fault (at most MAX_FIELD_ERRORS)."""


class Problem(Exception):
    """An error answered as a problem document: raise it in a route, or build it from an
    exception with problem_for."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        title: str | None = None,
        type_: str = "about:blank",
        retryable: bool = False,
        headers: Mapping[str, str] | None = None,
        extensions: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.title = title or HTTPStatus(status).phrase
        self.type = type_
        self.retryable = retryable
        self.headers = dict(headers or {})
        self.extensions = dict(extensions or {})

    def document(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "retryable": self.retryable,
            **self.extensions,
        }

    def response(self) -> JSONResponse:
        return JSONResponse(
            self.document(),
            status_code=self.status,
            headers=self.headers,
            media_type=PROBLEM_MEDIA_TYPE,
        )


def error_type(name: str) -> str:
    return f"{ERROR_TYPE_BASE}{name}"


def status_of(exc: InferenceError) -> int:
    """The HTTP status of a contract error (the table in docs/gateway.md)."""
    if isinstance(exc, QueueFull):
        return 429
    if isinstance(exc, PermanentError):  # InvalidInput and its kin: the request is at fault
        return 422
    if isinstance(exc, TransientError):
        return 503
    # TaskFailed and anything else: the workers could not serve a valid job.
    return 500


def problem_for(
    exc: BaseException, *, retry_after_s: int, task_id: str | None = None, status_url: str = ""
) -> Problem:
    """The problem document for `exc`: a contract error, a timeout, Redis failing, or else
    an internal error. `task_id` and `status_url` name the job it concerns, if any."""
    job = {"task_id": task_id, "status_url": status_url or None} if task_id else {}
    if isinstance(exc, InferenceError):
        status = status_of(exc)
        name = type(exc).__name__
        headers = {"Retry-After": str(retry_after_s)} if status in (429, 503) else {}
        return Problem(
            status,
            exc.message,
            title=name,
            type_=error_type(name),
            retryable=exc.retryable,
            headers=headers,
            extensions=job,
        )
    if isinstance(exc, TimeoutError):
        where = f"; read it later at {status_url}" if status_url else ""
        return Problem(
            504,
            f"the job did not finish in time: it is still queued or running{where}",
            retryable=True,
            extensions=job,
        )
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        # The message names Redis's address: it goes to the log, not to the client.
        log.warning("Redis did not answer: %s", exc)
        return Problem(
            503,
            "the queue's Redis did not answer; try again later",
            title="RedisUnreachable",
            type_=error_type("RedisUnreachable"),
            retryable=True,
            headers={"Retry-After": str(retry_after_s)},
            extensions=job,
        )
    return Problem(500, "internal error: see the gateway's log", extensions=job)


def _field(loc: Sequence[int | str]) -> str:
    # FastAPI puts where a value came from first (body, path, query): a client knows its
    # request's own field names (data.1, task_id), not FastAPI's.
    parts = [str(p) for p in loc]
    if len(parts) > 1 and parts[0] in {"body", "path", "query", "header", "cookie"}:
        parts = parts[1:]
    return ".".join(parts) or "body"


def _message(error: Mapping[str, Any]) -> str:
    message = str(error.get("msg", "invalid"))
    # A model validator's ValueError reads "Value error, <ours>": ours is the message.
    return message.removeprefix("Value error, ")


def validation_problem(errors: Sequence[Mapping[str, Any]]) -> Problem:
    """A request that breaks the schema, as the task contract's InvalidInput: 422, with
    every fault named by its field (data.1: Input should be a finite number)."""
    faults: list[dict[str, str]] = []
    for error in errors[:MAX_FIELD_ERRORS]:
        if error.get("type") == "json_invalid":
            reason = (error.get("ctx") or {}).get("error", "JSON decode error")
            position = error["loc"][-1] if len(error.get("loc", ())) > 1 else "?"
            message = f"not JSON: {reason} at character {position}"
            faults.append({"field": "body", "message": message})
        else:
            faults.append({"field": _field(error.get("loc", ())), "message": _message(error)})
    parts = [f"{f['field']}: {f['message']}" for f in faults]
    if len(errors) > MAX_FIELD_ERRORS:
        parts.append(f"and {len(errors) - MAX_FIELD_ERRORS} more error(s)")
    return Problem(
        422,
        "; ".join(parts) or "the request is invalid",
        title="InvalidInput",
        type_=error_type("InvalidInput"),
        extensions={"errors": faults},
    )


def _sent_other_than_json(request: Request, errors: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the body was refused because it was not sent as JSON: FastAPI reads a body
    as JSON only under a JSON Content-Type, and otherwise reports it as the wrong type."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "application/json" or media_type.endswith("+json"):
        return False
    return any(
        tuple(error.get("loc", ())) == ("body",) and error.get("type") != "missing"
        for error in errors
    )


def install(app: FastAPI, retry_after_s: int) -> None:
    """Answer every error of `app` with a problem document."""

    async def on_problem(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, Problem)
        return exc.response()

    async def on_error(_: Request, exc: Exception) -> JSONResponse:
        return problem_for(exc, retry_after_s=retry_after_s).response()

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = exc.errors()
        if _sent_other_than_json(request, errors):
            return Problem(
                415, "send the body as JSON, with Content-Type: application/json"
            ).response()
        return validation_problem(errors).response()

    async def on_http(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return Problem(exc.status_code, str(exc.detail), headers=exc.headers).response()

    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises it after this answer, so the server logs its traceback.
        return problem_for(exc, retry_after_s=retry_after_s).response()

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(InferenceError, on_error)
    app.add_exception_handler(TimeoutError, on_error)
    app.add_exception_handler(redis.RedisError, on_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses for a route's error statuses, each a ProblemDocument (the app's
    schema hook files them under application/problem+json)."""
    return {
        status: {"model": ProblemDocument, "description": DESCRIPTIONS[status]}
        for status in statuses
    }


DESCRIPTIONS = {
    401: "No token, or a wrong one (when INFERENCE_GATEWAY_TOKEN is set)",
    404: "Nothing there",
    413: "The body exceeds INFERENCE_GATEWAY_MAX_BODY_BYTES",
    415: "The body was not sent as JSON (Content-Type: application/json)",
    422: "InvalidInput, FeatureCountMismatch, TooManyRows, MessageTooLarge: the request "
    "(or, on the synchronous routes, the job) breaks the task contract; on the synchronous "
    "routes, UnknownModelVersion (the job pinned a version the workers cannot serve) and "
    "ExplainUnavailable (the workers cannot explain)",
    429: "QueueFull: the queue is at INFERENCE_MAX_QUEUE_DEPTH; see Retry-After",
    500: "TaskFailed: the workers could not serve the job",
    503: "ModelNotReady, PredictionFailed, RedisUnreachable: try again later (Retry-After)",
    504: "The job did not finish within INFERENCE_GATEWAY_PREDICT_TIMEOUT_S; task_id names it",
}
