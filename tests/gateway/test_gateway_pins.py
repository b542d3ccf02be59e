"""Pins and canary through HTTP: a real `python -m gateway` in front of a real prefork worker
that serves a champion and a challenger (a serving decision, as `python -m training promote`
publishes it), on a Redis of their own (the shared worker would take their queues' jobs)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from celery import Celery

from contract.names import QUEUE_CPU, TASK_PREDICT, row_queue
from contract.schemas import ServingDecision, encode_f32
from gateway.routes import PIN_HEADER, ROUTING_KEY_HEADER
from stack.embedded_redis import EmbeddedRedis
from stack.processes import celery_env, worker_process
from tests.gateway.support import problem, run_gateway
from tests.support import TrainedModel, served_version, serving
from training.promote import publish_decision
from training.train import TrainConfig, run_training
from worker.health import live_states
from worker.serving import in_canary

pytestmark = pytest.mark.integration

NAME = f"pins-{uuid.uuid4().hex[:6]}"
CANARY_PERCENT = 50.0


@dataclass(frozen=True)
class Arms:
    """The gateway, and the two versions its worker serves."""

    url: str
    redis_url: str
    champion: TrainedModel  # registry number 2
    challenger: TrainedModel  # registry number 1


@pytest.fixture(scope="module")
def arms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Arms]:
    model_dir = tmp_path_factory.mktemp("pin-models")
    config = TrainConfig(model_dir=model_dir, name=NAME, n_samples=1500, n_estimators=10, n_jobs=1)
    trained = [run_training(config), run_training(config.model_copy(update={"seed": 1}))]
    models = [TrainedModel(model_dir, t.version_dir, t.manifest, t.X_test) for t in trained]
    served = [served_version(t.version_dir, str(i + 1)) for i, t in enumerate(trained)]
    logs = tmp_path_factory.mktemp("pin-logs")
    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url)
        decision = ServingDecision(
            name=NAME,
            generation=0,
            champion=served[1],
            challenger=served[0],
            canary_percent=CANARY_PERCENT,
            decided_at=time.time(),
        )
        publish_decision(client, decision)
        env = celery_env(
            server.url,
            model_dir=model_dir,
            model_name=NAME,
            model_cache_dir=logs / "cache",
            heartbeat_s=0.5,
            warmup_runs=2,
        )
        hostname = f"pins-{uuid.uuid4().hex[:8]}@tests"
        proc = worker_process(env, logs / "worker.log", queue=QUEUE_CPU, name=hostname)
        with (
            serving(proc, server.url, hostname, QUEUE_CPU),
            run_gateway(server.url, logs / "gateway.log") as gateway,
        ):
            _wait_for_both_arms(client, hostname, served[0].version)
            yield Arms(gateway.url, server.url, champion=models[1], challenger=models[0])
        client.close()


def _wait_for_both_arms(client: redis.Redis, hostname: str, challenger: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        statuses = [s.serving for s in live_states(client, hostname=hostname) if s.serving]
        if statuses and all(s.challenger_version == challenger for s in statuses):
            return
        time.sleep(0.1)
    raise AssertionError(f"the worker did not take up the challenger: {statuses}")


@pytest.fixture
def http(arms: Arms) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=arms.url, timeout=60) as client:
        yield client


def _finished(http: httpx.Client, task_id: str) -> dict[str, Any]:
    response = http.get(f"/api/v1/jobs/{task_id}", params={"wait": 30})
    assert response.status_code == 200, response.text
    status: dict[str, Any] = response.json()
    assert status["state"] in ("SUCCESS", "FAILURE"), status
    return status


def _served(result: dict[str, Any]) -> tuple[str, str]:
    return result["model_version"], result["arm"]


def test_a_pinned_job_is_served_by_the_version_it_names_on_every_route(
    arms: Arms, http: httpx.Client
) -> None:
    rows = arms.champion.X_test[:3]
    champion = arms.champion.reference(rows)
    challenger = arms.challenger.reference(rows)
    assert not np.allclose(champion, challenger)  # so a prediction tells the versions apart
    v_champion, v_challenger = arms.champion.manifest.version, arms.challenger.manifest.version

    # By version, by alias, by registry number; in the body or as a header.
    for pin, headers, version, want in [
        ({"model_version": v_challenger}, {}, v_challenger, challenger),
        ({"model_version": "champion"}, {}, v_champion, champion),
        ({}, {PIN_HEADER: "challenger"}, v_challenger, challenger),
        ({}, {PIN_HEADER: "2"}, v_champion, champion),
    ]:
        one = http.post("/api/v1/predict", json={"data": rows[0].tolist(), **pin}, headers=headers)
        assert one.status_code == 200, one.text
        assert _served(one.json()) == (version, "pinned")
        assert one.json()["prediction"] == pytest.approx(float(want[0]), abs=1e-6)

        batch = http.post(
            "/api/v1/predict/batch", json={"data": rows.tolist(), **pin}, headers=headers
        )
        assert batch.status_code == 200, batch.text
        assert _served(batch.json()) == (version, "pinned")
        np.testing.assert_allclose(batch.json()["predictions"], want, atol=1e-6)

        explained = http.post(
            "/api/v1/explain", json={"data": rows.tolist(), **pin}, headers=headers
        )
        assert explained.status_code == 200, explained.text
        doc = explained.json()
        assert _served(doc) == (version, "pinned")
        np.testing.assert_allclose(doc["predictions"], want, atol=1e-5)
        model = arms.champion if version == v_champion else arms.challenger
        assert doc["base_value"] == pytest.approx(model.manifest.base_value)

        job = {"rows_f32": encode_f32(rows), "n_features": rows.shape[1], **pin}
        accepted = http.post("/api/v1/jobs", json=job, headers=headers)
        assert accepted.status_code == 202, accepted.text
        status = _finished(http, accepted.json()["task_id"])
        assert _served(status["result"]) == (version, "pinned")


def test_the_same_routing_key_always_gets_the_same_arm_whoever_sends_it(
    arms: Arms, http: httpx.Client
) -> None:
    row = arms.champion.X_test[0].tolist()
    arm_version = {
        "champion": arms.champion.manifest.version,
        "challenger": arms.challenger.manifest.version,
    }
    sender = Celery("pins-sender", broker=arms.redis_url)
    sender.conf.update(task_serializer="json", accept_content=["json"])
    seen: dict[str, set[str]] = {}
    try:
        for key in [f"user-{i}" for i in range(24)]:
            served = []
            for _ in range(2):
                body = http.post("/api/v1/predict", json={"data": row, "routing_key": key})
                served.append(_served(body.json()))
                header = http.post(
                    "/api/v1/predict/batch", json={"data": [row]}, headers={ROUTING_KEY_HEADER: key}
                )
                served.append(_served(header.json()))
                explained = http.post("/api/v1/explain", json={"data": [row], "routing_key": key})
                served.append(_served(explained.json()))
                job = http.post("/api/v1/jobs", json={"features": row, "routing_key": key})
                served.append(_served(_finished(http, job.json()["task_id"])["result"]))
            # A stock Celery client, routing by message header, meets the same arm.
            sent = sender.send_task(
                TASK_PREDICT,
                kwargs={"features": row},
                queue=row_queue(QUEUE_CPU),
                headers={"routing_key": key},
            )
            served.append(_served(_finished(http, sent.id)["result"]))
            arm = "challenger" if in_canary(key, CANARY_PERCENT) else "champion"
            assert set(served) == {(arm_version[arm], arm)}, key
            seen[arm] = seen.get(arm, set()) | {key}
    finally:
        sender.close()
    assert set(seen) == {"champion", "challenger"}  # the keys fell on both sides of the split


def test_an_unknown_version_is_a_problem_and_nothing_else_fails(
    arms: Arms, http: httpx.Client
) -> None:
    row = arms.champion.X_test[0].tolist()
    response = http.post("/api/v1/predict", json={"data": row, "model_version": "9"})
    doc = problem(response, 422, "UnknownModelVersion")
    assert "'9'" in doc["detail"] and doc["retryable"] is False
    assert _finished(http, doc["task_id"])["error"]["type"] == "UnknownModelVersion"
    response = http.post(
        "/api/v1/predict/batch", json={"data": [row]}, headers={PIN_HEADER: "no-such-version"}
    )
    problem(response, 422, "UnknownModelVersion")
    # Refused by its spelling: never enqueued.
    malformed = {"features": row, "model_version": "../1"}
    problem(http.post("/api/v1/jobs", json=malformed), 422, "InvalidInput")

    # Among jobs sent together, only those pinned to it fail, and as they should.
    pins = [{"model_version": "9"} if i % 3 == 0 else {"routing_key": f"k{i}"} for i in range(30)]
    ids = []
    for pin in pins:
        accepted = http.post("/api/v1/jobs", json={"features": row, **pin})
        assert accepted.status_code == 202, accepted.text
        ids.append(accepted.json()["task_id"])
    for pin, task_id in zip(pins, ids, strict=True):
        status = _finished(http, task_id)
        if "model_version" in pin:
            assert status["state"] == "FAILURE"
            assert status["error"] == {
                "type": "UnknownModelVersion",
                "message": status["error"]["message"],
                "retryable": False,
            }
        else:
            assert status["state"] == "SUCCESS", status
            assert status["result"]["arm"] in ("champion", "challenger")
    ok = http.post("/api/v1/predict", json={"data": row, "model_version": "1"})
    assert _served(ok.json()) == (arms.challenger.manifest.version, "pinned")
