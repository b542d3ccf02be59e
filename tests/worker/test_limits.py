"""Cheap refusals, without a worker: shape before values, bounded error messages, the
message size limit, bounded decompression, envelope checks, failure garbage."""

from __future__ import annotations

import math
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import kombu.compression
import pytest
from celery import Celery
from celery.signals import task_failure
from pydantic import ValidationError

from contract.errors import FeatureCountMismatch, InvalidInput, MessageTooLarge, TooManyRows
from contract.schemas import BatchRequest, PredictRequest, parse_request
from worker import guards, lifecycle, messages
from worker.settings import WorkerSettings

FIVE = [0.1, 0.2, 0.3, 0.4, 0.5]
TEN_MILLION = 10_000_000


@pytest.fixture
def no_value_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any value-by-value validation fail the test."""

    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("the schema validated a request the shape check should refuse")

    monkeypatch.setattr(PredictRequest, "model_validate", refuse)
    monkeypatch.setattr(BatchRequest, "model_validate", refuse)


@pytest.mark.usefixtures("no_value_validation")
@pytest.mark.parametrize(
    ("model", "kwargs", "error", "text"),
    [
        (
            PredictRequest,
            {"features": [0.5] * TEN_MILLION},
            FeatureCountMismatch,
            f"row 0 has {TEN_MILLION} features; the model expects 5",
        ),
        (
            BatchRequest,
            {"rows": [FIVE] * TEN_MILLION},
            TooManyRows,
            f"{TEN_MILLION} rows exceed the maximum of 1000 per job",
        ),
        # A row that is not a list does not end the check: the huge row after it is found.
        (
            BatchRequest,
            {"rows": [FIVE, "x", [0] * TEN_MILLION]},
            FeatureCountMismatch,
            f"row 2 has {TEN_MILLION} features",
        ),
        # Wrong count and bad values: the count is reported, the values never looked at.
        (PredictRequest, {"features": ["x", None]}, FeatureCountMismatch, "row 0 has 2"),
    ],
)
def test_shape_is_refused_before_any_value_is_validated(
    model: type[PredictRequest | BatchRequest],
    kwargs: dict[str, Any],
    error: type[Exception],
    text: str,
) -> None:
    with pytest.raises(error) as info:
        parse_request(model, (), kwargs, n_features=5, max_rows=1000)
    assert text in str(info.value)


@pytest.mark.parametrize(
    ("model", "kwargs", "text"),
    [
        # The right shape: the values are still validated, and located.
        (BatchRequest, {"rows": [FIVE, [0.1, 0.2, math.nan, 0.4, 0.5]]}, "rows.1.2"),
        # Empty is the schema's to refuse, not a count mismatch.
        (PredictRequest, {"features": []}, "at least 1"),
        (PredictRequest, {"features": "12345"}, "valid list"),
        (BatchRequest, {"rows": [FIVE, 5]}, "rows.1: Input should be a valid list"),
    ],
)
def test_a_request_of_the_right_shape_still_meets_the_schema(
    model: type[PredictRequest | BatchRequest], kwargs: dict[str, Any], text: str
) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_request(model, (), kwargs, n_features=5, max_rows=1000)
    assert type(info.value) is InvalidInput
    assert text in str(info.value)


def test_error_messages_stay_short_whatever_the_number_of_errors() -> None:
    # Without fail_fast, 500,000 errors (one per NaN); without the cap, 1,000 named kwargs.
    with pytest.raises(InvalidInput) as nan:
        parse_request(BatchRequest, (), {"rows": [[math.nan] * 5] * 100_000})
    assert str(nan.value) == "rows.0.0: Input should be a finite number"
    with pytest.raises(InvalidInput) as extra:
        parse_request(PredictRequest, (), {"features": FIVE, **{f"k{i}": i for i in range(1000)}})
    message = str(extra.value)
    assert message.startswith("k0: Extra inputs are not permitted; k1:")
    assert message.endswith("; and 990 more error(s)") and len(message) < 600


def test_max_message_bytes_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert WorkerSettings().max_message_bytes == 64 * 1024 * 1024
    monkeypatch.setenv("INFERENCE_MAX_MESSAGE_BYTES", "2048")
    assert WorkerSettings().max_message_bytes == 2048
    monkeypatch.setenv("INFERENCE_MAX_MESSAGE_BYTES", "100")
    with pytest.raises(ValidationError, match="max_message_bytes"):
        WorkerSettings()


def test_body_size_counts_bytes() -> None:
    assert messages.body_size(b"abc") == 3
    assert messages.body_size("abc") == 3
    assert messages.body_size("é" * 10) == 20  # UTF-8, not characters
    assert messages.body_size(None) == 0


def test_an_oversized_request_fails_with_message_too_large() -> None:
    limit = WorkerSettings().max_message_bytes
    guards.refuse_oversized(SimpleNamespace(inference_message_bytes=limit))
    guards.refuse_oversized(SimpleNamespace())  # not measured (not through the strategy)
    with pytest.raises(MessageTooLarge, match=f"of {limit + 1} bytes exceeds the maximum"):
        guards.refuse_oversized(SimpleNamespace(inference_message_bytes=limit + 1))
    # Decompression stopped at limit + 1 bytes: no size is claimed.
    with pytest.raises(MessageTooLarge) as info:
        guards.refuse_oversized(
            SimpleNamespace(inference_message_bytes=limit + 1, compression="application/x-gzip")
        )
    assert str(info.value) == f"message body exceeds the maximum of {limit} bytes"
    assert issubclass(MessageTooLarge, InvalidInput) and not MessageTooLarge.retryable


@pytest.fixture
def small_decompression_limit() -> Iterator[int]:
    guards.bound_decompression(4096)
    yield 4096
    guards.bound_decompression(WorkerSettings().max_message_bytes)


@pytest.mark.parametrize("codec", ["gzip", "bzip2", "xz"])
def test_kombu_decompression_stops_past_the_limit(
    small_decompression_limit: int, codec: str
) -> None:
    limit = small_decompression_limit
    bomb, _ = kombu.compression.compress(b"0" * 1_000_000, codec)
    assert len(bomb) < 5_000
    assert len(kombu.compression.decompress(bomb, codec)) == limit + 1
    body = b'[[], {"features": [1, 2, 3, 4, 5]}, null]' * 50
    packed, _ = kombu.compression.compress(body, codec)
    assert kombu.compression.decompress(packed, codec) == body
    with pytest.raises(ValueError, match="truncated"):
        kombu.compression.decompress(packed[: len(packed) // 2], codec)


def test_a_codec_that_cannot_be_bounded_is_refused() -> None:
    kombu.compression.register(bytes, bytes, "application/x-inference-test-codec")
    guards.bound_decompression(WorkerSettings().max_message_bytes)
    with pytest.raises(ValueError, match="not accepted"):
        kombu.compression.decompress(b"x", "application/x-inference-test-codec")


def celery_message(**options: Any) -> Any:
    """Headers and body exactly as Celery's own client builds them."""
    return Celery("limits-tests").amqp.as_task_v2(
        "4c3e1f5e-0d1e-4b53-9c59-6f2d6a0e2a10", "inference.predict",
        args=(), kwargs={"features": FIVE}, **options,
    )  # fmt: skip


def test_messages_from_a_celery_client_pass_the_envelope_checks() -> None:
    for options in ({}, {"countdown": 5, "expires": 60, "time_limit": 3, "retries": 2}):
        message = celery_message(**options)
        assert messages.envelope_problem(message.headers) is None
        assert messages.body_problem(message.body) is None
        assert messages.body_problem(list(message.body)) is None  # as decoded from JSON


@pytest.mark.parametrize(
    ("change", "text"),
    [
        ({"id": None}, "no id"),
        ({"id": 7}, "'id' is a int"),
        ({"id": "x" * 256}, "longer than 255"),
        ({"id": "\udc80"}, "not valid Unicode"),
        ({"retries": "1"}, "'retries' is a str"),
        ({"retries": True}, "'retries' is a bool"),
        ({"shadow": ["x"]}, "'shadow' is a list"),
        ({"stamped_headers": [["x"]]}, "not a list of strings"),
        ({"eta": "tomorrow"}, "'eta' is not an ISO 8601 time"),
        ({"expires": 60}, "'expires' is not an ISO 8601 time"),
    ],
)
def test_envelope_problems(change: dict[str, Any], text: str) -> None:
    headers = {**celery_message().headers, **change}
    problem = messages.envelope_problem(headers)
    assert problem is not None and text in problem


@pytest.mark.parametrize(
    ("body", "text"),
    [
        ({"args": [], "kwargs": {}}, "not [args, kwargs, embed]"),
        ([[], {}], "not [args, kwargs, embed]"),
        ([5, {}, None], "args are not a list"),
        ([[], [], None], "kwargs are not a mapping"),
        ([[], {"self": 1}, None], "kwarg 'self'"),
        ([[], {}, 5], "embed is not a mapping"),
        ([[], {}, {"hostname": "spoofed"}], "embed must be null"),
        ([[], {}, {"callbacks": [{"task": "x"}]}], "embed must be null"),
    ],
)
def test_body_problems(body: Any, text: str) -> None:
    problem = messages.body_problem(body)
    assert problem is not None and text in problem


def test_failures_trigger_a_full_collection_now_and_then(monkeypatch: pytest.MonkeyPatch) -> None:
    lifecycle.connect(Celery("limits-tests"))
    collections = []
    monkeypatch.setattr(lifecycle.gc, "collect", lambda *a: collections.append(a))
    monkeypatch.setattr(lifecycle, "_failures_since_collect", 0)
    for _ in range(2 * lifecycle.COLLECT_EVERY_FAILURES + 1):
        task_failure.send(sender=None, task_id="t", exception=ValueError("x"))
    assert len(collections) == 2
