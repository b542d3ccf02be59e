"""The gateway's fixtures: a real `python -m gateway` in front of the shared test worker, and
no INFERENCE_GATEWAY_* of this machine's."""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest

from tests.gateway.support import MAX_WAIT_S, GatewayServer, run_gateway
from tests.support import RunningWorker


@pytest.fixture(autouse=True)
def _no_gateway_settings_of_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """A token or a limit set where the tests run would change what they see."""
    for name in list(os.environ):
        if name.startswith("INFERENCE_GATEWAY_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def gateway(
    redis_url: str, cpu_worker: RunningWorker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayServer]:
    """One gateway, no token, on loopback, for the shared CPU worker."""
    log = tmp_path_factory.mktemp("logs") / "gateway.log"
    with run_gateway(redis_url, log, gateway_max_wait_s=MAX_WAIT_S) as server:
        yield server


@pytest.fixture
def http(gateway: GatewayServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=60) as client:
        yield client
