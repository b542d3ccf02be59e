"""For the gateway's integration tests: a real `python -m gateway` process on a free loopback
port, and checks of its answers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.problems import ERROR_TYPE_BASE
from stack.embedded_redis import free_port
from stack.processes import CeleryProcess, celery_env, gateway_process, wait_http
from tests.support import TrainedModel

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 30.0

MAX_WAIT_S = 2.0
"""The long-poll cap the shared gateway runs with: short, so that the cap can be seen."""

PROBLEM = "application/problem+json"


@dataclass
class GatewayServer:
    url: str
    process: CeleryProcess

    def log_tail(self, chars: int = 3000) -> str:
        return self.process.log_tail(chars)

    @property
    def running(self) -> bool:
        return self.process.running


def gateway_env(redis_url: str, **settings: object) -> dict[str, str]:
    """celery_env's environment, less this machine's own INFERENCE_GATEWAY_* (a token set
    here would change what the tests see)."""
    env = celery_env(redis_url, **settings)
    for name in [n for n in env if n.startswith("INFERENCE_GATEWAY_")]:
        if name.removeprefix("INFERENCE_").lower() not in settings:
            del env[name]
    return env


@contextlib.contextmanager
def run_gateway(redis_url: str, log_path: Path, **settings: object) -> Iterator[GatewayServer]:
    """Start `python -m gateway`, wait until it answers, hand it over; stop it afterwards."""
    port = free_port()
    process = gateway_process(gateway_env(redis_url, **settings), log_path, port).start()
    server = GatewayServer(f"http://127.0.0.1:{port}", process)
    try:
        wait_http(process, f"{server.url}/openapi.json", READY_TIMEOUT_S)
        yield server
    finally:
        process.stop(timeout_s=10.0)


def problem(response: httpx.Response, status: int, title: str | None = None) -> dict[str, Any]:
    """The response's problem document, checked to be one, of `status` and `title`: an error
    of the contract by its name, or (no title) an error of HTTP's own, about:blank with the
    status's reason phrase."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    doc = response.json()
    phrase = HTTPStatus(status).phrase
    assert doc["status"] == status and doc["title"] == (title or phrase), doc
    assert isinstance(doc["retryable"], bool) and doc["detail"]
    http_error = title is None or title == phrase
    assert doc["type"] == ("about:blank" if http_error else f"{ERROR_TYPE_BASE}{title}")
    return doc


def assert_serves(http: httpx.Client, trained_model: TrainedModel) -> None:
    """A good request still gets the model's answer: checked after every bad one."""
    row = trained_model.X_test[7]
    response = http.post("/api/v1/predict", json={"data": row.tolist()})
    assert response.status_code == 200, response.text
    expected = float(trained_model.reference(row[None])[0])
    assert response.json()["prediction"] == pytest.approx(expected, abs=1e-6)
