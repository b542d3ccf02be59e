"""Resuming bulk scoring after the producer dies, against real Redis and a real worker:
finished chunks are not sent again, uncollected results are collected, and the output is
every row, in order, with the prediction an uninterrupted run gives."""

from __future__ import annotations

import csv
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import redis

from producer.bulk import PREDICTION_COLUMN, journal_path, read_journal, score_csv
from producer.client import Client, TaskStatus
from producer.settings import ProducerSettings
from tests.integration.test_bulk import many_rows, write_csv
from tests.support import RunningWorker, TrainedModel
from worker.health import live_states

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RESUMED = re.compile(
    r"resumed: (\d+) of (\d+) chunks already done, (\d+) collected from an earlier run's "
    r"results, (\d+) sent"
)


def score_command(src: Path, dst: Path, chunk_rows: int, in_flight: int) -> list[str]:
    return [
        sys.executable, "-m", "producer", "score", str(src), "-o", str(dst),
        "--chunk-rows", str(chunk_rows), "--in-flight", str(in_flight), "--no-progress",
    ]  # fmt: skip


def run_score(redis_url: str, command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, env={"REDIS_URL": redis_url, "PATH": ""}, cwd=ROOT, capture_output=True,
        text=True, timeout=60, check=False,
    )  # fmt: skip


def journal_chunks(dst: Path) -> tuple[set[int], set[int]]:
    """Chunks done, and chunks sent but not done, as the journal records them."""
    with journal_path(dst).open("rb") as fh:
        _, state, _ = read_journal(fh)
    return set(state.done), set(state.sent)


def assert_scored(dst: Path, rows: np.ndarray, trained: TrainedModel) -> None:
    with dst.open(newline="") as fh:
        out = list(csv.DictReader(fh))
    assert [r["id"] for r in out] == [f"row-{i}" for i in range(len(rows))]
    got = np.array([float(r[PREDICTION_COLUMN]) for r in out])
    np.testing.assert_allclose(got, trained.reference(rows), atol=1e-6)
    assert not journal_path(dst).exists()
    assert not list(dst.parent.glob(".*part"))


def test_a_killed_run_resumes_without_recomputing_finished_chunks(
    redis_url: str, cpu_worker: RunningWorker, trained_model: TrainedModel, tmp_path: Path
) -> None:
    rows = many_rows(trained_model, 6_000)
    src, dst = tmp_path / "in.csv", tmp_path / "out.csv"
    write_csv(src, rows, trained_model.manifest.feature_names)
    command = score_command(src, dst, chunk_rows=30, in_flight=2)  # 200 chunks

    proc = subprocess.Popen(
        command, env={"REDIS_URL": redis_url, "PATH": ""}, cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            if journal_path(dst).exists() and len(journal_chunks(dst)[0]) >= 5:
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the run ended before it could be killed: make it longer"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert not dst.exists()
    done, unfinished = journal_chunks(dst)  # a torn last line, if the kill made one, is skipped
    assert 5 <= len(done) < 200

    second = run_score(redis_url, command)
    assert second.returncode == 0, second.stderr
    match = RESUMED.search(second.stderr)
    assert match, second.stderr
    resumed, chunks, recollected, sent = map(int, match.groups())
    assert (resumed, chunks) == (len(done), 200)
    # Every chunk not done is collected or sent, once; none that was done is sent again.
    assert recollected + sent == 200 - len(done)
    assert recollected <= len(unfinished)
    assert "scored 6000 rows in 200 chunks" in second.stderr
    assert_scored(dst, rows, trained_model)
    # Byte for byte what a run never interrupted writes.
    clean = tmp_path / "clean.csv"
    third = run_score(redis_url, score_command(src, clean, chunk_rows=30, in_flight=2))
    assert third.returncode == 0, third.stderr
    assert clean.read_bytes() == dst.read_bytes()


class Died(BaseException):
    """The producer dying: nothing after it runs, not even its own error handling."""


class DiesWithResultsUncollected(Client):
    """Collects twice, then dies once every job it has in flight has finished: the worker
    wrote those results; the producer never read them."""

    waits = 0

    def wait_any(self, task_ids: Sequence[str], timeout: float | None = None) -> list[TaskStatus]:
        self.waits += 1
        if self.waits <= 2:
            return super().wait_any(task_ids, timeout)
        pending = list(task_ids)
        while pending:
            finished = {s.task_id for s in super().wait_any(pending, timeout)}
            pending = [t for t in pending if t not in finished]
        raise Died


def jobs_run(client: redis.Redis, hostname: str) -> int:
    return sum(state.jobs_done for state in live_states(client, hostname=hostname))


def settled_jobs_run(client: redis.Redis, hostname: str, heartbeat_s: float = 0.5) -> int:
    """The worker's job count once its heartbeats have caught up and stopped moving."""
    previous = -1
    while (count := jobs_run(client, hostname)) != previous:
        previous = count
        time.sleep(heartbeat_s * 1.5)
    return count


def test_results_left_uncollected_are_collected_not_sent_again(
    redis_url: str,
    redis_client: redis.Redis,
    producer_settings: ProducerSettings,
    cpu_worker: RunningWorker,
    trained_model: TrainedModel,
    tmp_path: Path,
) -> None:
    rows = many_rows(trained_model, 2_000)
    src, dst = tmp_path / "in.csv", tmp_path / "out.csv"
    write_csv(src, rows, trained_model.manifest.feature_names)
    with DiesWithResultsUncollected(producer_settings) as dying, pytest.raises(Died):
        score_csv(dying, src, dst, chunk_rows=100, max_in_flight=4, progress=False)
    assert not dst.exists()
    done, uncollected = journal_chunks(dst)
    assert done and len(uncollected) == 4

    before = settled_jobs_run(redis_client, cpu_worker.hostname)
    second = run_score(redis_url, score_command(src, dst, chunk_rows=100, in_flight=4))
    assert second.returncode == 0, second.stderr
    match = RESUMED.search(second.stderr)
    assert match, second.stderr
    resumed, chunks, recollected, sent = map(int, match.groups())
    assert (resumed, chunks, recollected) == (len(done), 20, 4)
    assert sent == 20 - len(done) - 4
    # What the worker itself counts: only the chunks that were neither done nor collected ran.
    assert settled_jobs_run(redis_client, cpu_worker.hostname) - before == sent
    assert_scored(dst, rows, trained_model)
