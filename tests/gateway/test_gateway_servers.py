"""Gateways started otherwise than the shared one: with a token, with a queue-depth limit and a
short predict timeout in front of a queue no worker consumes, and with Redis down."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from contract.names import QUEUE_GPU, row_queue
from stack.embedded_redis import free_port
from tests.gateway.support import GatewayServer, assert_serves, problem, run_gateway
from tests.support import RunningWorker, TrainedModel

pytestmark = pytest.mark.integration

TOKEN = "correct horse battery staple"
ROW = [0.1, 0.2, 0.3, 0.4, 0.5]


@pytest.fixture(scope="module")
def guarded(
    redis_url: str, cpu_worker: RunningWorker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayServer]:
    log = tmp_path_factory.mktemp("logs") / "gateway-token.log"
    with run_gateway(redis_url, log, gateway_token=TOKEN) as server:
        yield server


def test_with_a_token_every_api_request_needs_it_and_the_docs_stay_open(
    guarded: GatewayServer, trained_model: TrainedModel
) -> None:
    with httpx.Client(base_url=guarded.url, timeout=30) as anonymous:
        for method, path in [
            ("POST", "/api/v1/predict"),
            ("GET", "/api/v1/predict/health"),
            ("GET", "/api/v1/jobs/some-id"),
            ("GET", "/api/v1/model"),
        ]:
            response = anonymous.request(method, path, json={"data": ROW})
            problem(response, 401, "Unauthorized")
            assert response.headers["www-authenticate"] == 'Bearer realm="queue-inference"'
        assert anonymous.get("/openapi.json").status_code == 200
        assert anonymous.get("/docs").status_code == 200

    wrong = {"Authorization": "Bearer correct horse battery stapler"}
    with httpx.Client(base_url=guarded.url, timeout=30, headers=wrong) as client:
        response = client.post("/api/v1/predict", json={"data": ROW})
        problem(response, 401, "Unauthorized")
        assert 'error="invalid_token"' in response.headers["www-authenticate"]
        basic = base64.b64encode(f"user:{TOKEN}".encode()).decode()
        response = client.get("/api/v1/model", headers={"Authorization": f"Basic {basic}"})
        problem(response, 401, "Unauthorized")

    right = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=guarded.url, timeout=30, headers=right) as client:
        assert_serves(client, trained_model)
    assert TOKEN not in guarded.log_tail(100_000)


@pytest.fixture(scope="module")
def no_gpu_worker(
    redis_url: str, cpu_worker: RunningWorker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayServer]:
    """A gateway with room for 2 jobs a queue and 0.5 s to wait; no worker of the tests
    consumes the GPU queues, so what is sent there stays."""
    log = tmp_path_factory.mktemp("logs") / "gateway-limits.log"
    with run_gateway(
        redis_url, log, max_queue_depth=2, gateway_predict_timeout_s=0.5, gateway_retry_after_s=3
    ) as server:
        yield server


@pytest.fixture
def gpu_rows(redis_url: str) -> Iterator[list[str]]:
    """The ids of the jobs a test leaves on the GPU row queue, taken off it afterwards."""
    sent: list[str] = []
    yield sent
    broker = redis.Redis.from_url(redis_url, decode_responses=True)
    queue = row_queue(QUEUE_GPU)
    removed = 0
    messages: list[str] = broker.lrange(queue, 0, -1)  # type: ignore[assignment]
    for message in messages:
        if json.loads(message)["headers"]["id"] in sent:
            removed += broker.lrem(queue, 0, message)
    broker.close()
    assert removed == len(sent), "a job the gateway accepted is not on its queue"


def test_a_job_that_does_not_finish_in_time_is_a_504_naming_it(
    no_gpu_worker: GatewayServer, gpu_rows: list[str], trained_model: TrainedModel
) -> None:
    with httpx.Client(base_url=no_gpu_worker.url, timeout=30) as client:
        response = client.post("/api/v1/predict", json={"data": ROW, "queue": "gpu"})
        doc = problem(response, 504, "Gateway Timeout")
        gpu_rows.append(doc["task_id"])
        assert doc["status_url"] == f"/api/v1/jobs/{doc['task_id']}"
        assert doc["status_url"] in doc["detail"]
        # Still queued, and readable where the problem says.
        assert client.get(doc["status_url"]).json()["state"] == "PENDING"
        assert_serves(client, trained_model)


def test_a_full_queue_is_a_429_with_retry_after_and_other_queues_serve_on(
    no_gpu_worker: GatewayServer, gpu_rows: list[str], trained_model: TrainedModel
) -> None:
    with httpx.Client(base_url=no_gpu_worker.url, timeout=30) as client:
        for _ in range(3):
            response = client.post("/api/v1/jobs", json={"features": ROW, "queue": "gpu"})
            if response.status_code != 202:
                break
            gpu_rows.append(response.json()["task_id"])
        doc = problem(response, 429, "QueueFull")
        assert doc["retryable"] is True and "limit of 2" in doc["detail"]
        assert response.headers["retry-after"] == "3"
        assert len(gpu_rows) <= 2
        # The limit is per queue: the CPU workers' queue has room.
        assert_serves(client, trained_model)


def test_without_redis_the_gateway_starts_and_answers_503(tmp_path: Path) -> None:
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    with (
        run_gateway(nowhere, tmp_path / "gateway.log") as server,
        httpx.Client(base_url=server.url, timeout=60) as client,
    ):
        response = client.post("/api/v1/predict", json={"data": ROW})
        doc = problem(response, 503, "RedisUnreachable")
        assert doc["retryable"] is True and response.headers["retry-after"] == "1"
        # Where Redis is stays in the log.
        assert nowhere.split("//")[1].split("/")[0] not in doc["detail"]
        assert "starting without Redis" in server.log_tail()
        assert server.running
