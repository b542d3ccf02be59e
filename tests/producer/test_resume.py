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

from producer import bulk
from producer.bulk import (
    Journal,
    JournalError,
    decode_predictions,
    encode_predictions,
    journal_path,
    read_journal,
    score_csv,
)
from producer.cli import build_parser, cmd_score
from producer.client import TaskError, TaskStatus
from producer.errors import InvalidInput, TaskFailed

ROWS = 50
CHUNK = 10  # five chunks


class Crash(BaseException):
    """The producer dying (SIGKILL, power loss): nothing after it runs."""


class FakeClient:
    """Stands in for Client. Its "worker" predicts a float with all 17 significant digits
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

    def model_info(self) -> None:
        return None

    def validate_rows(self, rows: list[list[float]]) -> None:
        pass

    def send(self, task: str, kwargs: dict[str, Any], queue: str = "cpu") -> str:
        task_id = str(uuid.uuid4())
        self.queued[task_id] = kwargs["rows"]
        self.sent.append(kwargs["rows"][0][0])
        return task_id

    def _run(self) -> None:
        for task_id, rows in self.queued.items():
            if rows[0][0] == self.fail_first:
                self.fail_first = None
                error = TaskError(type="TaskFailed", message="worker broke", retryable=False)
                self.backend[task_id] = TaskStatus(task_id=task_id, state="FAILURE", error=error)
                continue
            result = {
                "predictions": [predict(r) for r in rows],
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
    return math.fsum(row) / 7 + 1e-300  # never a short decimal, sometimes subnormal-adjacent


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


@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64)))
def test_predictions_round_trip_bit_for_bit(values: list[float]) -> None:
    array = np.array(values, dtype=np.float64)
    back = decode_predictions(json.loads(json.dumps(encode_predictions(array))))
    assert back.view(np.uint64).tolist() == array.view(np.uint64).tolist()
    assert [repr(v) for v in back.tolist()] == [repr(v) for v in values]


def test_awkward_floats_round_trip() -> None:
    tricky = [0.1, 1 / 3, -0.0, 5e-324, 2.2250738585072014e-308, 1.7976931348623157e308]
    tricky.append(struct.unpack("<d", struct.pack("<Q", 0x3FF0000000000001))[0])
    assert decode_predictions(encode_predictions(np.array(tricky))).tolist() == tricky
    assert math.copysign(1, decode_predictions(encode_predictions(np.array([-0.0])))[0]) == -1


# -- reading the journal -------------------------------------------------------------------


def test_a_torn_last_line_is_ignored() -> None:
    head = b'{"journal":1}\n{"sent":0,"digest":"d","task_id":"t"}\n'
    header, state, intact = read_journal(io.BytesIO(head + b'{"done":0,"digest":"d","predi'))
    assert header == {"journal": 1}
    assert (state.done, state.sent[0].task_ids, intact) == ({}, ["t"], len(head))
    # A whole record whose newline never made it is torn too: its chunk is simply redone.
    torn = head + b'{"done":0,"digest":"d","rows":0,"model":"m","predictions":""}'
    _, state, intact = read_journal(io.BytesIO(torn))
    assert (state.done, intact) == ({}, len(head))
    assert read_journal(io.BytesIO(b'{"jour'))[::2] == (None, 0)


def test_damage_before_the_last_line_is_refused() -> None:
    with pytest.raises(JournalError, match=r"line 2 .*--restart"):
        read_journal(io.BytesIO(b'{"journal":1}\n{"sent":0,\n{"sent":1}\n'))
    with pytest.raises(JournalError, match=r"line 2 .*damaged"):
        read_journal(io.BytesIO(b'{"journal":1}\n{"done":0,"digest":"d","rows":2}\n'))


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
    monkeypatch.setattr(bulk, "SAMPLE_BYTES", 16)  # head and tail only: line 3 is unsampled
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
        features="a,b", no_progress=True, timeout=None, restart=False,
    )  # fmt: skip
    assert cmd_score(client, args) == 130
    assert "the same command resumes" in capsys.readouterr().err
    assert journal_path(dst).exists() and not dst.exists()
    assert not list(dst.parent.glob(".*part"))
