"""The request schemas are strict: every kind of bad input gets a clear InvalidInput."""

from __future__ import annotations

import base64
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from contract.errors import FeatureCountMismatch, InvalidInput, PermanentError, TooManyRows
from contract.schemas import (
    BatchRequest,
    BatchResult,
    PredictRequest,
    check_shape,
    decode_f32,
    encode_f32,
    parse_request,
)


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


# -- float32 rows: rows_f32 -----------------------------------------------------------------


@given(st.lists(st.floats(width=32), min_size=0, max_size=60), st.integers(1, 4))
def test_f32_round_trips_bit_for_bit(values: list[float], width: int) -> None:
    values = values[: len(values) // width * width]
    matrix = np.array(values, dtype=np.float32).reshape(-1, width)
    text = encode_f32(matrix)
    assert text == base64.b64encode(matrix.astype("<f4").tobytes()).decode()
    back = decode_f32(text, width)
    assert back.shape == matrix.shape and back.dtype == np.float32
    assert back.tobytes() == matrix.tobytes()
    assert decode_f32(text).tobytes() == matrix.tobytes()  # flat without a width


def test_f32_is_little_endian_row_major() -> None:
    text = encode_f32(np.array([[1.0, 2.0], [3.0, -0.5]], dtype=">f8"))
    assert base64.b64decode(text).hex() == "0000803f0000004000004040000000bf"


@pytest.mark.parametrize(
    ("text", "width", "message"),
    [
        ("AAAAAAA", 1, "rows_f32: not base64 (length 7"),
        ("AAAAAAAA", 1, "rows_f32: 6 bytes are not whole rows of 1 float32"),
        ("A" * 16, 2, "rows_f32: 12 bytes are not whole rows of 2 float32 values"),
        ("AAA*AA==", 1, "rows_f32: not valid base64"),
        ("AAéAAA==", 1, "rows_f32: not valid base64"),
        ("AA=AAA==", 1, "rows_f32: not valid base64"),
    ],
)
def test_f32_that_is_not_whole_rows_of_base64_is_refused(
    text: str, width: int, message: str
) -> None:
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(")):
        decode_f32(text, width)


def f32_request(matrix: Any, **extra: Any) -> dict[str, Any]:
    matrix = np.asarray(matrix, dtype=np.float32)
    return {"rows_f32": encode_f32(matrix), "n_features": matrix.shape[1], **extra}


def test_batch_request_takes_rows_or_rows_f32() -> None:
    rows = [[1.0, 2.5], [-3.0, 4.0]]
    by_list = parse_request(BatchRequest, (), {"rows": rows}, n_features=2, max_rows=2)
    by_f32 = parse_request(BatchRequest, (), f32_request(rows), n_features=2, max_rows=2)
    assert by_list.matrix().tobytes() == by_f32.matrix().tobytes()
    assert by_f32.matrix().dtype == np.float32 and by_f32.matrix().shape == (2, 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "kwargs: Value error, send exactly one of rows and rows_f32"),
        ({"rows": [[1.0, 2.0]], **f32_request([[1.0, 2.0]])}, "exactly one of rows and rows_f32"),
        ({"rows_f32": encode_f32([1.0, 2.0])}, "n_features goes with rows_f32"),
        ({"rows": [[1.0, 2.0]], "n_features": 2}, "n_features goes with rows_f32"),
        ({"rows_f32": "", "n_features": 2}, "rows_f32: String should have at least 1 character"),
        ({"rows_f32": [1.0], "n_features": 2}, "rows_f32: Input should be a valid string"),
        ({"rows_f32": "AAAA", "n_features": "2"}, "n_features: Input should be a valid integer"),
        ({"rows_f32": "AAAA", "n_features": 2.0}, "n_features: Input should be a valid integer"),
    ],
)
def test_rows_f32_schema_faults_are_invalid_input(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        parse_request(BatchRequest, (), kwargs).matrix()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_rows_f32_values_must_be_finite(bad: float) -> None:
    request = parse_request(BatchRequest, (), f32_request([[1.0, 2.0], [3.0, bad]]))
    with pytest.raises(InvalidInput, match=r"rows_f32\.1\.1: Input should be a finite number"):
        request.matrix()


def test_rows_f32_shape_is_checked_before_anything_is_decoded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("validated a request the shape check should refuse")

    monkeypatch.setattr(BatchRequest, "model_validate", refuse)
    huge = "A" * (4 * 1_000_000)  # 3,000,000 bytes: 150,000 rows of 5
    with pytest.raises(TooManyRows, match="150000 rows exceed the maximum of 1000 per job"):
        parse_request(
            BatchRequest, (), {"rows_f32": huge, "n_features": 5}, n_features=5, max_rows=1000
        )
    with pytest.raises(FeatureCountMismatch, match=r"rows_f32 has 4 features a row; .*expects 5"):
        parse_request(
            BatchRequest, (), {"rows_f32": huge, "n_features": 4}, n_features=5, max_rows=1000
        )


def test_batch_result_carries_one_form_of_predictions() -> None:
    common = {
        "model_name": "m", "model_version": "v", "provider": "p", "device": "cpu",
        "hostname": "h", "latency": {"queue_wait_ms": None, "inference_ms": 1, "task_ms": 2},
    }  # fmt: skip
    compact = BatchResult.model_validate(
        {**common, "rows": 2, "predictions_f32": encode_f32([1.5, 2.5])}
    )
    assert compact.predictions is None and compact.predictions_f32 is not None
    assert decode_f32(compact.predictions_f32, name="predictions_f32").tolist() == [1.5, 2.5]
    assert BatchResult.model_validate({**common, "rows": 1, "predictions": [1.5]}).rows == 1
