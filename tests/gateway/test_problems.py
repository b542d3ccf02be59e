"""Errors as problem documents: one status per error of the contract, nothing internal told."""

from __future__ import annotations

import json

import pytest
import redis

from contract import errors
from gateway.problems import (
    ERROR_TYPE_BASE,
    MAX_FIELD_ERRORS,
    PROBLEM_MEDIA_TYPE,
    Problem,
    problem_for,
    validation_problem,
)


@pytest.mark.parametrize(
    ("error", "status", "retryable", "retry_after"),
    [
        (errors.InvalidInput, 422, False, False),
        (errors.FeatureCountMismatch, 422, False, False),
        (errors.TooManyRows, 422, False, False),
        (errors.MessageTooLarge, 422, False, False),
        (errors.QueueFull, 429, True, True),
        (errors.ModelNotReady, 503, True, True),
        (errors.PredictionFailed, 503, True, True),
        (errors.RedisUnreachable, 503, True, True),
        (errors.TaskFailed, 500, False, False),
    ],
)
def test_each_contract_error_has_its_status_and_keeps_its_name_and_message(
    error: type[errors.InferenceError], status: int, retryable: bool, retry_after: bool
) -> None:
    problem = problem_for(error("what went wrong"), retry_after_s=7)
    name = error.__name__
    assert problem.document() == {
        "type": f"{ERROR_TYPE_BASE}{name}",
        "title": name,
        "status": status,
        "detail": "what went wrong",
        "retryable": retryable,
    }
    assert problem.headers == ({"Retry-After": "7"} if retry_after else {})


def test_a_job_that_failed_or_timed_out_is_named_in_its_problem() -> None:
    failed = problem_for(
        errors.FeatureCountMismatch("row 0 has 2 features; the model expects 5"),
        retry_after_s=1,
        task_id="abc",
        status_url="/api/v1/jobs/abc",
    )
    assert failed.status == 422
    assert failed.document()["task_id"] == "abc"
    assert failed.document()["status_url"] == "/api/v1/jobs/abc"

    late = problem_for(
        TimeoutError("x"), retry_after_s=1, task_id="abc", status_url="/api/v1/jobs/abc"
    )
    doc = late.document()
    assert (doc["status"], doc["type"], doc["title"]) == (504, "about:blank", "Gateway Timeout")
    assert doc["retryable"] is True and "/api/v1/jobs/abc" in doc["detail"]
    assert doc["task_id"] == "abc"


def test_redis_failing_is_a_503_that_does_not_tell_where_redis_is() -> None:
    for exc in (
        redis.ConnectionError("Error 111 connecting to 10.1.2.3:6380. Connection refused."),
        redis.TimeoutError("Timeout reading from 10.1.2.3:6380"),
        redis.AuthenticationError("invalid username-password pair"),
    ):
        problem = problem_for(exc, retry_after_s=2)
        assert problem.status == 503 and problem.title == "RedisUnreachable"
        assert problem.headers == {"Retry-After": "2"}
        assert "10.1.2.3" not in problem.detail and "password" not in problem.detail


def test_anything_else_is_a_500_that_tells_nothing_of_it() -> None:
    problem = problem_for(KeyError("secret internals"), retry_after_s=1)
    assert problem.status == 500 and problem.type == "about:blank"
    assert problem.title == "Internal Server Error" and "secret" not in problem.detail


def test_the_response_is_problem_json_with_its_headers() -> None:
    response = Problem(429, "full", title="QueueFull", headers={"Retry-After": "1"}).response()
    assert response.media_type == PROBLEM_MEDIA_TYPE
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE
    assert response.headers["retry-after"] == "1"
    assert json.loads(bytes(response.body))["title"] == "QueueFull"


def test_a_schema_violation_names_each_field_as_the_client_wrote_it() -> None:
    problem = validation_problem(
        [
            {"type": "finite_number", "loc": ("body", "data", 1), "msg": "Input should be a "
             "finite number"},
            {"type": "value_error", "loc": ("body",), "msg": "Value error, send exactly one"},
            {"type": "string_too_long", "loc": ("path", "task_id"), "msg": "too long"},
            {"type": "greater_than_equal", "loc": ("query", "wait"), "msg": ">= 0"},
        ]
    )  # fmt: skip
    assert (problem.status, problem.title) == (422, "InvalidInput")
    assert problem.type == f"{ERROR_TYPE_BASE}InvalidInput"
    assert problem.detail == (
        "data.1: Input should be a finite number; body: send exactly one; "
        "task_id: too long; wait: >= 0"
    )
    fields = [f["field"] for f in problem.document()["errors"]]
    assert fields == ["data.1", "body", "task_id", "wait"]


def test_malformed_json_is_named_as_such() -> None:
    problem = validation_problem(
        [{"type": "json_invalid", "loc": ("body", 14), "msg": "JSON decode error",
          "ctx": {"error": "Expecting value"}}]
    )  # fmt: skip
    assert problem.detail == "body: not JSON: Expecting value at character 14"


def test_a_request_with_countless_faults_names_a_few_and_counts_the_rest() -> None:
    faults = [
        {"type": "finite_number", "loc": ("body", "data", i), "msg": "finite"} for i in range(1000)
    ]
    problem = validation_problem(faults)
    assert len(problem.document()["errors"]) == MAX_FIELD_ERRORS
    assert problem.detail.endswith(f"and {1000 - MAX_FIELD_ERRORS} more error(s)")
    assert len(problem.detail) < 500
