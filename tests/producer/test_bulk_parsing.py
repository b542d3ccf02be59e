from __future__ import annotations

import pytest

from producer.bulk import _Chunk, _parse, _read_chunks, choose_columns
from producer.errors import InvalidInput


def test_columns_by_model_feature_names() -> None:
    header = ["id", "x1", "x0", "note"]
    assert choose_columns(header, 2, ["x0", "x1"]) == [2, 1]


def test_columns_by_count_when_names_are_absent() -> None:
    assert choose_columns(["a", "b"], 2, ["x0", "x1"]) == [0, 1]
    assert choose_columns(["a", "b", "c"], None, None) == [0, 1, 2]


def test_unmatched_header_is_explained() -> None:
    with pytest.raises(InvalidInput, match="--features"):
        choose_columns(["id", "a", "b"], 2, ["x0", "x1"])


def test_chunks_keep_file_line_numbers() -> None:
    rows = [["1"], [], ["2"], ["3"], ["4"]]
    chunks = list(_read_chunks(iter(rows), 2))
    assert [(c.lines, c.raw) for c in chunks] == [
        ([2, 4], [["1"], ["2"]]),
        ([5, 6], [["3"], ["4"]]),
    ]


@pytest.mark.parametrize(
    ("cell", "text"), [("abc", "not a number"), ("nan", "NaN or infinite"), ("inf", "NaN")]
)
def test_bad_cells_name_their_line(cell: str, text: str) -> None:
    chunk = _Chunk(0, [10, 11], [["1", "2"], ["3", cell]])
    with pytest.raises(InvalidInput, match=f"line 11: {text}"):
        _parse(chunk, [0, 1])


def test_missing_cell() -> None:
    with pytest.raises(InvalidInput, match="line 10"):
        _parse(_Chunk(0, [10], [["1"]]), [0, 1])
