"""The registry against a real `mlflow server` process: runs, versions and aliases on the
server, artifacts through its REST API, and a worker's fetch over HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.training.conftest import small
from training import promote
from training.fetch import fetch_version
from training.registry import Registry
from training.settings import RegistrySettings
from training.train import run_training

pytestmark = pytest.mark.integration

START_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("mlflow-server")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = (root / "server.log").open("wb")
    args = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    proc = subprocess.Popen(
        args,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.skip(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.skip(f"mlflow server did not answer in {START_TIMEOUT_S:g}s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()


def test_server_mode_registers_promotes_and_workers_fetch_over_http(
    mlflow_server: str, redis_url: str, tmp_path: Path
) -> None:
    settings = RegistrySettings(tracking_uri=mlflow_server, redis_url=redis_url)
    registry = Registry(settings, tmp_path / "unused")
    name = f"srv{uuid.uuid4().hex[:6]}"
    outcome = run_training(small(tmp_path / "models").model_copy(update={"name": name}))
    version = registry.register(outcome.version_dir, outcome.manifest)
    assert version.number == "1" and version.source.startswith("mlflow-artifacts:")
    location = registry.location(version)
    assert location.startswith(f"{mlflow_server}/api/2.0/mlflow-artifacts/artifacts/")

    client = redis.Redis.from_url(redis_url)
    decision = promote.promote(registry, client, name, "1")
    client.close()
    assert registry.aliases(name) == {"champion": "1"}
    assert decision.champion.location == location
    version_dir, manifest = fetch_version(decision.champion, tmp_path / "cache", name)
    assert manifest == outcome.manifest
    for source in outcome.version_dir.iterdir():
        if source.name in decision.champion.sha256:
            assert (version_dir / source.name).read_bytes() == source.read_bytes()
