"""A CSV file as chunks of whole lines: their bytes, their feature values, their output.

A chunk is the next `chunk_rows` lines of the file, as bytes, verbatim (a record whose
quoted field runs on past them takes the lines it needs), so that its digest, its rows and
its output are decided by those bytes alone, run after run.

Its feature columns are parsed by pyarrow's CSV reader (one thread: the cores are the
workers') when every line of the chunk is one record: no blank line, no carriage return
but in CRLF line ends, and, where there are quote characters, as many rows as lines with
the last line closing its quotes (pyarrow's quoting is the csv module's otherwise; a test
compares them). Otherwise, or if pyarrow refuses anything in it, or a value is not finite,
the chunk is parsed exactly as the csv module and float() read it, value by value, whose
errors name the line. Both give the same float32 values: pyarrow parses a subset of what
float() accepts, to the same float64, and both round it to float32, as the worker would.

The output of a chunk is its bytes with ",<prediction>" inserted at the end of each row's
text, before its line end: blank lines and everything else stay as they were.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
from numpy.typing import NDArray

from contract.errors import InvalidInput

PREDICTION_COLUMN = "prediction"
READ_BYTES = 1 << 20
NL, CR, QUOTE = 10, 13, b'"'
_COMMA = pa.scalar(b",", pa.large_binary())

Lines = NDArray[np.int64]
Record = tuple[int, int, list[str]]
"""A csv record: index of its first line in the chunk, index past its last, its fields."""


def choose_columns(header: list[str], n_features: int | None, names: list[str] | None) -> list[int]:
    """Indexes of the feature columns: the model's feature names if the header has them all,
    else every column when their count is what the model expects."""
    if names and all(n in header for n in names):
        return [header.index(n) for n in names]
    if n_features is None or len(header) == n_features:
        return list(range(len(header)))
    wanted = ", ".join(names or []) or f"{n_features} columns"
    raise InvalidInput(
        f"cannot find the model's features ({wanted}) in the CSV header {header}; "
        "name them with --features"
    )


class LineReader:
    """A binary file, read as whole lines many at a time; newlines found with numpy."""

    def __init__(self, fh: BinaryIO, read_bytes: int = READ_BYTES) -> None:
        self._fh = fh
        self._read_bytes = read_bytes
        self._buf = b""
        self._newlines: Lines = np.empty(0, np.int64)
        """Where each newline of _buf is."""

    def take(self, n: int) -> tuple[bytes, Lines]:
        """The next `n` lines (fewer only at the end of the file, where the last may lack
        its newline) and where each newline is in them; b"" at the end."""
        parts, found, size = [self._buf], [self._newlines], len(self._buf)
        count = len(self._newlines)
        while count < n:
            block = self._fh.read(self._read_bytes)
            if not block:
                break
            at = np.flatnonzero(np.frombuffer(block, np.uint8) == NL)
            parts.append(block)
            found.append(at + size)
            size += len(block)
            count += len(at)
        buf = parts[0] if len(parts) == 1 else b"".join(parts)
        newlines = found[0] if len(found) == 1 else np.concatenate(found)
        cut = int(newlines[n - 1]) + 1 if count >= n else len(buf)
        self._buf, self._newlines = buf[cut:], newlines[n:] - cut
        return buf[:cut], newlines[:n]


@dataclass
class Chunk:
    index: int
    first_line: int
    """File line number of its first line (the header is line 1)."""
    data: bytes
    newlines: Lines
    records: list[Record] | None = None
    """Its csv records, when the csv module had to find where it ends."""
    fast: Rows | None = None
    """Its rows and values, when pyarrow read them while finding where it ends."""

    @property
    def n_lines(self) -> int:
        return len(self.newlines) + (1 if self.data and self.data[-1] != NL else 0)

    @property
    def last_line(self) -> int:
        return self.first_line + self.n_lines - 1

    def digest(self) -> str:
        return hashlib.blake2b(self.data, digest_size=16).hexdigest()


def _split(data: bytes) -> list[bytes]:
    """The lines of `data`, each with its newline."""
    lines = [line + b"\n" for line in data.split(b"\n")]
    lines[-1] = lines[-1][:-1]
    return lines if lines[-1] else lines[:-1]


def _csv_records(
    lines: list[bytes], first_line: int, more: Callable[[], bytes] | None = None
) -> Iterator[Record]:
    """The csv module's records of `lines` (the first is file line `first_line`). A quoted
    field still open after the last line takes lines from `more` (appended to `lines`)
    until it closes or the file ends. What the csv module refuses is InvalidInput."""
    fed = done = 0

    def feed() -> Iterator[str]:
        nonlocal fed
        while True:
            if fed == len(lines):
                # The reader asks for a line after the last one: it is inside a record
                # (fed > done), or looking for the next one, which is not this chunk's.
                extra = more() if more is not None and fed > done else b""
                if not extra:
                    return
                lines.append(extra)
            fed += 1
            yield lines[fed - 1].decode("utf-8", "surrogateescape")

    reader = csv.reader(feed())
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise InvalidInput(f"line {first_line + reader.line_num - 1}: {exc}") from None
        first, done = done, reader.line_num
        yield first, done, fields


def iter_chunks(
    reader: LineReader, chunk_rows: int, columns: list[int], width: int, first_line: int = 2
) -> Iterator[Chunk]:
    """The file's chunks, each of `chunk_rows` lines but where a record runs on. Whether one
    does is only in question where a quote character is: there, pyarrow reading one record
    a line (and the last line closing its quotes) says none does; else the csv module reads
    the chunk and takes the lines a record still open at its end needs. `columns` and
    `width` (the header's column count) are the fast path's, whose reading is kept."""
    index, line = 0, first_line
    while True:
        data, newlines = reader.take(chunk_rows)
        if not data:
            return
        chunk = Chunk(index, line, data, newlines)
        if QUOTE in data:
            chunk.fast = _fast(chunk, columns, width)
            if chunk.fast is None:
                _read_records(chunk, reader)
        yield chunk
        index, line = index + 1, line + chunk.n_lines


def _read_records(chunk: Chunk, reader: LineReader) -> None:
    lines = _split(chunk.data)
    taken = len(lines)
    # What the csv module refuses is refused again, the same way, when the chunk is parsed.
    with contextlib.suppress(InvalidInput):
        chunk.records = list(_csv_records(lines, chunk.first_line, lambda: reader.take(1)[0]))
    if len(lines) > taken:
        chunk.data = b"".join(lines)
        chunk.newlines = np.flatnonzero(np.frombuffer(chunk.data, np.uint8) == NL)


@dataclass(frozen=True)
class Header:
    fields: list[str]
    data: bytes

    def output(self, added: Sequence[str] = (PREDICTION_COLUMN,)) -> bytes:
        end = _text_end(self.data)
        tail = self.data[end:] or b"\n"
        return self.data[:end] + "".join(f",{name}" for name in added).encode() + tail


def read_header(reader: LineReader, name: str) -> Header:
    first, _ = reader.take(1)
    if not first:
        raise InvalidInput(f"{name} is empty: expected a header line")
    lines = [first]
    fields = next(_csv_records(lines, 1, lambda: reader.take(1)[0]))[2]
    if not fields:
        raise InvalidInput(f"{name}: line 1 is blank: expected a header line")
    text = b"".join(lines)
    if text.startswith(b"\xef\xbb\xbf") and fields:  # a UTF-8 byte order mark
        fields[0] = fields[0].removeprefix("\ufeff")
    return Header(fields, text)


# -- rows and values -----------------------------------------------------------------------


@dataclass
class Rows:
    text_ends: Lines
    """Where each row's text ends in the chunk's bytes (before its line end)."""
    values: NDArray[np.float32] | None = None
    """(rows, features), every value finite; None when only the layout was asked for."""


def _text_end(line: bytes) -> int:
    if line.endswith(b"\r\n"):
        return len(line) - 2
    return len(line) - 1 if line.endswith((b"\n", b"\r")) else len(line)


def _line_ends(chunk: Chunk) -> Lines | None:
    """Where each line's text ends, if every line may be a row of the fast path's: no blank
    line, no carriage return but before a newline; else None."""
    data, newlines = chunk.data, chunk.newlines
    ends = newlines if data[-1] == NL else np.append(newlines, len(data))
    carriage_returns = data.count(b"\r") if b"\r" in data else 0
    if carriage_returns:
        before = np.frombuffer(data, np.uint8)[np.maximum(newlines - 1, 0)] == CR
        before &= newlines > 0
        if int(before.sum()) != carriage_returns:
            return None
        ends = ends.copy()
        ends[: len(newlines)] -= before
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = newlines[: len(ends) - 1] + 1
    return None if bool((ends <= starts).any()) else ends


def _last_line_start(chunk: Chunk) -> int:
    before = len(chunk.newlines) - (2 if chunk.data[-1] == NL else 1)
    return int(chunk.newlines[before]) + 1 if before >= 0 else 0


def _closes_its_quotes(line: bytes) -> bool:
    """Whether `line`, read alone by the csv module, ends outside any quoted field (strict:
    anything unusual says no, and the chunk is read by the csv module)."""
    try:
        next(csv.reader([line.decode("utf-8", "surrogateescape")], strict=True))
    except (csv.Error, StopIteration):
        return False
    return True


def _fast(chunk: Chunk, columns: list[int], width: int) -> Rows | None:
    """The chunk's rows and values by pyarrow, or None where it may not read it as the csv
    module does. With a quote character, pyarrow's one record a line (quoted line breaks
    allowed, so a record running on shows as fewer rows) agrees with the csv module, but
    for a quoted field the chunk's last line leaves open: pyarrow ends it at the end of
    the bytes, the csv module takes the next line."""
    ends = _line_ends(chunk)
    if ends is None:
        return None
    data = chunk.data
    if QUOTE in data and not _closes_its_quotes(data[_last_line_start(chunk) :]):
        return None
    values = _fast_values(data, columns, width, len(ends))
    return None if values is None else Rows(ends, values)


def _fast_values(
    data: bytes, columns: list[int], width: int, rows: int
) -> NDArray[np.float32] | None:
    """The feature values by pyarrow's CSV parser, or None for anything it does not read as
    exactly `rows` rows of finite numbers."""
    names = [f"c{i}" for i in range(width)]
    wanted = [names[c] for c in columns]
    try:
        table = pa_csv.read_csv(
            pa.BufferReader(data),
            # One thread: the machine's cores are the workers'.
            read_options=pa_csv.ReadOptions(column_names=names, use_threads=False),
            parse_options=pa_csv.ParseOptions(newlines_in_values=True),
            convert_options=pa_csv.ConvertOptions(
                include_columns=wanted,
                column_types=dict.fromkeys(wanted, pa.float64()),
                null_values=[],
                strings_can_be_null=False,
            ),
        )
    except (pa.ArrowException, IndexError):
        return None
    if table.num_rows != rows:
        return None
    values = np.empty((rows, len(columns)), np.float32)
    with np.errstate(over="ignore"):
        for j, column in enumerate(table.columns):
            values[:, j] = column.to_numpy()
    return values if bool(np.isfinite(values).all()) else None


def _exact(chunk: Chunk, columns: list[int] | None) -> Rows:
    """The chunk as the csv module and float() read it: rows, and values unless `columns`
    is None. Refuses, naming the line, what the scoring cannot take."""
    lines = _split(chunk.data)
    records = chunk.records
    if records is None:
        records = list(_csv_records(lines, chunk.first_line))
    offsets = np.cumsum([0, *(len(line) for line in lines)])
    ends, values, numbers = [], [], []
    for first, stop, fields in records:
        if not fields:
            continue  # a blank line: written back as it is, no row
        line = chunk.first_line + first
        ends.append(int(offsets[stop - 1]) + _text_end(lines[stop - 1]))
        numbers.append(line)
        if columns is None:
            continue
        try:
            row = [float(fields[c]) for c in columns]
        except (ValueError, IndexError):
            raise InvalidInput(f"line {line}: not a number in a feature column: {fields}") from None
        if not all(map(math.isfinite, row)):
            raise InvalidInput(f"line {line}: NaN or infinite feature value: {fields}")
        values.append(row)
    text_ends = np.array(ends, dtype=np.int64)
    if columns is None:
        return Rows(text_ends)
    with np.errstate(over="ignore"):
        matrix = np.array(values, dtype=np.float32).reshape(len(values), len(columns))
    finite = np.isfinite(matrix).all(axis=1)
    if not finite.all():
        line = numbers[int(np.argmin(finite))]
        raise InvalidInput(
            f"line {line}: a feature value is beyond float32's range (about ±3.4e38), "
            "in which the model computes"
        )
    return Rows(text_ends, matrix)


def parse(chunk: Chunk, columns: list[int], width: int) -> Rows:
    """The chunk's rows and feature values (`width`: the header's column count)."""
    if chunk.records is None:
        if chunk.fast is not None:
            return chunk.fast
        if QUOTE not in chunk.data and (rows := _fast(chunk, columns, width)) is not None:
            return rows
    return _exact(chunk, columns)


def layout(chunk: Chunk) -> Lines:
    """Where each row's text ends, as parse finds the rows, without reading any value."""
    if chunk.records is None:
        if chunk.fast is not None:
            return chunk.fast.text_ends
        if QUOTE not in chunk.data and (ends := _line_ends(chunk)) is not None:
            return ends
    return _exact(chunk, None).text_ends


# -- output --------------------------------------------------------------------------------


def format_predictions(predictions: NDArray[np.float32]) -> pa.Array:
    """Each prediction as the shortest text that reads back as the same float32."""
    return pc.cast(pa.array(predictions, pa.float32()), pa.string()).cast(pa.large_binary())


def chunk_output(data: bytes, text_ends: Lines, predictions: NDArray[np.float32]) -> list[object]:
    """The chunk's bytes with "," and each row's prediction (or, 2-D, each of its values)
    after its text: as buffers, to be written in order. Built by pyarrow over the bytes as
    they are: each piece is what lies between two rows' text ends, and gets its row's
    values appended."""
    n = len(text_ends)
    if n == 0:
        return [data]
    offsets = np.empty(n + 1, np.int64)
    offsets[0] = 0
    offsets[1:] = text_ends
    pieces = pa.Array.from_buffers(
        pa.large_binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)]
    )
    values = predictions.reshape(n, -1)
    texts = [format_predictions(np.ascontiguousarray(column)) for column in values.T]
    joined = pc.binary_join_element_wise(pieces, *texts, _COMMA)
    _, joined_offsets, joined_data = joined.buffers()
    at = np.frombuffer(joined_offsets, np.int64)[joined.offset : joined.offset + n + 1]
    return [memoryview(joined_data)[int(at[0]) : int(at[-1])], data[int(text_ends[-1]) :]]
