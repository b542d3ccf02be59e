"""Score a CSV file offline: chunks of rows become predict_batch jobs, kept a few
in flight, and every input row comes back, in input order, with its prediction.

The output is written to a temporary file beside the target and renamed into
place only when every row has its prediction: a failed run leaves no partial file.
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from producer.client import Client, raise_for
from producer.contract import TASK_PREDICT_BATCH, BatchRequest, parse_request
from producer.errors import InvalidInput

PREDICTION_COLUMN = "prediction"


@dataclass
class ScoreSummary:
    rows: int = 0
    chunks: int = 0
    seconds: float = 0.0
    task_ms: list[float] = field(default_factory=list)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


@dataclass
class _Chunk:
    index: int
    lines: list[int]
    """File line number of each row (the header is line 1)."""
    raw: list[list[str]]
    task_id: str = ""
    predictions: list[float] | None = None

    @property
    def first_line(self) -> int:
        return self.lines[0]


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


def _parse(chunk: _Chunk, columns: list[int]) -> list[list[float]]:
    rows = []
    for line, raw in zip(chunk.lines, chunk.raw, strict=True):
        try:
            values = [float(raw[c]) for c in columns]
        except (ValueError, IndexError):
            raise InvalidInput(f"line {line}: not a number in a feature column: {raw}") from None
        if not all(math.isfinite(v) for v in values):
            raise InvalidInput(f"line {line}: NaN or infinite feature value: {raw}")
        rows.append(values)
    return rows


def _read_chunks(reader: Iterator[list[str]], chunk_rows: int) -> Iterator[_Chunk]:
    index, lines, batch = 0, [], []
    for line, raw in enumerate(reader, start=2):  # line 1 is the header
        if not raw:
            continue
        lines.append(line)
        batch.append(raw)
        if len(batch) == chunk_rows:
            yield _Chunk(index, lines, batch)
            index, lines, batch = index + 1, [], []
    if batch:
        yield _Chunk(index, lines, batch)


def _count_rows(path: Path) -> int:
    with path.open("rb") as fh:
        return max(0, sum(1 for line in fh if line.strip()) - 1)


def score_csv(
    client: Client,
    in_path: Path,
    out_path: Path,
    *,
    queue: str = "cpu",
    chunk_rows: int | None = None,
    max_in_flight: int | None = None,
    features: list[str] | None = None,
    progress: bool = True,
    timeout_s: float | None = None,
) -> ScoreSummary:
    chunk_rows = chunk_rows or client.settings.chunk_rows
    max_in_flight = max_in_flight or client.settings.max_in_flight
    info = client.model_info()
    if info is not None:
        chunk_rows = min(chunk_rows, info.max_batch_rows)
    summary = ScoreSummary()
    started = time.perf_counter()
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.part")
    total = _count_rows(in_path) if progress else None
    try:
        with (
            in_path.open(newline="") as src,
            tmp.open("w", newline="") as dst,
            tqdm(total=total, unit="row", disable=not progress, desc=in_path.name) as bar,
        ):
            reader = csv.reader(src)
            header = next(reader, None)
            if header is None:
                raise InvalidInput(f"{in_path} is empty: expected a header line")
            columns = choose_columns(
                header,
                info.n_features if info else None,
                features or (info.feature_names if info else None),
            )
            writer = csv.writer(dst)
            writer.writerow([*header, PREDICTION_COLUMN])
            _pump(
                client,
                reader,
                writer,
                bar,
                columns,
                chunk_rows,
                max_in_flight,
                queue,
                summary,
                timeout_s,
            )
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    summary.seconds = time.perf_counter() - started
    return summary


def _pump(
    client: Client,
    reader: Iterator[list[str]],
    writer: csv._writer,  # type: ignore[name-defined]
    bar: tqdm,
    columns: list[int],
    chunk_rows: int,
    max_in_flight: int,
    queue: str,
    summary: ScoreSummary,
    timeout_s: float | None,
) -> None:
    chunks = _read_chunks(reader, chunk_rows)
    window: deque[_Chunk] = deque()  # in input order
    by_id: dict[str, _Chunk] = {}
    exhausted = False
    while True:
        while not exhausted and len(by_id) < max_in_flight:
            chunk = next(chunks, None)
            if chunk is None:
                exhausted = True
                break
            rows = _parse(chunk, columns)
            request = parse_request(BatchRequest, (), {"rows": rows})
            client.validate_rows(request.rows)
            chunk.task_id = client.send(TASK_PREDICT_BATCH, {"rows": rows}, queue)
            window.append(chunk)
            by_id[chunk.task_id] = chunk
        if not window:
            return
        for status in client.wait_any(list(by_id), timeout_s):
            chunk = by_id.pop(status.task_id)
            try:
                result = raise_for(status)
            except Exception as exc:
                raise type(exc)(f"chunk at line {chunk.first_line}: {exc}") from exc
            chunk.predictions = result["predictions"]
            summary.task_ms.append(float(result["latency"]["task_ms"]))
        while window and window[0].predictions is not None:
            done = window.popleft()
            assert done.predictions is not None
            if len(done.predictions) != len(done.raw):
                raise InvalidInput(f"chunk at line {done.first_line}: row count mismatch")
            writer.writerows(
                [*raw, repr(p)] for raw, p in zip(done.raw, done.predictions, strict=True)
            )
            summary.rows += len(done.raw)
            summary.chunks += 1
            bar.update(len(done.raw))
