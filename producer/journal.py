"""The journal of a bulk scoring run: what makes it resumable.

A file beside the output (`.<output name>.journal`), JSON lines, each one fsynced: first
the job (input, its size and a sample digest, header, chunk size, columns, queue), then a
record for every chunk sent (with its task id) and every chunk done (with its predictions,
as float32 bytes: a resumed run writes exactly what an uninterrupted one would). Records
name each chunk's digest, the blake2b of its bytes, so a chunk is only ever matched with
the very rows it was computed from.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
from numpy.typing import NDArray

from contract.errors import InvalidInput, JournalError
from contract.schemas import decode_f32, encode_f32
from producer.client import resolve_queue

if sys.platform != "win32":
    import fcntl
else:  # pragma: no cover
    fcntl = None

JOURNAL_VERSION = 2
"""2: chunks are digested as bytes, predictions kept as float32 (1: csv fields, float64)."""

# The job's fingerprint hashes this much of the input's head and of its tail: cheap on any
# size, and catches another file or a rewritten one at once; the chunk digests catch the rest.
SAMPLE_BYTES = 1 << 20


def journal_path(out_path: Path) -> Path:
    return out_path.with_name(f".{out_path.name}.journal")


def encode_predictions(values: NDArray[np.float32]) -> str:
    # The bytes themselves, not decimal text: the output of a resumed run must be identical
    # to that of an uninterrupted one, down to the last bit of every prediction.
    return encode_f32(values)


def decode_predictions(text: str) -> NDArray[np.float32]:
    return decode_f32(text, name="predictions")


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
class Done:
    digest: str
    predictions: NDArray[np.float32]
    model: str


@dataclass
class Sent:
    digest: str
    task_ids: list[str]
    """Every id this chunk was sent under, by any run: any one result will do."""


@dataclass
class JournalState:
    done: dict[int, Done] = field(default_factory=dict)
    sent: dict[int, Sent] = field(default_factory=dict)
    """Sent and not done."""


def _damaged(number: int) -> JournalError:
    return JournalError(f"line {number} of the journal is damaged; pass --restart to discard it")


def _apply(state: JournalState, record: dict[str, Any], number: int) -> None:
    try:
        if "done" in record:
            index = int(record["done"])
            predictions = decode_predictions(record["predictions"])
            rows = int(record["rows"])
            # With --explain, each row has several values, flattened row by row.
            if len(predictions) % rows if rows else len(predictions):
                raise ValueError("row count")
            state.done[index] = Done(str(record["digest"]), predictions, str(record["model"]))
            state.sent.pop(index, None)
        elif "sent" in record:
            index = int(record["sent"])
            if index not in state.done:
                sent = state.sent.setdefault(index, Sent(str(record["digest"]), []))
                sent.digest = str(record["digest"])
                sent.task_ids.append(str(record["task_id"]))
        else:
            raise ValueError("unknown record")
    except (KeyError, TypeError, ValueError, InvalidInput):
        raise _damaged(number) from None


def _mismatch(old: dict[str, Any], new: dict[str, Any]) -> JournalError:
    keys = [k for k in new if old.get(k) != new[k]] + [k for k in old if k not in new]
    shown = "; ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in keys[:3])
    return JournalError(
        f"the journal was left by a run of another job ({shown}); its results cannot be "
        "mixed into this one: pass --restart to discard it and score from the start"
    )


def _check_version(header: dict[str, Any]) -> None:
    if header.get("journal") != JOURNAL_VERSION:
        raise JournalError(
            f"the journal is in format {header.get('journal')!r}, written by another version "
            f"of this program (this one reads format {JOURNAL_VERSION}); pass --restart to "
            "discard it and score from the start"
        )


def read_journal(
    fh: IO[bytes], job: dict[str, Any] | None = None
) -> tuple[dict[str, Any] | None, JournalState, int]:
    """The job header (None while there is none), what the records say, and the length of
    the intact part; with `job`, another job's journal is refused before its records are
    read, as is a journal in another format. A crash while appending leaves at most a torn
    last line, without its newline: it is ignored (its chunk is simply done again). Any
    other unreadable line is damage, not a crash, and is refused. Reads a line at a time:
    the predictions of a big file's journal are decoded as they come, never all held as
    text."""
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
            _check_version(header)
            if job is not None and header != job:
                raise _mismatch(header, job)
        else:
            _apply(state, record, number)
        intact += len(line)
    return header, state, intact


def fsync_dir(path: Path) -> None:
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
                fsync_dir(path.parent)
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
