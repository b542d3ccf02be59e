"""The request schemas are strict: every kind of bad input gets a clear InvalidInput."""

from __future__ import annotations

import math

import pytest

from producer.contract import BatchRequest, PredictRequest, check_shape, parse_request
from producer.errors import FeatureCountMismatch, InvalidInput, PermanentError, TooManyRows


def test_numbers_are_accepted_as_floats() -> None:
    request = parse_request(PredictRequest, (), {"features": [1, 2.5, -3, 0, 1e300]})
    assert request.features == [1.0, 2.5, -3.0, 0.0, 1e300]
    assert all(type(v) is float for v in request.features)


@pytest.mark.parametrize(
    ("features", "text"),
    [
        ([1.0, "2"], "features.1: Input should be a valid number"),
        ([True, 2.0], "features.0"),
        ([None], "features.0"),
        ([math.nan], "finite"),
        ([-math.inf], "finite"),
        ([], "at least 1"),
        ("1,2,3", "valid list"),
        ([[1.0]], "features.0"),
    ],
)
def test_bad_features_are_refused(features: object, text: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_request(PredictRequest, (), {"features": features})
    assert text in str(info.value)


def test_unknown_and_missing_kwargs_are_named() -> None:
    with pytest.raises(InvalidInput, match="features: Field required; model: Extra inputs"):
        parse_request(PredictRequest, (), {"model": "other"})


def test_positional_arguments_are_refused() -> None:
    with pytest.raises(InvalidInput, match="positional"):
        parse_request(BatchRequest, ([[1.0]],), {})


def test_batch_errors_locate_the_row_and_column() -> None:
    with pytest.raises(InvalidInput, match=r"rows\.2\.1: Input should be a finite number"):
        parse_request(BatchRequest, (), {"rows": [[1.0, 2.0], [1.0, 2.0], [1.0, math.nan]]})


def test_check_shape() -> None:
    check_shape([[1.0, 2.0]] * 3, n_features=2, max_rows=3)
    with pytest.raises(TooManyRows, match="4 rows exceed the maximum of 3"):
        check_shape([[1.0, 2.0]] * 4, n_features=2, max_rows=3)
    with pytest.raises(FeatureCountMismatch, match="row 1 has 1 features; the model expects 2"):
        check_shape([[1.0, 2.0], [1.0]], n_features=2, max_rows=3)


def test_bad_input_errors_are_permanent() -> None:
    for cls in (InvalidInput, FeatureCountMismatch, TooManyRows):
        assert issubclass(cls, PermanentError) and not cls.retryable
