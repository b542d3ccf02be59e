"""For the gateway's integration tests: a real `python -m gateway` process on a free loopback
port, and checks of its answers."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.problems import ERROR_TYPE_BASE
from stack.embedded_redis import free_port
from tests.support import TrainedModel

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 30.0

MAX_WAIT_S = 2.0
"""The long-poll cap the shared gateway runs with: short, so that the cap can be seen."""

PROBLEM = "application/problem+json"


@dataclass
class GatewayServer:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    @property
    def running(self) -> bool:
        return self.process.poll() is None


def gateway_env(redis_url: str, **settings: object) -> dict[str, str]:
    """The current environment plus REDIS_URL and INFERENCE_<NAME> settings, less this
    machine's own INFERENCE_GATEWAY_* (a token set here would change what the tests see)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERENCE_GATEWAY_")}
    env.pop("INFERENCE_REDIS_URL", None)
    env["REDIS_URL"] = redis_url
    for name, value in settings.items():
        env[f"INFERENCE_{name.upper()}"] = str(value)
    return env


@contextlib.contextmanager
def run_gateway(redis_url: str, log_path: Path, **settings: object) -> Iterator[GatewayServer]:
    """Start `python -m gateway`, wait until it answers, hand it over; stop it afterwards."""
    port = free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO,
            env=gateway_env(redis_url, **settings),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = GatewayServer(f"http://127.0.0.1:{port}", process, log_path)
    try:
        wait_ready(server)
        yield server
    finally:
        stop(process)


def wait_ready(server: GatewayServer) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if not server.running:
            raise RuntimeError(f"the gateway exited:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}/openapi.json", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"the gateway did not answer in {READY_TIMEOUT_S:g}s:\n{server.log_tail()}")


def stop(process: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


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
