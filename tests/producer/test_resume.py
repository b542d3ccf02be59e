"""Resumable bulk scoring, against a stand-in client: the journal, what a rerun sends, and
what it refuses. The real queue is exercised in tests/integration/test_bulk_resume.py."""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import struct
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from contract.errors import InvalidInput, TaskFailed
from contract.schemas import decode_f32, encode_f32
from producer import bulk, journal
from producer.bulk import score_csv
from producer.cli import build_parser, cmd_score
from producer.client import TaskError, TaskStatus
from producer.journal import (
    JOURNAL_VERSION,
    Journal,
    JournalError,
    decode_predictions,
    encode_predictions,
    journal_path,
    read_journal,
)

ROWS = 50
CHUNK = 10  # five chunks


class Crash(BaseException):
    """The producer dying (SIGKILL, power loss): nothing after it runs."""


class FakeClient:
    """Stands in for Client. Its "worker" predicts a float32 with all 9 significant digits
    in use from each row, and keeps results, like the backend, across runs."""

    def __init__(self, backend: dict[str, TaskStatus] | None = None) -> None:
        self.settings = SimpleNamespace(chunk_rows=CHUNK, max_in_flight=3)
        self.backend = {} if backend is None else backend
        self.queued: dict[str, list[list[float]]] = {}
        self.sent: list[float] = []
        """First feature of each chunk sent, to tell the chunks apart."""
        self.waits = 0
        self.crash_at_wait: int | None = None
        self.run_before_crash = True
        self.fail_first: float | None = None

    def model_info(self, queue: str = "cpu") -> None:
        return None

    def validate_rows(self, rows: list[list[float]]) -> None:
        pass

    def send(
        self, task: str, kwargs: dict[str, Any], queue: str = "cpu", task_id: str | None = None
    ) -> str:
        task_id = task_id or str(uuid.uuid4())
        rows = decode_f32(kwargs["rows_f32"], kwargs["n_features"]).tolist()
        self.queued[task_id] = rows
        self.sent.append(rows[0][0])
        return task_id

    def _run(self) -> None:
        for task_id, rows in self.queued.items():
            if rows[0][0] == self.fail_first:
                self.fail_first = None
                error = TaskError(type="TaskFailed", message="worker broke", retryable=False)
                self.backend[task_id] = TaskStatus(task_id=task_id, state="FAILURE", error=error)
                continue
            result = {
                "predictions_f32": encode_f32([predict(r) for r in rows]),
                "model_name": "m",
                "model_version": "1",
                "latency": {"task_ms": 1.0},
            }
            self.backend[task_id] = TaskStatus(task_id=task_id, state="SUCCESS", result=result)
        self.queued.clear()

    def statuses(self, task_ids: list[str]) -> list[TaskStatus]:
        pending = TaskStatus(task_id="", state="PENDING")
        return [self.backend.get(t, pending.model_copy(update={"task_id": t})) for t in task_ids]

    def wait_any(self, task_ids: list[str], timeout: float | None = None) -> list[TaskStatus]:
        self.waits += 1
        if self.waits == self.crash_at_wait:
            if self.run_before_crash:
                self._run()
            raise Crash
        self._run()
        return [s for s in self.statuses(task_ids) if s.ready]


def predict(row: list[float]) -> float:
    return math.fsum(row) / 7 + 1e-3  # rarely a short decimal


def write_input(path: Path, n: int = ROWS) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "a", "b"])
        for i in range(n):
            writer.writerow([f"r{i}", i * 10, i / 3])


def score(client: FakeClient, src: Path, dst: Path, **kw: Any) -> bulk.ScoreSummary:
    kw.setdefault("features", ["a", "b"])
    return score_csv(client, src, dst, progress=False, **kw)


def journal_state(dst: Path) -> tuple[set[int], set[int]]:
    """Chunks done, and chunks sent and not done, as the journal says."""
    with journal_path(dst).open("rb") as fh:
        _, state, _ = read_journal(fh)
    return set(state.done), set(state.sent)


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    src = tmp_path / "in.csv"
    write_input(src)
    return src, tmp_path / "out.csv"


@pytest.fixture
def clean_output(tmp_path: Path) -> bytes:
    """The output of a run that was never interrupted."""
    src, dst = tmp_path / "clean-in.csv", tmp_path / "clean.csv"
    write_input(src)
    score(FakeClient(), src, dst)
    return dst.read_bytes()


def crash(src: Path, dst: Path, at_wait: int, run_before_crash: bool = True) -> FakeClient:
    client = FakeClient()
    client.crash_at_wait, client.run_before_crash = at_wait, run_before_crash
    with pytest.raises(Crash):
        score(client, src, dst)
    assert not dst.exists()
    return client


# -- predictions round-trip ----------------------------------------------------------------


@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32)))
def test_predictions_round_trip_bit_for_bit(values: list[float]) -> None:
    array = np.array(values, dtype=np.float32)
    back = decode_predictions(json.loads(json.dumps(encode_predictions(array))))
    assert back.view(np.uint32).tolist() == array.view(np.uint32).tolist()


def test_awkward_floats_round_trip() -> None:
    tricky = [0.1, 1 / 3, -0.0, 1e-45, 1.1754944e-38, 3.4028235e38]
    tricky.append(struct.unpack("<f", struct.pack("<I", 0x3F800001))[0])
    array = np.array(tricky, dtype=np.float32)
    assert decode_predictions(encode_predictions(array)).tolist() == array.tolist()
    assert math.copysign(1, decode_predictions(encode_predictions(np.array([-0.0])))[0]) == -1


# -- reading the journal -------------------------------------------------------------------


HEAD = b'{"journal":%d}\n' % JOURNAL_VERSION


def test_a_torn_last_line_is_ignored() -> None:
    head = HEAD + b'{"sent":0,"digest":"d","task_id":"t"}\n'
    header, state, intact = read_journal(io.BytesIO(head + b'{"done":0,"digest":"d","predi'))
    assert header == {"journal": JOURNAL_VERSION}
    assert (state.done, state.sent[0].task_ids, intact) == ({}, ["t"], len(head))
    # A whole record whose newline never made it is torn too: its chunk is simply redone.
    torn = head + b'{"done":0,"digest":"d","rows":0,"model":"m","predictions":""}'
    _, state, intact = read_journal(io.BytesIO(torn))
    assert (state.done, intact) == ({}, len(head))
    assert read_journal(io.BytesIO(b'{"jour'))[::2] == (None, 0)


def test_damage_before_the_last_line_is_refused() -> None:
    with pytest.raises(JournalError, match=r"line 2 .*--restart"):
        read_journal(io.BytesIO(HEAD + b'{"sent":0,\n{"sent":1}\n'))
    with pytest.raises(JournalError, match=r"line 2 .*damaged"):
        read_journal(io.BytesIO(HEAD + b'{"done":0,"digest":"d","rows":2}\n'))
    with pytest.raises(JournalError, match=r"line 2 .*damaged"):  # not whole float32s
        read_journal(io.BytesIO(HEAD + b'{"done":0,"digest":"d","rows":1,"predictions":"AAA="}\n'))


def test_a_journal_of_another_version_is_refused(files: tuple[Path, Path]) -> None:
    src, dst = files
    crash(src, dst, at_wait=2)
    path = journal_path(dst)
    lines = path.read_bytes().splitlines(keepends=True)
    old = json.loads(lines[0])
    old["journal"] = 1
    path.write_bytes(json.dumps(old).encode() + b"\n" + b"".join(lines[1:]))
    with pytest.raises(JournalError, match=r"format 1, written by another version.*--restart"):
        score(FakeClient(), src, dst)
    assert not dst.exists() and path.exists()
    summary = score(FakeClient(), src, dst, restart=True)
    assert (summary.resumed, summary.sent) == (0, 5)


def test_a_rerun_after_a_torn_write_resumes_and_truncates_it(
    files: tuple[Path, Path], clean_output: bytes
) -> None:
    src, dst = files
    crash(src, dst, at_wait=2)
    done_before = len(journal_state(dst)[0])
    with journal_path(dst).open("ab") as fh:
        fh.write(b'{"done":4,"digest":"x","rows":10,"mod')
    client = FakeClient()
    summary = score(client, src, dst)
    assert summary.resumed == done_before > 0
    assert dst.read_bytes() == clean_output
    assert not journal_path(dst).exists()

    # Appending after the torn bytes would glue them onto the next record, damaging it.
    dst.unlink()
    crash(src, dst, at_wait=2)
    with journal_path(dst).open("ab") as fh:
        fh.write(b'{"sent":4,"dig')
    done, sent = journal_state(dst)
    crash(src, dst, at_wait=1)  # sends (appends) the chunks in flight again, then dies
    with journal_path(dst).open("rb") as fh:
        header, state, intact = read_journal(fh)
    assert header is not None and intact == journal_path(dst).stat().st_size
    assert set(state.done) == done and set(state.sent) == sent
    assert all(len(state.sent[i].task_ids) == 2 for i in sent)


# -- what a rerun does ---------------------------------------------------------------------


def test_a_rerun_sends_only_what_was_not_done(
    files: tuple[Path, Path], clean_output: bytes
) -> None:
    src, dst = files
    first = crash(src, dst, at_wait=2, run_before_crash=False)
    done, sent = journal_state(dst)
    assert done and sent  # the crash left both kinds, or this test proves little
    assert len(first.sent) == len(done) + len(sent)

    client = FakeClient(first.backend)  # results of the lost run's in-flight jobs: none
    summary = score(client, src, dst)
    assert (summary.resumed, summary.recollected, summary.sent) == (len(done), 0, 5 - len(done))
    assert sorted(client.sent) == [i * CHUNK * 10 for i in range(5) if i not in done]
    assert dst.read_bytes() == clean_output
    assert not journal_path(dst).exists()


def test_results_of_jobs_in_flight_are_collected_not_sent_again(
    files: tuple[Path, Path], clean_output: bytes
) -> None:
    src, dst = files
    first = crash(src, dst, at_wait=2)  # the worker finished them; the producer never read them
    done, in_flight = journal_state(dst)
    assert in_flight

    client = FakeClient(first.backend)
    summary = score(client, src, dst)
    assert summary.resumed == len(done)
    assert summary.recollected == len(in_flight)
    assert summary.sent == 5 - len(done) - len(in_flight) == len(client.sent)
    assert not {s // (CHUNK * 10) for s in client.sent} & (done | in_flight)
    assert dst.read_bytes() == clean_output


def test_a_failed_chunk_stops_the_run_and_keeps_the_journal(
    files: tuple[Path, Path], clean_output: bytes
) -> None:
    src, dst = files
    broken = FakeClient()
    broken.fail_first = 2 * CHUNK * 10.0  # chunk 2
    with pytest.raises(TaskFailed, match=r"chunk at line 22: .*worker broke"):
        score(broken, src, dst)
    assert not dst.exists() and journal_path(dst).exists()
    done, _ = journal_state(dst)
    assert 2 not in done and done

    fixed = FakeClient(broken.backend)
    summary = score(fixed, src, dst)
    assert 2 * CHUNK * 10 in fixed.sent  # the failure is not "collected": it is sent again
    assert summary.resumed == len(done) and summary.sent == 5 - len(done)
    assert dst.read_bytes() == clean_output


def test_another_job_is_refused_without_restart(files: tuple[Path, Path]) -> None:
    src, dst = files
    crash(src, dst, at_wait=2)
    kept = journal_path(dst).read_bytes()

    with pytest.raises(JournalError, match=r"chunk_rows: 10 then, 5 now.*--restart"):
        score(FakeClient(), src, dst, chunk_rows=5)
    with pytest.raises(JournalError, match="columns"):
        score(FakeClient(), src, dst, features=["b"])
    write_input(src, ROWS + 1)
    with pytest.raises(JournalError, match="size"):
        score(FakeClient(), src, dst)
    assert journal_path(dst).read_bytes() == kept
    assert not dst.exists()

    client = FakeClient()
    summary = score(client, src, dst, restart=True)
    assert (summary.resumed, summary.sent, summary.rows) == (0, 6, ROWS + 1)
    assert not journal_path(dst).exists()


def test_an_edit_the_fingerprint_misses_is_caught_by_the_chunk_digests(
    files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal, "SAMPLE_BYTES", 16)  # head and tail only: line 3 is unsampled
    src, dst = files
    crash(src, dst, at_wait=2)
    data = src.read_bytes()
    src.write_bytes(data.replace(b"r1,10,", b"r1,11,", 1))
    assert src.stat().st_size == len(data)
    with pytest.raises(JournalError, match=r"input changed \(somewhere in lines 2-11\)"):
        score(FakeClient(), src, dst)
    assert not dst.exists()


def test_a_bad_row_leaves_neither_output_nor_journal(files: tuple[Path, Path]) -> None:
    src, dst = files
    lines = src.read_text().splitlines()
    lines[30] = "r29,nan,1"  # file line 31, chunk 2
    src.write_text("\n".join(lines) + "\n")
    with pytest.raises(InvalidInput, match="line 31: NaN"):
        score(FakeClient(), src, dst)
    assert not dst.exists()
    assert not journal_path(dst).exists()  # fixing the file makes it another job anyway
    assert not list(dst.parent.glob(".*part"))


def test_one_run_at_a_time(files: tuple[Path, Path]) -> None:
    src, dst = files
    job = {"journal": 1}
    holder, _ = Journal.open(journal_path(dst), job)
    try:
        with pytest.raises(JournalError, match="in use"):
            score(FakeClient(), src, dst)
    finally:
        holder.close()
    assert json.loads(journal_path(dst).read_bytes()) == job


def test_the_cli_says_it_resumed(
    files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    src, dst = files
    first = crash(src, dst, at_wait=2, run_before_crash=False)
    done = len(journal_state(dst)[0])
    argv = ["score", str(src), "-o", str(dst), "--features", "a,b", "--no-progress"]
    args = build_parser().parse_args(argv)
    assert args.restart is False
    assert cmd_score(FakeClient(first.backend), args) == 0
    err = capsys.readouterr().err
    assert f"resuming from {journal_path(dst)}: {done} chunk(s) already done" in err
    assert f"resumed: {done} of 5 chunks already done, 0 collected" in err
    assert "scored 50 rows in 5 chunks" in err
    assert build_parser().parse_args(["score", "i", "-o", "o", "--restart"]).restart


def test_the_cli_keeps_the_journal_when_interrupted(
    files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    src, dst = files
    client = FakeClient()

    def interrupt(task_ids: list[str], timeout: float | None = None) -> list[TaskStatus]:
        raise KeyboardInterrupt

    client.wait_any = interrupt
    args = argparse.Namespace(
        input=str(src), output=str(dst), queue="cpu", chunk_rows=None, in_flight=None,
        features="a,b", no_progress=True, timeout=None, restart=False, explain=False,
        format=None,
    )  # fmt: skip
    assert cmd_score(client, args) == 130
    assert "the same command resumes" in capsys.readouterr().err
    assert journal_path(dst).exists() and not dst.exists()
    assert not list(dst.parent.glob(".*part"))


# -- files the fast path cannot take, and the output's form --------------------------------


def write_messy_input(path: Path) -> bytes:
    """CRLF line ends, a quoted field with a line break, quotes, blank lines, and no line end
    after the last row: the exact path for some chunks, the fast one for others."""
    lines = [b"id,a,b"]
    for i in range(ROWS):
        label = b'"r\n%d"' % i if i == 13 else b'"r,%d"' % i if i in (31, 32) else b"r%d" % i
        lines.append(b"%s,%d,%r" % (label, i * 10, i / 3))
        if i in (4, 27):
            lines.append(b"")
    data = b"\r\n".join(lines)
    path.write_bytes(data)
    return data


def test_a_messy_file_is_written_back_byte_for_byte_with_its_predictions(
    tmp_path: Path,
) -> None:
    src, dst = tmp_path / "in.csv", tmp_path / "out.csv"
    data = write_messy_input(src)
    summary = score(FakeClient(), src, dst)
    assert summary.rows == ROWS
    out = dst.read_bytes()
    assert out.endswith(b"\n") and not data.endswith(b"\n")
    got = out[:-1].split(b"\r\n")
    want = data.split(b"\r\n")
    assert got[0] == want[0] + b",prediction"
    predicted = [line for line in got[1:] if line]
    assert [p.rpartition(b",")[0] for p in predicted] == [w for w in want[1:] if w]
    expected = [np.float32(predict([i * 10, np.float32(i / 3)])) for i in range(ROWS)]
    assert [np.float32(p.rpartition(b",")[2].decode()) for p in predicted] == expected
    assert got.count(b"") == want.count(b"") == 2  # blank lines stay


def test_a_messy_file_resumes_to_the_same_bytes(tmp_path: Path) -> None:
    clean_src, clean = tmp_path / "clean-in.csv", tmp_path / "clean.csv"
    write_messy_input(clean_src)
    score(FakeClient(), clean_src, clean)
    src, dst = tmp_path / "in.csv", tmp_path / "out.csv"
    write_messy_input(src)
    first = crash(src, dst, at_wait=2)
    done, sent = journal_state(dst)
    assert done and sent
    summary = score(FakeClient(first.backend), src, dst)
    assert summary.resumed == len(done) and summary.recollected == len(sent)
    assert dst.read_bytes() == clean.read_bytes()


def test_a_file_with_a_header_only(tmp_path: Path) -> None:
    src, dst = tmp_path / "in.csv", tmp_path / "out.csv"
    src.write_bytes(b"id,a,b\n")
    summary = score(FakeClient(), src, dst)
    assert (summary.rows, summary.chunks) == (0, 0)
    assert dst.read_bytes() == b"id,a,b,prediction\n"


def test_progress_is_shown_in_bytes(
    files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    src, dst = files
    score_csv(FakeClient(), src, dst, features=["a", "b"], progress=True)
    err = capsys.readouterr().err
    assert "in.csv: 100%" in err and "B/s" in err


def test_results_in_json_numbers_are_taken_too(files: tuple[Path, Path]) -> None:
    """A worker from before rows_f32 answers `predictions`; float32 values all the same."""
    src, dst = files
    client = FakeClient()
    run = client._run

    def as_json_numbers() -> None:
        run()
        for status in client.backend.values():
            result = status.result
            if result is not None and "predictions_f32" in result:
                values = decode_f32(result.pop("predictions_f32"))
                result["predictions"] = values.astype(np.float64).tolist()

    client._run = as_json_numbers  # type: ignore[method-assign]
    score(client, src, dst)
    reference = dst.with_name("reference.csv")
    score(FakeClient(), src, reference)
    assert dst.read_bytes() == reference.read_bytes()
