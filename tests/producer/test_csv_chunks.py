"""Reading CSV files as chunks of bytes: line numbers, the fast path (pyarrow) and the exact
path (csv module and float()) agreeing row for row, each reason to take the exact path, its
errors, and the output written back around the input's bytes."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contract.errors import InvalidInput
from producer import csv_chunks
from producer.csv_chunks import (
    Chunk,
    LineReader,
    choose_columns,
    chunk_output,
    iter_chunks,
    layout,
    parse,
    read_header,
)


def chunks_of(text: bytes, chunk_rows: int, read_bytes: int = 7) -> list[Chunk]:
    """The chunks of a CSV text whose feature columns are all but the first."""
    reader = LineReader(io.BytesIO(text), read_bytes)
    width = len(read_header(reader, "test.csv").fields)
    return list(iter_chunks(reader, chunk_rows, list(range(1, width)) or [0], width))


def one_chunk(body: bytes) -> Chunk:
    (chunk,) = chunks_of(b"id,a,b\n" + body, 10_000, 1 << 20)
    return chunk


@pytest.fixture
def exact_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The first line of each chunk parsed by the exact path."""
    calls: list[int] = []

    def spy(chunk: Chunk, columns: list[int] | None) -> csv_chunks.Rows:
        if columns is not None:
            calls.append(chunk.first_line)
        return _EXACT(chunk, columns)

    monkeypatch.setattr(csv_chunks, "_exact", spy)
    return calls


_EXACT = csv_chunks._exact


def exact_values(chunk: Chunk, columns: list[int]) -> csv_chunks.Rows:
    """The exact path's reading, whichever path parse takes."""
    return _EXACT(chunk, columns)


# -- columns -------------------------------------------------------------------------------


def test_columns_by_model_feature_names() -> None:
    header = ["id", "x1", "x0", "note"]
    assert choose_columns(header, 2, ["x0", "x1"]) == [2, 1]


def test_columns_by_count_when_names_are_absent() -> None:
    assert choose_columns(["a", "b"], 2, ["x0", "x1"]) == [0, 1]
    assert choose_columns(["a", "b", "c"], None, None) == [0, 1, 2]


def test_unmatched_header_is_explained() -> None:
    with pytest.raises(InvalidInput, match="--features"):
        choose_columns(["id", "a", "b"], 2, ["x0", "x1"])


# -- lines and chunks ----------------------------------------------------------------------


@pytest.mark.parametrize("read_bytes", [1, 3, 7, 1 << 20])
def test_chunks_are_whole_lines_with_their_file_line_numbers(read_bytes: int) -> None:
    body = b"".join(b"r%d,%d,%d\n" % (i, i, i * 10) for i in range(23))
    chunks = chunks_of(b"id,a,b\n" + body, 10, read_bytes)
    assert [(c.index, c.first_line, c.last_line) for c in chunks] == [
        (0, 2, 11),
        (1, 12, 21),
        (2, 22, 24),
    ]
    assert b"".join(c.data for c in chunks) == body
    for c in chunks:
        assert c.newlines.tolist() == [i for i, b in enumerate(c.data) if b == 10]
        assert c.records is None  # no quote: where it ends is never in question


def test_the_last_line_may_lack_its_newline() -> None:
    chunks = chunks_of(b"a\n1\n2\n3", 2)
    assert [(c.data, c.n_lines) for c in chunks] == [(b"1\n2\n", 2), (b"3", 1)]


def test_a_header_alone_gives_no_chunk_and_an_empty_file_is_refused() -> None:
    assert chunks_of(b"a,b\n", 5) == []
    with pytest.raises(InvalidInput, match=r"test\.csv is empty"):
        chunks_of(b"", 5)
    with pytest.raises(InvalidInput, match=r"test\.csv: line 1 is blank"):
        chunks_of(b"\na,b\n1,2\n", 5)


def test_header_fields_and_output() -> None:
    reader = LineReader(io.BytesIO(b'\xef\xbb\xbfid,"a,b"\r\n1,2\r\n'))
    header = read_header(reader, "x")
    assert header.fields == ["id", "a,b"]  # the byte order mark is no part of the name
    assert header.output() == b'\xef\xbb\xbfid,"a,b",prediction\r\n'
    assert read_header(LineReader(io.BytesIO(b"a")), "x").output() == b"a,prediction\n"
    multi = LineReader(io.BytesIO(b'"a\nb",c\n1,2\n'))
    assert read_header(multi, "x").fields == ["a\nb", "c"]
    assert multi.take(5)[0] == b"1,2\n"


def test_a_quoted_line_break_extends_the_chunk_to_the_end_of_its_record() -> None:
    body = b'1,2,"x\ny\nz"\n3,4,5\n6,7,8\n'
    chunks = chunks_of(b"a,b,c\n" + body, 1)
    assert [(c.first_line, c.data) for c in chunks] == [
        (2, b'1,2,"x\ny\nz"\n'),
        (5, b"3,4,5\n"),
        (6, b"6,7,8\n"),
    ]
    # A quote in the middle of a field is a character, as the csv module reads it: no
    # record runs on, and the chunk keeps its size.
    chunks = chunks_of(b'a,b\n1,x"y\n2,z\n', 1)
    assert [c.data for c in chunks] == [b'1,x"y\n', b"2,z\n"]


def test_quoted_fields_on_one_line_take_the_fast_path(exact_calls: list[int]) -> None:
    """As R's write.csv and others write them: every string, even numbers, quoted."""
    rows = [f'"row {i}","{i / 7!r}",{i}' for i in range(100)]
    text = b'"id","a","b"\n' + "\n".join(rows).encode() + b"\n"
    chunks = chunks_of(text, 30)
    assert [c.first_line for c in chunks] == [2, 32, 62, 92]
    for chunk in chunks:
        assert chunk.records is None and chunk.fast is not None
        got = parse(chunk, [1, 2], 3)
        exact = exact_values(chunk, [1, 2])
        assert got.values is not None and exact.values is not None
        assert got.values.tobytes() == exact.values.tobytes()
        assert got.text_ends.tolist() == exact.text_ends.tolist() == layout(chunk).tolist()
    assert exact_calls == []


def test_a_quote_the_last_line_leaves_open_is_found() -> None:
    """pyarrow would end the open field at the end of the chunk's bytes, with as many rows
    as lines: the csv module is asked, and the record takes the lines it needs."""
    text = b'id,a,b\nx,1,2\ny,3,"4\n5"\nz,6,7\n'
    first, second = chunks_of(text, 2)
    assert (first.data, first.records is not None) == (b'x,1,2\ny,3,"4\n5"\n', True)
    assert (second.first_line, second.data) == (5, b"z,6,7\n")
    with pytest.raises(InvalidInput, match=r"line 3: not a number .*'4\\n5'"):
        parse(first, [1, 2], 3)


fields = st.text(alphabet='a1,"', max_size=5)
csv_line = st.lists(st.one_of(fields, fields.map(lambda f: '"' + f.replace('"', '""') + '"')))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(csv_line.map(",".join), st.text(alphabet='a1,"\n', max_size=12)),
        min_size=1,
        max_size=8,
    ),
    st.sampled_from([b"\n", b"\r\n"]),
    st.integers(1, 3),
)
def test_where_the_fast_path_reads_a_chunk_the_csv_module_reads_the_same(
    lines: list[str], line_end: bytes, chunk_rows: int
) -> None:
    """Quoting as pyarrow reads it, where it reads a chunk at all, is the csv module's:
    the same records and the same fields (strings, every column a feature column)."""
    body = line_end.join(line.encode() for line in lines) + line_end
    text = b"h0,h1\n" + body
    reader = LineReader(io.BytesIO(text), 5)
    read_header(reader, "x")
    names = ["c0", "c1"]
    for chunk in iter_chunks(reader, chunk_rows, [0, 1], 2):
        # The csv module's records of the chunk, and whether one runs on past it.
        records = list(csv_chunks._csv_records(csv_chunks._split(chunk.data), 2))
        if chunk.fast is None:
            continue
        assert [stop - first for first, stop, _ in records] == [1] * chunk.n_lines
        table = csv_chunks.pa_csv.read_csv(
            csv_chunks.pa.BufferReader(chunk.data),
            read_options=csv_chunks.pa_csv.ReadOptions(column_names=names),
            parse_options=csv_chunks.pa_csv.ParseOptions(newlines_in_values=True),
            convert_options=csv_chunks.pa_csv.ConvertOptions(
                column_types=dict.fromkeys(names, csv_chunks.pa.string()),
                null_values=[],
                strings_can_be_null=False,
            ),
        )
        assert [list(r.values()) for r in table.to_pylist()] == [f for _, _, f in records]


# -- fast and exact paths ------------------------------------------------------------------


def test_plain_chunks_take_the_fast_path_and_agree_with_the_exact_one(
    exact_calls: list[int],
) -> None:
    rng = np.random.default_rng(1)
    values = rng.normal(0, 1e3, (500, 3))
    lines = [f"row-{i},{float(a)!r},{b:.3e},{c:.9g}" for i, (a, b, c) in enumerate(values)]
    for line_end in (b"\n", b"\r\n"):
        chunk = one_chunk(line_end.join(s.encode() for s in lines) + line_end)
        fast = parse(chunk, [1, 2, 3], 4)
        assert exact_calls == []
        exact = exact_values(chunk, [1, 2, 3])
        assert fast.values is not None and exact.values is not None
        assert fast.values.tobytes() == exact.values.tobytes()
        assert fast.text_ends.tolist() == exact.text_ends.tolist() == layout(chunk).tolist()
        expected = [[float(v) for v in line.split(",")[1:]] for line in lines]
        assert fast.values.tobytes() == np.array(expected, dtype=np.float32).tobytes()


number_text = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.floats(allow_nan=False, allow_infinity=False, width=32).map(lambda v: f"{v:.9g}"),
    st.integers(-(10**20), 10**20).map(str),
    st.sampled_from(["1.", ".5", "+.5", "-0", "1E5", "0001.5", "1e-400", "7e-46", " 1.5", "2 "]),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(number_text, number_text), min_size=1, max_size=30))
def test_fast_and_exact_paths_agree_on_any_numbers_float_reads(
    rows: list[tuple[str, str]],
) -> None:
    chunk = one_chunk(b"".join(f"id,{a},{b}\n".encode() for a, b in rows))
    try:
        exact = exact_values(chunk, [1, 2])
    except InvalidInput as exc:  # beyond float32: both paths refuse it
        assert "float32" in str(exc)
        with pytest.raises(InvalidInput, match="float32"):
            parse(chunk, [1, 2], 3)
        return
    got = parse(chunk, [1, 2], 3)
    assert got.values is not None and exact.values is not None
    assert got.values.tobytes() == exact.values.tobytes()
    assert got.text_ends.tolist() == exact.text_ends.tolist()


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b'r0,1,2\n"r\n1",3,4\n', "a quoted line break"),
        (b'r0,1,2\n"r1","3",4\n', "quoted fields on one line (still fine)"),
        (b"r0,1,2\n\nr1,3,4\n", "a blank line"),
        (b"r0,1,2\nr1,3,4\n\n", "a blank line at the end"),
        (b"r0,1,2\r\nr1,3,4\n", "mixed line ends (still fine)"),
        (b"r0,1,2\nr1,1_000,4\n", "a number pyarrow does not read"),
        (b"r0,1,2\nr1,3,4,extra\n", "more fields than the header"),
    ],
)
def test_the_exact_path_takes_what_the_fast_one_cannot(
    body: bytes, why: str, exact_calls: list[int]
) -> None:
    chunk = one_chunk(body)
    rows = parse(chunk, [1, 2], 3)
    assert rows.values is not None
    expected = [[1, 2], [1000 if b"1_000" in body else 3, 4]]
    assert rows.values.tolist() == expected, why
    assert exact_calls == ([] if why.endswith("(still fine)") else [2]), why
    assert rows.text_ends.tolist() == layout(chunk).tolist()


def test_a_lone_carriage_return_is_refused_with_its_line() -> None:
    chunk = one_chunk(b"r0,1,2\nr1,3\r,4\n")
    with pytest.raises(InvalidInput, match="line 3: new-line character seen"):
        parse(chunk, [1, 2], 3)


@pytest.mark.parametrize(
    ("cell", "text"),
    [
        ("abc", "line 11: not a number in a feature column"),
        ("", "line 11: not a number"),
        ("nan", "line 11: NaN or infinite"),
        ("-inf", "line 11: NaN or infinite"),
        ("1e39", "line 11: a feature value is beyond float32's range"),
    ],
)
def test_bad_cells_name_their_line(cell: str, text: str) -> None:
    body = "".join(f"r{i},{i},{i}\n" for i in range(9)) + f"r9,{cell},1\n"
    chunk = one_chunk(body.encode())
    with pytest.raises(InvalidInput, match=text):
        parse(chunk, [1, 2], 3)


def test_a_missing_cell_and_a_nul_name_their_line() -> None:
    with pytest.raises(InvalidInput, match=r"line 3: not a number .*\['r1', '3'\]"):
        parse(one_chunk(b"r0,1,2\nr1,3\n"), [1, 2], 3)
    with pytest.raises(InvalidInput, match="line 4: not a number"):
        parse(one_chunk(b"r0,1,2\nr1,3,4\nr2,\x00,6\n"), [1, 2], 3)


def test_line_numbers_count_the_lines_of_quoted_records() -> None:
    chunks = chunks_of(b'id,a,b\n"x\ny",1,2\nz,nan,3\n', 10)
    with pytest.raises(InvalidInput, match="line 4: NaN"):
        parse(chunks[0], [1, 2], 3)


# -- output --------------------------------------------------------------------------------


def predictions(n: int) -> np.ndarray:
    return (np.arange(n, dtype=np.float32) + np.float32(0.1)) / np.float32(3)


def output(chunk: Chunk, columns: list[int]) -> bytes:
    rows = parse(chunk, columns, 3)
    return b"".join(
        bytes(p) for p in chunk_output(chunk.data, rows.text_ends, predictions(len(rows.text_ends)))
    )


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"a,1,2\nb,3,4\n", b"a,1,2,0.033333335\nb,3,4,0.36666667\n"),
        (b"a,1,2\r\nb,3,4\r\n", b"a,1,2,0.033333335\r\nb,3,4,0.36666667\r\n"),
        (b"a,1,2\nb,3,4", b"a,1,2,0.033333335\nb,3,4,0.36666667"),
        (b"\na,1,2\n\n\nb,3,4\n\n", b"\na,1,2,0.033333335\n\n\nb,3,4,0.36666667\n\n"),
        (b'"a\nx",1,2\r\n"b",3,4\n', b'"a\nx",1,2,0.033333335\r\n"b",3,4,0.36666667\n'),
    ],
)
def test_output_is_the_input_with_each_prediction_after_its_row(
    body: bytes, expected: bytes
) -> None:
    assert output(one_chunk(body), [1, 2]) == expected


def test_output_of_a_chunk_without_rows_is_its_bytes() -> None:
    chunk = one_chunk(b"\n\n")
    rows = layout(chunk)
    assert rows.tolist() == []
    assert chunk_output(chunk.data, rows, predictions(0)) == [b"\n\n"]


def test_predictions_are_written_as_the_shortest_float32_text() -> None:
    values = np.array([0.1, 12.0, -0.0, 1e-7, 3.4028235e38, 16.123456], dtype=np.float32)
    text = csv_chunks.format_predictions(values).to_pylist()
    assert [t.decode() for t in text] == ["0.1", "12", "-0", "1e-7", "3.4028235e+38", "16.123455"]
    assert np.array([float(t) for t in text], dtype=np.float32).tobytes() == values.tobytes()


def test_a_file_round_trip(tmp_path: Path) -> None:
    """Every chunk of a file, fast or exact, written back: the input with its predictions."""
    body = b"".join(b"r%d,%d,%d\n" % (i, i, -i) for i in range(40))
    body = body.replace(b"r7,", b'"r\n7",').replace(b"r20,", b"\nr20,")
    text = b"id,a,b\r\n" + body
    reader = LineReader(io.BytesIO(text), 5)
    header = read_header(reader, "x")
    out = [header.output()]
    for chunk in iter_chunks(reader, 6, [1, 2], 3):
        rows = parse(chunk, [1, 2], 3)
        n = len(rows.text_ends)
        out += chunk_output(chunk.data, rows.text_ends, np.full(n, 2.5, np.float32))
    lines = b"".join(bytes(p) for p in out).split(b"\n")
    assert lines[0] == b"id,a,b,prediction\r"
    assert lines[1:5] == [b"r0,0,0,2.5", b"r1,1,-1,2.5", b"r2,2,-2,2.5", b"r3,3,-3,2.5"]
    assert b'"r\n7",7,-7,2.5\n' in b"".join(bytes(p) for p in out)
    assert lines.count(b"") == 2  # the blank line, and after the last line end
