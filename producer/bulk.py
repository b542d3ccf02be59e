"""Score a CSV file offline: chunks of rows become predict_batch jobs, kept a few
in flight, and every input row comes back, in input order, with its prediction.

One pass over the input, as bytes (producer.csv_chunks): each chunk's feature columns
are parsed (pyarrow's CSV reader; the csv module, value by value, for what it does not
take), sent as float32 (`rows_f32`), and its bytes kept until its predictions are back
and every chunk before it is written. The output is the input, byte for byte, with
",<prediction>" at the end of each row (the shortest text of its float32) and
",prediction" at the end of the header. It goes to a temporary file beside the target,
fsynced and renamed into place only when complete: a failed run leaves no partial
output. Memory is bounded: a window of chunks, twice the jobs in flight.

Resumable: a journal beside the output (producer.journal: `.<output name>.journal`, JSON
lines, each one fsynced) names the job, then records every chunk sent (with its task id)
and every chunk done (with its predictions). However a run ends short, the journal stays,
and the same command again writes the chunks done from the journal, collects the chunks
sent but not collected from the result backend when their results are still there, and
sends the rest, producing the very bytes an uninterrupted run would. Each chunk's bytes are
digested and checked against the journal, so a prediction is never written beside a row
other than the one it was computed from, even if the input changed between runs; a
journal of another job, or of another version of this program, is refused.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from tqdm import tqdm

from contract.errors import InvalidInput, NotReplicated, QueueFull
from contract.names import row_queue
from contract.schemas import ModelInfo, check_f32_shape, encode_f32
from producer.bulk_outputs import EXPLAIN_CHUNK_ROWS, Outputs
from producer.client import Client, raise_for, resolve_queue
from producer.csv_chunks import (
    PREDICTION_COLUMN,
    Chunk,
    LineReader,
    Lines,
    choose_columns,
    chunk_output,
    iter_chunks,
    layout,
    parse,
    read_header,
)
from producer.journal import (
    Journal,
    JournalError,
    JournalState,
    Sent,
    fsync_dir,
    job_header,
    journal_path,
    read_journal,
)

log = logging.getLogger(__name__)

QUEUE_FULL_WAIT_MAX_S = 2.0
"""Longest pause between two tries to send a chunk to a full queue."""

__all__ = [
    "PREDICTION_COLUMN",
    "JournalError",
    "ScoreSummary",
    "journal_path",
    "read_journal",
    "score_csv",
]


@dataclass
class ScoreSummary:
    rows: int = 0
    chunks: int = 0
    resumed: int = 0
    """Chunks finished by an earlier run: neither sent nor computed again."""
    recollected: int = 0
    """Chunks an earlier run sent but did not collect, whose results were still there."""
    sent: int = 0
    """Chunks this run sent to the queue."""
    seconds: float = 0.0
    task_ms: list[float] = field(default_factory=list)
    models: set[str] = field(default_factory=set)
    """`name/version` of the model behind each prediction in the output."""

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0

    @property
    def was_resumed(self) -> bool:
        return bool(self.resumed or self.recollected)


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
    restart: bool = False,
    explain: bool = False,
    log: Callable[[str], None] | None = None,
) -> ScoreSummary:
    """Score `in_path` into `out_path`, resuming an earlier run's journal if there is one
    (`restart` discards it instead). A journal of another job is refused (JournalError).
    `explain` adds each row's SHAP contributions (producer.bulk_outputs)."""
    default_rows = client.settings.chunk_rows
    chunk_rows = chunk_rows or (min(default_rows, EXPLAIN_CHUNK_ROWS) if explain else default_rows)
    max_in_flight = max_in_flight or client.settings.max_in_flight
    info = client.model_info(queue)
    outputs = Outputs.choose(explain, info)
    if info is not None:
        chunk_rows = min(chunk_rows, info.max_batch_rows)
    summary = ScoreSummary()
    started = time.perf_counter()
    with in_path.open("rb") as src:
        reader = LineReader(src)
        header = read_header(reader, str(in_path))
        columns = choose_columns(
            header.fields,
            info.n_features if info else None,
            features or (info.feature_names if info else None),
        )
        job = job_header(in_path, columns, chunk_rows, queue, header.fields)
        if outputs.explain:
            job["outputs"] = outputs.columns
        journal, state = Journal.open(journal_path(out_path), job, restart)
        try:
            if log and (state.done or state.sent):
                log(
                    f"resuming from {journal.path}: {len(state.done)} chunk(s) already done, "
                    f"{len(state.sent)} sent and not collected"
                )
            size = in_path.stat().st_size - len(header.data)
            with (
                _Output(out_path) as out,
                tqdm(
                    total=size, unit="B", unit_scale=True, unit_divisor=1024,
                    disable=not progress, desc=in_path.name,
                ) as bar,
            ):  # fmt: skip
                out.write(header.output(outputs.columns))
                run = _Run(
                    client, queue, timeout_s, max_in_flight, info, journal, state, summary,
                    out, bar, outputs,
                )  # fmt: skip
                width = len(header.fields)
                for chunk in iter_chunks(reader, chunk_rows, columns, width):
                    run.add(chunk, columns, width)
                run.finish()
                out.commit()
            # Only now: a crash before this line finds every chunk done and just writes again.
            journal.discard()
        finally:
            journal.close()
    summary.seconds = time.perf_counter() - started
    return summary


class _Output:
    """The output, written in order into a temporary file beside it; renamed into place by
    commit, removed otherwise."""

    def __init__(self, out_path: Path) -> None:
        self.path = out_path
        # One name, not one per process: the journal's lock makes this run its only
        # writer, and a killed run's leftover is overwritten rather than piling up.
        self.tmp = out_path.with_name(f".{out_path.name}.part")
        self._fh = self.tmp.open("wb")
        self._last = b""

    def __enter__(self) -> _Output:
        return self

    def __exit__(self, *_: object) -> None:
        self._fh.close()
        self.tmp.unlink(missing_ok=True)

    def write(self, *parts: Any) -> None:
        for part in parts:
            if len(part):
                self._fh.write(part)
                self._last = bytes(part[-1:])

    def commit(self) -> None:
        if self._last not in (b"", b"\n"):
            self._fh.write(b"\n")  # the input's last line had no line end
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)


@dataclass
class _Pending:
    """A chunk read and not yet written: its bytes, not what parsing it left behind."""

    index: int
    first_line: int
    data: bytes
    digest: str
    text_ends: Lines
    predictions: NDArray[np.float32] | None = None
    """Once done."""

    @property
    def rows(self) -> int:
        return len(self.text_ends)


def _pending(
    chunk: Chunk, digest: str, text_ends: Lines, predictions: NDArray[np.float32] | None = None
) -> _Pending:
    return _Pending(chunk.index, chunk.first_line, chunk.data, digest, text_ends, predictions)


def _changed(path: Path, chunk: Chunk | None = None) -> JournalError:
    # A chunk's digest says that one of its rows differs, not which.
    where = f" (somewhere in lines {chunk.first_line}-{chunk.last_line})" if chunk else ""
    return JournalError(
        f"the input changed{where} since {path} recorded it; "
        "pass --restart to discard the journal and score from the start"
    )


class _Run:
    """Chunks in, in order: each is written from the journal, collected from an earlier
    run's result, or sent; written out in order as they are done."""

    def __init__(
        self,
        client: Client,
        queue: str,
        timeout_s: float | None,
        max_in_flight: int,
        info: ModelInfo | None,
        journal: Journal,
        state: JournalState,
        summary: ScoreSummary,
        out: _Output,
        bar: tqdm,
        outputs: Outputs,
    ) -> None:
        self.client, self.queue, self.timeout_s = client, queue, timeout_s
        self.max_in_flight = max_in_flight
        self.info = info
        self.journal, self.state, self.summary = journal, state, summary
        self.out, self.bar, self.outputs = out, bar, outputs
        self.window: dict[int, _Pending] = {}
        """Chunks read and not yet written, by index."""
        self.in_flight: dict[str, _Pending] = {}
        self.next_write = 0

    def add(self, chunk: Chunk, columns: list[int], width: int) -> None:
        summary = self.summary
        summary.chunks += 1
        digest = chunk.digest()
        done = self.state.done.pop(chunk.index, None)
        sent = self.state.sent.pop(chunk.index, None)
        recorded = done or sent
        if recorded is not None and recorded.digest != digest:
            raise _changed(self.journal.path, chunk)
        if done is not None:
            pending = _pending(chunk, digest, layout(chunk), done.predictions)
            if pending.rows * self.outputs.width != len(done.predictions):
                raise _changed(self.journal.path, chunk)
            summary.resumed += 1
            summary.models.add(done.model)
        else:
            earlier = None if sent is None else _pending(chunk, digest, layout(chunk))
            if sent is not None and earlier is not None and self._recollect(sent, earlier):
                summary.recollected += 1
                pending = earlier
            else:
                pending = self._send(chunk, digest, columns, width)
        summary.rows += pending.rows
        self.window[chunk.index] = pending
        self._write_ready()
        while self.in_flight and (
            len(self.in_flight) >= self.max_in_flight or len(self.window) > 2 * self.max_in_flight
        ):
            self._collect()

    def finish(self) -> None:
        while self.in_flight:
            self._collect()
        if self.state.done or self.state.sent:
            # The journal names chunks past the end of the input: it was cut short since.
            raise _changed(self.journal.path)
        if self.window:  # pragma: no cover - every chunk read is done by now
            raise AssertionError(f"chunks left unwritten: {sorted(self.window)}")

    def _send(self, chunk: Chunk, digest: str, columns: list[int], width: int) -> _Pending:
        try:
            rows = parse(chunk, columns, width)
            assert rows.values is not None
            if self.info is not None:
                n, k = rows.values.shape
                check_f32_shape(n, k, self.info.n_features, self.info.max_batch_rows)
        except InvalidInput:
            # Fixing the file makes it another job: this journal could never be resumed.
            self.journal.discard()
            raise
        # Values checked here: finite, the model's width, not too many. The worker checks
        # them again, whole, with numpy; nothing is validated value by value.
        kwargs = {"rows_f32": encode_f32(rows.values), "n_features": rows.values.shape[1]}
        # To the row queue: each worker process's row lane takes it there, without Celery's
        # per-message handling (a few milliseconds of a 20,000-row chunk's CPU).
        task_id = self._enqueue(kwargs)
        self.journal.append({"sent": chunk.index, "digest": digest, "task_id": task_id})
        pending = _pending(chunk, digest, rows.text_ends)
        self.in_flight[task_id] = pending
        self.summary.sent += 1
        return pending

    def _enqueue(self, kwargs: dict[str, Any]) -> str:
        """Send one chunk; a full queue (QueueFull, INFERENCE_MAX_QUEUE_DEPTH) or replicas that
        lag (NotReplicated) are waited out, not failed: scoring is the job that can wait."""
        delay = 0.05
        task_id = str(uuid.uuid4())
        while True:
            try:
                return self.client.send(
                    self.outputs.task, kwargs, row_queue(resolve_queue(self.queue)), task_id
                )
            except (QueueFull, NotReplicated) as exc:
                # NotReplicated: the chunk may be queued already; the same id makes a second
                # copy harmless (its result is the same, and the first one stored is kept).
                if delay == 0.05:
                    log.info("scoring waits to send a chunk: %s", exc)
                time.sleep(delay)
                delay = min(delay * 2, QUEUE_FULL_WAIT_MAX_S)

    def _recollect(self, sent: Sent, pending: _Pending) -> bool:
        """Whether an earlier run's result for this chunk was still there (and is now
        done). Anything else, failed, queued, running or expired, is sent again: waiting on
        a task whose message may be lost could wait forever, and running one twice is
        harmless."""
        for status in self.client.statuses(sent.task_ids):
            if status.state == "SUCCESS" and status.result is not None:
                self._finish(pending, status.result)
                return True
        return False

    def _collect(self) -> None:
        for status in self.client.wait_any(list(self.in_flight), self.timeout_s):
            pending = self.in_flight.pop(status.task_id)
            try:
                result = raise_for(status)
            except Exception as exc:
                raise type(exc)(f"chunk at line {pending.first_line}: {exc}") from exc
            self._finish(pending, result)
        self._write_ready()

    def _finish(self, pending: _Pending, result: dict[str, Any]) -> None:
        try:
            predictions = self.outputs.values(result, pending.rows).reshape(-1)
        except (InvalidInput, KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"chunk at line {pending.first_line}: bad result: {exc}") from None
        model = f"{result.get('model_name')}/{result.get('model_version')}"
        self.journal.append(
            {
                "done": pending.index,
                "digest": pending.digest,
                "rows": pending.rows,
                "model": model,
                "predictions": encode_f32(predictions),
            }
        )
        pending.predictions = predictions
        self.summary.models.add(model)
        task_ms = result.get("latency", {}).get("task_ms")
        if task_ms is not None:
            self.summary.task_ms.append(float(task_ms))

    def _write_ready(self) -> None:
        """Every chunk done that is next in input order, out to the file."""
        while (pending := self.window.get(self.next_write)) and pending.predictions is not None:
            del self.window[self.next_write]
            data = pending.data
            self.out.write(*chunk_output(data, pending.text_ends, pending.predictions))
            self.bar.update(len(data))
            self.next_write += 1
