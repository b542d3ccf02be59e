"""The shadow runner (worker.shadow) and its use by worker.serving and worker.service: the
challenger runs on its own thread, within its share of the time, dropping work rather than
delaying a job, and always the challenger of the arms that served the rows."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import fakeredis
import numpy as np
import pytest

from contract.metrics import SHADOW_SKIP_ERROR, SHADOW_SKIP_QUEUE_FULL, SHADOW_SKIP_SHARE
from contract.schemas import BatchResult, PredictResult, ServingDecision, WorkerState
from tests.support import TrainedModel, served_version
from worker import metrics, service
from worker.model import load_model
from worker.runtime import Runtime
from worker.serving import ARM_CHAMPION, ARM_PINNED, Arms, Serving
from worker.settings import WorkerSettings
from worker.shadow import ShadowRunner, ShadowWork
from worker.stats import Heartbeat, ProcessStats


class FakeChallenger:
    """Predicts each row's sum plus `offset`; a closed gate holds its run until opened."""

    def __init__(self, version: str, offset: float = 0.5, fails: bool = False) -> None:
        self.manifest = SimpleNamespace(version=version)
        self.offset = offset
        self.fails = fails
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.threads: list[str] = []
        self.seen: list[int] = []

    def predict(self, rows: np.ndarray) -> np.ndarray:
        self.threads.append(threading.current_thread().name)
        self.entered.set()
        assert self.gate.wait(10)
        if self.fails:
            raise RuntimeError("challenger broke")
        self.seen.append(len(rows))
        return np.asarray(rows, dtype=np.float64).sum(axis=1) + self.offset


class Spy:
    """What a runner reports, and what a metrics recorder is given."""

    def __init__(self) -> None:
        self.compared: list[tuple[ShadowWork, list[float]]] = []
        self.skipped: list[tuple[ShadowWork, str]] = []
        self.recorded: list[tuple[str, str, list[float]]] = []
        self.skips: list[tuple[str, str, str, int]] = []

    def on_compared(self, work: ShadowWork, diffs: np.ndarray) -> None:
        self.compared.append((work, diffs.tolist()))

    def on_skipped(self, work: ShadowWork, reason: str) -> None:
        self.skipped.append((work, reason))

    def shadowed(self, version: str, challenger: str, diffs: list[float]) -> None:
        self.recorded.append((version, challenger, list(diffs)))

    def shadow_skipped(self, version: str, challenger: str, reason: str, rows: int) -> None:
        self.skips.append((version, challenger, reason, rows))


def _work(challenger: Any, n: int = 2, served: float = 0.0) -> ShadowWork:
    rows = np.ones((n, 3), dtype=np.float32)
    return ShadowWork(rows, np.full(n, served), "champ", challenger)


@pytest.fixture
def spy() -> Spy:
    return Spy()


@pytest.fixture
def runner(spy: Spy) -> Iterator[ShadowRunner]:
    r = ShadowRunner(1.0, 100, spy.on_compared, spy.on_skipped)
    yield r
    r.stop()


def test_the_challenger_runs_on_its_own_thread_and_its_difference_is_reported(
    runner: ShadowRunner, spy: Spy
) -> None:
    challenger = FakeChallenger("x", offset=0.5)
    assert runner.submit(_work(challenger, n=3, served=1.0))
    assert runner.drain()
    # Rows of three ones: 3 + 0.5 against the champion's 1.0.
    assert [d for _, d in spy.compared] == [[2.5, 2.5, 2.5]]
    assert challenger.threads == ["inference-shadow"]
    assert not spy.skipped


def test_submit_never_waits_and_drops_what_the_queue_cannot_hold(spy: Spy) -> None:
    runner = ShadowRunner(1.0, 5, spy.on_compared, spy.on_skipped)
    challenger = FakeChallenger("x")
    challenger.gate.clear()
    first = _work(challenger, n=3)
    assert runner.submit(first)
    assert challenger.entered.wait(5)  # the thread holds `first`: the queue is empty
    t0 = time.perf_counter()
    queued = [runner.submit(w) for w in (_work(challenger, 3), _work(challenger, 3))]
    queued += [runner.submit(_work(challenger, 2)), runner.submit(_work(challenger, 1))]
    took = time.perf_counter() - t0
    assert queued == [True, False, True, False]
    assert took < 0.05, f"submit waited {took:.3f}s on a blocked shadow run"
    assert runner.pending_rows == 5
    assert [(len(w.rows), r) for w, r in spy.skipped] == [
        (3, SHADOW_SKIP_QUEUE_FULL),
        (1, SHADOW_SKIP_QUEUE_FULL),
    ]
    challenger.gate.set()
    assert runner.drain()
    assert challenger.seen == [3, 3, 2]
    assert runner.pending_rows == 0
    runner.stop()


def test_the_runs_keep_within_their_share_of_the_time(spy: Spy) -> None:
    now = [0.0]

    class Slow(FakeChallenger):
        def predict(self, rows: np.ndarray) -> np.ndarray:
            now[0] += 1.0  # each run takes a second of the fake clock
            return super().predict(rows)

    runner = ShadowRunner(0.2, 100, spy.on_compared, spy.on_skipped, clock=lambda: now[0])
    challenger = Slow("x")
    for _ in range(10):
        runner.submit(_work(challenger))
        assert runner.drain()
    # 2 s of credit at the start (20% of the 10 s window), 0.2 s more per second run.
    assert len(spy.compared) == 3
    assert {r for _, r in spy.skipped} == {SHADOW_SKIP_SHARE} and len(spy.skipped) == 7
    now[0] += 5.0  # idle time earns credit back
    assert runner.submit(_work(challenger)) and runner.drain()
    assert len(spy.compared) == 4
    runner.stop()


def test_a_zero_share_runs_nothing(spy: Spy) -> None:
    runner = ShadowRunner(0.0, 100, spy.on_compared, spy.on_skipped)
    challenger = FakeChallenger("x")
    assert not runner.submit(_work(challenger, n=4))
    assert [(len(w.rows), r) for w, r in spy.skipped] == [(4, SHADOW_SKIP_SHARE)]
    assert challenger.seen == [] and runner._thread is None


def test_a_failing_challenger_is_counted_and_the_thread_goes_on(
    runner: ShadowRunner, spy: Spy
) -> None:
    broken, fine = FakeChallenger("x", fails=True), FakeChallenger("y")
    runner.submit(_work(broken, n=2))
    runner.submit(_work(fine, n=1))
    assert runner.drain()
    assert [(w.challenger.manifest.version, r) for w, r in spy.skipped] == [
        ("x", SHADOW_SKIP_ERROR)
    ]
    assert [w.challenger.manifest.version for w, _ in spy.compared] == ["y"]


# -- in worker.serving and worker.service ---------------------------------------------------


@pytest.fixture
def settings(trained_model: TrainedModel) -> WorkerSettings:
    return WorkerSettings(model_dir=trained_model.model_dir, max_batch_rows=10, warmup_runs=0)


@pytest.fixture
def serving(settings: WorkerSettings) -> Iterator[Serving]:
    s = Serving(settings, load_model(settings))
    yield s
    s.close()


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Spy:
    spy = Spy()
    monkeypatch.setattr(metrics, "current", lambda: spy)
    return spy


def _shadowing(serving: Serving, trained_model: TrainedModel, challenger: Any, gen: int) -> None:
    """Arms with `challenger` in shadow beside the served champion (as apply() sets them)."""
    decision = ServingDecision(
        name=trained_model.manifest.name,
        generation=gen,
        champion=served_version(trained_model.version_dir),
        shadow=True,
        decided_at=0,
    )
    serving.arms = Arms(gen, serving.arms.champion, challenger, 0.0, True, decision)


def test_no_thread_unless_shadow_is_on(serving: Serving, trained_model: TrainedModel) -> None:
    before = threading.active_count()
    model, _, challenger = serving.pick(None, None, "job")
    assert challenger is None
    rows = trained_model.X_test[:3].astype(np.float32)
    serving.shadow(rows, model.predict(rows), model, challenger)
    assert serving._runner is None and threading.active_count() == before


def test_rows_are_compared_with_the_challenger_of_the_arms_that_served_them(
    serving: Serving, trained_model: TrainedModel, recorder: Spy
) -> None:
    x, y = FakeChallenger("x", offset=1.0), FakeChallenger("y", offset=2.0)
    _shadowing(serving, trained_model, x, 1)
    champion = serving.arms.champion
    version = champion.manifest.version
    rows = trained_model.X_test[:4].astype(np.float32)
    served = champion.predict(rows)
    model, arm, picked = serving.pick(None, "key", "job")
    assert (model, arm, picked) == (champion, ARM_CHAMPION, x)
    _shadowing(serving, trained_model, y, 2)  # a swap between the job and its shadow run
    serving.shadow(rows, served, model, picked)
    assert serving.drain_shadow()
    expected = np.abs(rows.astype(np.float64).sum(axis=1) + 1.0 - served)
    ((champ, challenger, diffs),) = recorder.recorded
    assert (champ, challenger) == (version, "x") and x.seen == [4] and y.seen == []
    np.testing.assert_allclose(diffs, expected, rtol=1e-6)
    # The health report speaks of the pair serving now: x's rows are not in it.
    assert serving.status().shadow_rows == 0 and serving.status().challenger_version == "y"

    model, arm, picked = serving.pick(None, "key", "job")
    assert picked is y
    serving.shadow(rows[:2], served[:2], model, picked)
    assert serving.drain_shadow()
    status = serving.status()
    assert status.shadow_rows == 2
    mean = float(np.abs(rows[:2].astype(np.float64).sum(axis=1) + 2.0 - served[:2]).mean())
    assert status.shadow_mean_abs_diff == pytest.approx(mean, rel=1e-5)
    # Pinned jobs, even to the champion, are not shadowed.
    assert serving.pick("champion", None, "job")[1:] == (ARM_PINNED, None)


@pytest.fixture
def rt(serving: Serving, settings: WorkerSettings) -> Runtime:
    stats = ProcessStats(
        WorkerState(
            hostname="h@t", pid=1, queues=["q"], pool="solo", model_name="m",
            model_version="v", provider="cpu", device="cpu", started_at=0, updated_at=0,
        )
    )  # fmt: skip
    heartbeat = Heartbeat(fakeredis.FakeRedis(), stats, 1.0)
    return Runtime(settings, serving.arms.champion, stats, heartbeat, serving=serving)


def test_celery_path_jobs_return_before_their_shadow_run(
    rt: Runtime, serving: Serving, trained_model: TrainedModel, recorder: Spy
) -> None:
    challenger = FakeChallenger("x")
    challenger.gate.clear()
    _shadowing(serving, trained_model, challenger, 1)
    version = serving.arms.champion.manifest.version
    rows = trained_model.X_test[:5]
    t0 = time.perf_counter()
    one = service.predict_one(rt, service.Job((), {"features": rows[0].tolist()}, None, "h"))
    assert challenger.entered.wait(5)  # its shadow run started, and is held
    batch = service.predict_batch(rt, service.Job((), {"rows": rows.tolist()}, None, "h"))
    assert time.perf_counter() - t0 < 5
    assert set(one) == set(PredictResult.model_fields)
    for result in (one, batch):
        assert (result["model_version"], result["arm"]) == (version, ARM_CHAMPION)
    assert set(batch) <= set(BatchResult.model_fields)
    challenger.gate.set()
    assert serving.drain_shadow()
    assert challenger.seen == [1, 5]
    assert serving.status().shadow_rows == 6
    assert [(c, len(d)) for _, c, d in recorder.recorded] == [("x", 1), ("x", 5)]
