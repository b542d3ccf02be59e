"""Serving decisions applied by a real prefork worker under load: hot swap, a broken
candidate, canary, pins and shadow."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from contract.names import TASK_EXPLAIN, TASK_PREDICT, TASK_PREDICT_BATCH
from contract.schemas import ServedVersion, ServingDecision, ServingStatus
from producer.client import Client
from producer.health import format_health
from producer.settings import ProducerSettings
from stack.processes import celery_env, worker_process
from tests.support import RunningWorker, served_version, serving
from training.promote import publish_decision, read_decision
from training.train import TrainConfig, TrainOutcome, run_training
from worker.health import build_report, live_states
from worker.serving import in_canary

pytestmark = pytest.mark.integration

NAME = f"swap-{uuid.uuid4().hex[:6]}"
QUEUE = f"swap-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> list[TrainOutcome]:
    model_dir = tmp_path_factory.mktemp("swap-models")
    config = TrainConfig(model_dir=model_dir, name=NAME, n_samples=1500, n_estimators=10, n_jobs=1)
    return [run_training(config), run_training(config.model_copy(update={"seed": 1}))]


@pytest.fixture(scope="module")
def served(versions: list[TrainOutcome]) -> list[ServedVersion]:
    return [served_version(v.version_dir, str(i + 1)) for i, v in enumerate(versions)]


@pytest.fixture(scope="module")
def worker(
    redis_url: str,
    versions: list[TrainOutcome],
    served: list[ServedVersion],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningWorker]:
    """Starts from a decision that names the first version (the directory's CURRENT is the
    second): the decision wins."""
    client = redis.Redis.from_url(redis_url)
    publish_decision(client, _decision(0, served[0]))
    hostname = f"swap-{uuid.uuid4().hex[:8]}@tests"
    logs = tmp_path_factory.mktemp("swap-logs")
    env = celery_env(
        redis_url,
        model_dir=versions[0].version_dir.parent.parent,
        model_name=NAME,
        model_cache_dir=logs / "cache",
        heartbeat_s=0.5,
        serving_poll_s=1.0,
        warmup_runs=2,
    )
    proc = worker_process(env, logs / "worker.log", queue=QUEUE, name=hostname, concurrency=2)
    with serving(proc, redis_url, hostname, QUEUE, processes=2) as running:
        yield running
    client.close()


@pytest.fixture
def client(redis_url: str, worker: RunningWorker) -> Iterator[Client]:
    with Client(ProducerSettings(redis_url=redis_url, wait_timeout_s=60)) as c:
        yield c


def _decision(generation: int, champion: ServedVersion, **kw: Any) -> ServingDecision:
    return ServingDecision(
        name=NAME, generation=generation, champion=champion, decided_at=time.time(), **kw
    )


def _next(redis_url: str, **update: Any) -> ServingDecision:
    client = redis.Redis.from_url(redis_url)
    current = read_decision(client, NAME)
    assert current is not None
    decision = current.model_copy(
        update={"generation": current.generation + 1, "decided_at": time.time(), **update}
    )
    publish_decision(client, decision)
    client.close()
    return decision


def _results(client: Client, ids: list[str], timeout_s: float = 120) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while True:
        statuses = client.statuses(ids)
        if all(s.state in ("SUCCESS", "FAILURE") for s in statuses):
            failed = [s for s in statuses if s.state != "SUCCESS"]
            assert not failed, f"{len(failed)} failed, first: {failed[0]}"
            return [s.result for s in statuses]  # type: ignore[misc]
        assert time.monotonic() < deadline, "jobs not finished"
        time.sleep(0.2)


def _statuses(redis_url: str, hostname: str) -> list[ServingStatus]:
    client = redis.Redis.from_url(redis_url)
    states = live_states(client, hostname=hostname)
    client.close()
    return [s.serving for s in states if s.serving is not None]


def _wait_generation(redis_url: str, hostname: str, generation: int, error: bool = False) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        statuses = _statuses(redis_url, hostname)
        if len(statuses) == 2 and all(
            (s.error is not None) if error else (s.generation == generation) for s in statuses
        ):
            return
        time.sleep(0.1)
    raise AssertionError(f"generation {generation} not reported: {statuses}")


def test_started_from_the_decision(worker: RunningWorker, redis_url: str, served: list) -> None:
    _wait_generation(redis_url, worker.hostname, 0)
    client = redis.Redis.from_url(redis_url)
    versions = {s.model_version for s in live_states(client, hostname=worker.hostname)}
    client.close()
    assert versions == {served[0].version}


def test_promote_under_load_drops_nothing_and_switches_within_2s(
    client: Client, worker: RunningWorker, redis_url: str, served: list, versions: list
) -> None:
    rows = versions[0].X_test[:20].tolist()
    sent: list[tuple[float, list[str]]] = []
    stop = threading.Event()

    def load() -> None:
        tick = 0
        while not stop.is_set():
            kwargs = [{"features": r} for r in rows]
            ids = client.send_many(TASK_PREDICT, kwargs, QUEUE)
            if tick % 20 == 0:
                ids.append(client.send(TASK_PREDICT_BATCH, {"rows": rows * 50}, QUEUE))
            sent.append((time.time(), ids))
            tick += 1
            time.sleep(0.005)

    sender = threading.Thread(target=load)
    sender.start()
    time.sleep(1.5)
    promoted_at = time.time()
    _next(redis_url, champion=served[1], previous=served[0])
    time.sleep(4.0)
    stop.set()
    sender.join()
    ids = [i for _, batch in sent for i in batch]
    results = dict(zip(ids, _results(client, ids), strict=True))
    assert len(results) == len(ids) > 500
    by_version = {r["model_version"] for r in results.values()}
    assert by_version == {served[0].version, served[1].version}
    late = [i for at, batch in sent if at >= promoted_at + 2.0 for i in batch]
    assert late and all(results[i]["model_version"] == served[1].version for i in late)
    assert all(results[i]["arm"] == "champion" for i in ids)


def test_a_broken_candidate_is_not_served_and_nothing_fails(
    client: Client, worker: RunningWorker, redis_url: str, served: list, versions: list
) -> None:
    current = _next(redis_url)  # a clean generation to start from
    _wait_generation(redis_url, worker.hostname, current.generation)
    bad = served[0].model_copy(
        update={"sha256": {**served[0].sha256, "model.onnx": "f" * 64}, "version": "broken"}
    )
    _next(redis_url, champion=bad)
    _wait_generation(redis_url, worker.hostname, 0, error=True)
    ids = client.send_many(
        TASK_PREDICT, [{"features": r} for r in versions[0].X_test[:200].tolist()], QUEUE
    )
    results = _results(client, ids)
    assert {r["model_version"] for r in results} == {current.champion.version}
    assert all("sha256" in (s.error or "") for s in _statuses(redis_url, worker.hostname))
    probe = redis.Redis.from_url(redis_url)
    report = build_report(probe, probe, [QUEUE])
    probe.close()
    entry = next(w for w in report.workers if w.hostname == worker.hostname)
    assert entry.serving is not None and "sha256" in (entry.serving.error or "")
    assert "NOT APPLIED" in format_health(report)


def test_a_worker_started_under_a_refused_decision_serves_the_previous_champion(
    worker: RunningWorker,
    redis_url: str,
    served: list,
    versions: list,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A worker scaled up (or a pool process replaced) while the decision names a tampered
    champion starts on the previous champion, as the running processes keep serving it,
    instead of failing to start."""
    current = _next(
        redis_url, champion=served[0], challenger=None, canary_percent=0.0, shadow=False
    )
    _wait_generation(redis_url, worker.hostname, current.generation)
    bad = served[1].model_copy(
        update={"sha256": {**served[1].sha256, "model.onnx": "e" * 64}, "version": "tampered"}
    )
    refused = _next(redis_url, champion=bad, previous=current.champion, challenger=None)
    _wait_generation(redis_url, worker.hostname, 0, error=True)

    queue = f"late-{uuid.uuid4().hex[:6]}"
    hostname = f"late-{uuid.uuid4().hex[:8]}@tests"
    logs = tmp_path_factory.mktemp("late-logs")
    env = celery_env(
        redis_url, model_dir=versions[0].version_dir.parent.parent, model_name=NAME,
        model_cache_dir=logs / "cache", heartbeat_s=0.5, serving_poll_s=1.0, warmup_runs=2,
    )  # fmt: skip
    proc = worker_process(env, logs / "worker.log", queue=queue, name=hostname, concurrency=2)
    with serving(proc, redis_url, hostname, queue, processes=2):
        stock = Celery("stock", broker=redis_url, backend=redis_url)
        rows = versions[0].X_test[:20].tolist()
        sent = [stock.send_task(TASK_PREDICT, kwargs={"features": r}, queue=queue) for r in rows]
        results = [r.get(timeout=60) for r in sent]
        stock.close()
        statuses = _statuses(redis_url, hostname)
    assert {r["model_version"] for r in results} == {current.champion.version}
    assert len(statuses) == 2
    for status in statuses:
        assert f"generation {refused.generation} not served" in (status.error or "")
        assert "sha256" in (status.error or "")


def test_canary_pins_and_shadow(
    client: Client,
    celery_sender: Celery,
    worker: RunningWorker,
    redis_url: str,
    served: list,
    versions: list,
) -> None:
    decision = _next(
        redis_url, champion=served[1], challenger=served[0], canary_percent=10, shadow=True
    )
    _wait_generation(redis_url, worker.hostname, decision.generation)
    features = versions[0].X_test[0].tolist()
    keys = [f"user-{i}" for i in range(2000)]
    ids = client.send_many(
        TASK_PREDICT, [{"features": features, "routing_key": k} for k in keys], QUEUE
    )
    results = _results(client, ids)
    for key, result in zip(keys, results, strict=True):
        arm = "challenger" if in_canary(key, 10) else "champion"
        assert result["arm"] == arm
        assert result["model_version"] == (served[0] if arm == "challenger" else served[1]).version
    share = sum(r["arm"] == "challenger" for r in results) / len(results)
    assert 0.07 < share < 0.13

    pinned = client.wait(client.submit(features, QUEUE, model_version="1"))
    assert (pinned["model_version"], pinned["arm"]) == (served[0].version, "pinned")
    batch = client.wait(client.submit_batch([features] * 3, QUEUE, model_version="1"))
    assert (batch["model_version"], batch["arm"]) == (served[0].version, "pinned")
    # A message header pins as the kwarg does (a producer that cannot change the kwargs).
    by_header = client.wait(
        celery_sender.send_task(
            TASK_PREDICT,
            kwargs={"features": features},
            queue=f"{QUEUE}.rows",
            headers={"model_version": served[0].version},
        ).id
    )
    assert (by_header["model_version"], by_header["arm"]) == (served[0].version, "pinned")
    # Explain jobs are routed as batch jobs are, on both paths, and explained by that version.
    explained = client.wait(client.submit_explain([features], QUEUE, model_version="1"))
    assert (explained["model_version"], explained["arm"]) == (served[0].version, "pinned")
    key = next(k for k in keys if in_canary(k, 10))
    in_lane = client.wait(
        client.send(TASK_EXPLAIN, {"rows": [features], "routing_key": key}, f"{QUEUE}.rows")
    )
    assert (in_lane["model_version"], in_lane["arm"]) == (served[0].version, "challenger")
    assert in_lane["base_value"] == versions[0].manifest.base_value
    from producer.errors import UnknownModelVersion

    with pytest.raises(UnknownModelVersion):
        client.wait(client.send(TASK_PREDICT, {"features": features, "model_version": "9"}, QUEUE))

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        shadow_rows = sum(s.shadow_rows for s in _statuses(redis_url, worker.hostname))
        if shadow_rows:
            break
        time.sleep(0.2)
    statuses = _statuses(redis_url, worker.hostname)
    assert sum(s.shadow_rows for s in statuses) > 0
    assert any((s.shadow_mean_abs_diff or 0) > 0 for s in statuses)
