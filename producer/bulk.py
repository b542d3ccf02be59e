"""Score a CSV file offline: chunks of rows become predict_batch jobs, kept a few
in flight, and every input row comes back, in input order, with its prediction.

Resumable: a journal beside the output (`.<output name>.journal`, JSON lines,
each one fsynced) names the job, then records every chunk sent (with its task
id) and every chunk finished (with its predictions). However a run ends short,
the journal stays, and the same command again skips the finished chunks,
collects the chunks sent but not collected from the result backend when their
results are still there, and sends the rest.

Two passes over the input. The first scores: rows are parsed, sent and
forgotten; only predictions stay in memory (float64 arrays, 8 bytes a row). The
second writes every input row with its prediction to a temporary file beside
the target, renamed into place only when complete: a failed run leaves no
partial output. Each chunk's rows are digested and checked against the journal
on both passes, so a prediction is never written beside a row other than the
one it was computed from, even if the input changes between runs or passes.
"""

from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
from tqdm import tqdm

from producer.client import Client, raise_for, resolve_queue
from producer.contract import TASK_PREDICT_BATCH, BatchRequest, parse_request
from producer.errors import InvalidInput

if sys.platform != "win32":
    import fcntl
else:  # pragma: no cover
    fcntl = None

PREDICTION_COLUMN = "prediction"
JOURNAL_VERSION = 1

# The job's fingerprint hashes this much of the input's head and of its tail: cheap on any
# size, and catches another file or a rewritten one at once; the chunk digests catch the rest.
SAMPLE_BYTES = 1 << 20


class JournalError(InvalidInput):
    """An earlier run's journal cannot be used: another job's, damaged, or in use."""


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


@dataclass
class _Chunk:
    index: int
    lines: list[int]
    """File line number of each row (the header is line 1)."""
    raw: list[list[str]]

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


def _digest(raw: list[list[str]]) -> str:
    return hashlib.blake2b(
        "\x1e".join("\x1f".join(row) for row in raw).encode(), digest_size=16
    ).hexdigest()


# -- the journal ---------------------------------------------------------------------------


def journal_path(out_path: Path) -> Path:
    return out_path.with_name(f".{out_path.name}.journal")


def encode_predictions(values: np.ndarray) -> str:
    # The bytes themselves, not decimal text: the output of a resumed run must be identical
    # to that of an uninterrupted one, down to the last bit of every prediction.
    return base64.b64encode(np.ascontiguousarray(values, dtype="<f8").tobytes()).decode("ascii")


def decode_predictions(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text, validate=True), dtype="<f8")


def job_header(
    in_path: Path, columns: list[int], chunk_rows: int, queue: str, header: list[str]
) -> dict[str, Any]:
    """What identifies a job: a journal is only ever resumed by the same one."""
    size = in_path.stat().st_size
    sample = hashlib.sha256()
    with in_path.open("rb") as fh:
        sample.update(fh.read(SAMPLE_BYTES))
        if size > SAMPLE_BYTES:
            fh.seek(max(SAMPLE_BYTES, size - SAMPLE_BYTES))
            sample.update(fh.read(SAMPLE_BYTES))
    return {
        "journal": JOURNAL_VERSION,
        "input": str(in_path.resolve()),
        "size": size,
        "sample_sha256": sample.hexdigest(),
        "header": header,
        "chunk_rows": chunk_rows,
        "columns": columns,
        "queue": resolve_queue(queue),
    }


@dataclass
class _Done:
    digest: str
    predictions: np.ndarray
    model: str


@dataclass
class _Sent:
    digest: str
    task_ids: list[str]
    """Every id this chunk was sent under, by any run: any one result will do."""


@dataclass
class JournalState:
    done: dict[int, _Done] = field(default_factory=dict)
    sent: dict[int, _Sent] = field(default_factory=dict)
    """Sent and not done."""


def _damaged(number: int) -> JournalError:
    return JournalError(f"line {number} of the journal is damaged; pass --restart to discard it")


def _apply(state: JournalState, record: dict[str, Any], number: int) -> None:
    try:
        if "done" in record:
            index = int(record["done"])
            predictions = decode_predictions(record["predictions"])
            if len(predictions) != int(record["rows"]):
                raise ValueError("row count")
            state.done[index] = _Done(str(record["digest"]), predictions, str(record["model"]))
            state.sent.pop(index, None)
        elif "sent" in record:
            index = int(record["sent"])
            if index not in state.done:
                sent = state.sent.setdefault(index, _Sent(str(record["digest"]), []))
                sent.digest = str(record["digest"])
                sent.task_ids.append(str(record["task_id"]))
        else:
            raise ValueError("unknown record")
    except (KeyError, TypeError, ValueError, binascii.Error):
        raise _damaged(number) from None


def _mismatch(old: dict[str, Any], new: dict[str, Any]) -> JournalError:
    keys = [k for k in new if old.get(k) != new[k]] + [k for k in old if k not in new]
    shown = "; ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in keys[:3])
    return JournalError(
        f"the journal was left by a run of another job ({shown}); its results cannot be "
        "mixed into this one: pass --restart to discard it and score from the start"
    )


def read_journal(
    fh: IO[bytes], job: dict[str, Any] | None = None
) -> tuple[dict[str, Any] | None, JournalState, int]:
    """The job header (None while there is none), what the records say, and the length of
    the intact part; with `job`, another job's journal is refused before its records are
    read. A crash while appending leaves at most a torn last line, without its newline: it
    is ignored (its chunk is simply done again). Any other unreadable line is damage, not a
    crash, and is refused. Reads a line at a time: the predictions of a big file's journal
    are decoded as they come, never all held as text."""
    header: dict[str, Any] | None = None
    state = JournalState()
    intact = 0
    for number, line in enumerate(fh, start=1):
        if not line.endswith(b"\n"):
            break
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            raise _damaged(number)
        if header is None:
            header = record
            if job is not None and header != job:
                raise _mismatch(header, job)
        else:
            _apply(state, record, number)
        intact += len(line)
    return header, state, intact


def _fsync_dir(path: Path) -> None:
    if sys.platform == "win32":  # pragma: no cover
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """An open, locked journal: one run at a time appends to it."""

    def __init__(self, path: Path, fh: IO[bytes]) -> None:
        self.path = path
        self._fh = fh

    @classmethod
    def open(
        cls, path: Path, job: dict[str, Any], restart: bool = False
    ) -> tuple[Journal, JournalState]:
        fh = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+b")
        try:
            journal = cls(path, fh)
            journal._lock()
            header, state, intact = (None, JournalState(), 0)
            if not restart:
                try:
                    header, state, intact = read_journal(fh, job)
                except JournalError as exc:
                    raise JournalError(f"{path}: {exc}") from None
            if header is None:
                fh.seek(0)
                fh.truncate()
                journal.append(job)
                _fsync_dir(path.parent)
                return journal, JournalState()
            # Appending after a torn line would glue the next record onto it.
            fh.seek(intact)
            fh.truncate()
            return journal, state
        except BaseException:
            fh.close()
            raise

    def _lock(self) -> None:
        if fcntl is None:  # pragma: no cover
            return
        try:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise JournalError(
                f"{self.path} is in use: another run is scoring into the same output"
            ) from None
        try:
            same = os.stat(self.path).st_ino == os.fstat(self._fh.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            # The run that held the lock finished and removed its journal in between.
            raise JournalError(f"{self.path} was just finished by another run; run again")

    def append(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record, separators=(",", ":")).encode() + b"\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()

    def discard(self) -> None:
        """Remove it (still holding the lock, so no other run picks it up half-removed)."""
        self.path.unlink(missing_ok=True)
        self.close()


# -- scoring -------------------------------------------------------------------------------


def _read_header(in_path: Path) -> list[str]:
    with in_path.open(newline="") as src:
        header = next(csv.reader(src), None)
    if header is None:
        raise InvalidInput(f"{in_path} is empty: expected a header line")
    return header


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
    log: Callable[[str], None] | None = None,
) -> ScoreSummary:
    """Score `in_path` into `out_path`, resuming an earlier run's journal if there is one
    (`restart` discards it instead). A journal of another job is refused (JournalError)."""
    chunk_rows = chunk_rows or client.settings.chunk_rows
    max_in_flight = max_in_flight or client.settings.max_in_flight
    info = client.model_info()
    if info is not None:
        chunk_rows = min(chunk_rows, info.max_batch_rows)
    summary = ScoreSummary()
    started = time.perf_counter()
    header = _read_header(in_path)
    columns = choose_columns(
        header,
        info.n_features if info else None,
        features or (info.feature_names if info else None),
    )
    job = job_header(in_path, columns, chunk_rows, queue, header)
    journal, state = Journal.open(journal_path(out_path), job, restart)
    try:
        if log and (state.done or state.sent):
            log(
                f"resuming from {journal.path}: {len(state.done)} chunk(s) already done, "
                f"{len(state.sent)} sent and not collected"
            )
        total = _count_rows(in_path) if progress else None
        with tqdm(total=total, unit="row", disable=not progress, desc=in_path.name) as bar:
            _score(
                client, in_path, columns, chunk_rows, max_in_flight, queue, timeout_s,
                journal, state, summary, bar,
            )  # fmt: skip
        with tqdm(total=total, unit="row", disable=not progress, desc=out_path.name) as bar:
            _write(in_path, out_path, header, chunk_rows, state, summary, journal.path, bar)
        # Only now: a crash before this line finds every chunk done and just writes again.
        journal.discard()
    finally:
        journal.close()
    summary.seconds = time.perf_counter() - started
    return summary


@dataclass
class _InFlight:
    index: int
    digest: str
    first_line: int
    rows: int


def _changed(path: Path, lines: list[int] | None = None) -> JournalError:
    # A chunk's digest says that one of its rows differs, not which.
    where = f" (somewhere in lines {lines[0]}-{lines[-1]})" if lines else ""
    return JournalError(
        f"the input changed{where} since {path} recorded it; "
        "pass --restart to discard the journal and score from the start"
    )


def _score(
    client: Client,
    in_path: Path,
    columns: list[int],
    chunk_rows: int,
    max_in_flight: int,
    queue: str,
    timeout_s: float | None,
    journal: Journal,
    state: JournalState,
    summary: ScoreSummary,
    bar: tqdm,
) -> None:
    """First pass: every chunk not done is collected from an earlier run's results or sent;
    keeps only predictions."""
    in_flight: dict[str, _InFlight] = {}
    with in_path.open(newline="") as src:
        reader = csv.reader(src)
        next(reader, None)
        for chunk in _read_chunks(reader, chunk_rows):
            summary.chunks += 1
            summary.rows += len(chunk.raw)
            digest = _digest(chunk.raw)
            done = state.done.get(chunk.index)
            sent = state.sent.pop(chunk.index, None)
            recorded = done or sent
            if recorded is not None and recorded.digest != digest:
                raise _changed(journal.path, chunk.lines)
            if done is not None:
                summary.resumed += 1
                summary.models.add(done.model)
                bar.update(len(chunk.raw))
                continue
            pending = _InFlight(chunk.index, digest, chunk.first_line, len(chunk.raw))
            if sent is not None and _recollect(client, sent, pending, journal, state, summary):
                summary.recollected += 1
                bar.update(len(chunk.raw))
                continue
            try:
                rows = _parse(chunk, columns)
                parse_request(BatchRequest, (), {"rows": rows})
                client.validate_rows(rows)
            except InvalidInput:
                # Fixing the file makes it another job: this journal could never be resumed.
                journal.discard()
                raise
            task_id = client.send(TASK_PREDICT_BATCH, {"rows": rows}, queue)
            journal.append({"sent": chunk.index, "digest": digest, "task_id": task_id})
            in_flight[task_id] = pending
            summary.sent += 1
            while len(in_flight) >= max_in_flight:
                _collect(client, in_flight, timeout_s, journal, state, summary, bar)
    while in_flight:
        _collect(client, in_flight, timeout_s, journal, state, summary, bar)


def _recollect(
    client: Client,
    sent: _Sent,
    chunk: _InFlight,
    journal: Journal,
    state: JournalState,
    summary: ScoreSummary,
) -> bool:
    """Whether an earlier run's result for this chunk was still there (and is now done).
    Anything else, failed, queued, running or expired, is sent again: waiting on a task
    whose message may be lost could wait forever, and running one twice is harmless."""
    for status in client.statuses(sent.task_ids):
        if status.state == "SUCCESS" and status.result is not None:
            _finish(chunk, status.result, journal, state, summary)
            return True
    return False


def _collect(
    client: Client,
    in_flight: dict[str, _InFlight],
    timeout_s: float | None,
    journal: Journal,
    state: JournalState,
    summary: ScoreSummary,
    bar: tqdm,
) -> None:
    for status in client.wait_any(list(in_flight), timeout_s):
        chunk = in_flight.pop(status.task_id)
        try:
            result = raise_for(status)
        except Exception as exc:
            raise type(exc)(f"chunk at line {chunk.first_line}: {exc}") from exc
        _finish(chunk, result, journal, state, summary)
        bar.update(chunk.rows)


def _finish(
    chunk: _InFlight,
    result: dict[str, Any],
    journal: Journal,
    state: JournalState,
    summary: ScoreSummary,
) -> None:
    predictions = np.asarray(result["predictions"], dtype=np.float64)
    if predictions.shape != (chunk.rows,):
        raise InvalidInput(f"chunk at line {chunk.first_line}: row count mismatch")
    model = f"{result.get('model_name')}/{result.get('model_version')}"
    journal.append(
        {
            "done": chunk.index,
            "digest": chunk.digest,
            "rows": chunk.rows,
            "model": model,
            "predictions": encode_predictions(predictions),
        }
    )
    state.done[chunk.index] = _Done(chunk.digest, predictions, model)
    summary.models.add(model)
    task_ms = result.get("latency", {}).get("task_ms")
    if task_ms is not None:
        summary.task_ms.append(float(task_ms))


def _write(
    in_path: Path,
    out_path: Path,
    header: list[str],
    chunk_rows: int,
    state: JournalState,
    summary: ScoreSummary,
    journal: Path,
    bar: tqdm,
) -> None:
    """Second pass: every row with its prediction, in input order, into place atomically."""
    # One name, not one per process: the journal's lock makes this run its only writer, and a
    # killed run's leftover is overwritten rather than piling up.
    tmp = out_path.with_name(f".{out_path.name}.part")
    try:
        with in_path.open(newline="") as src, tmp.open("w", newline="") as dst:
            reader = csv.reader(src)
            if next(reader, None) != header:
                raise _changed(journal, [1])
            writer = csv.writer(dst)
            writer.writerow([*header, PREDICTION_COLUMN])
            chunks = 0
            for chunk in _read_chunks(reader, chunk_rows):
                done = state.done.pop(chunk.index, None)
                if done is None or done.digest != _digest(chunk.raw):
                    raise _changed(journal, chunk.lines)
                writer.writerows(
                    [*raw, repr(p)]
                    for raw, p in zip(chunk.raw, done.predictions.tolist(), strict=True)
                )
                chunks += 1
                bar.update(len(chunk.raw))
            if chunks != summary.chunks:
                raise _changed(journal)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, out_path)
        _fsync_dir(out_path.parent)
    finally:
        tmp.unlink(missing_ok=True)
