"""Shared fixtures: a real Redis server, a trained model, real worker processes.

Redis: the server at REDIS_URL when that is set, otherwise a private
redis-server started for the session. Tests never flush it: each one works
under its own task ids, worker names and keys. MLflow: a real `mlflow server`
process, started for the session by the first test that asks for it; tests
register models under names of their own.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator

import pytest
import redis
from celery import Celery

from producer.settings import ProducerSettings
from stack.embedded_redis import EmbeddedRedis
from stack.processes import celery_env, worker_process
from tests.support import (
    TEST_MAX_BATCH_ROWS,
    MlflowServer,
    RunningWorker,
    SyncCommand,
    TrainedModel,
    serving,
)
from training.artifact import load_manifest


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    external = os.environ.get("REDIS_URL")
    if external:
        yield external
        return
    with EmbeddedRedis() as server:
        yield server.url


MLFLOW_START_TIMEOUT_S = 120.0


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """`mlflow server` with its own SQLite store and artifact folder, serving artifacts over
    its REST API (what workers on other hosts fetch from). The dev extra installs MLflow, so
    a server that does not start fails the test: it never skips."""
    root = tmp_path_factory.mktemp("mlflow-server")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    # Webhooks to the tests' plain-HTTP receivers on 127.0.0.1 (by default MLflow accepts
    # https URLs on public addresses only), seen 1 s after they are made (60 s by default).
    env = {
        **os.environ,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
        "MLFLOW_WEBHOOK_CACHE_TTL": "1",
    }
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME"):
        env.pop(name, None)
    log_path = root / "server.log"
    args = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
        "--serve-artifacts", "--artifacts-destination", str(root / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + MLFLOW_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited: {log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer in {MLFLOW_START_TIMEOUT_S:g}s")
            time.sleep(0.5)
        yield MlflowServer(url=url, artifacts=root / "artifacts", log=log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


# `python -m training sync` as it runs in the gateway's image (the base install): none of
# the training extra (MLflow, scikit-learn, ONNX, onnxruntime) nor SHAP can be imported.
_WITHOUT_MLFLOW = """
import runpy, sys
BLOCKED = ("mlflow", "sklearn", "skl2onnx", "onnx", "onnxruntime", "shap")
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (not installed here)")
sys.meta_path.insert(0, Blocked())
sys.argv = ["training", *sys.argv[1:]]
runpy.run_module("training", run_name="__main__", alter_sys=True)
"""


@pytest.fixture
def sync_without_mlflow(mlflow_server: MlflowServer, redis_url: str) -> SyncCommand:
    """`python -m training --name NAME sync [args]` against the server, in a process where
    MLflow, scikit-learn, ONNX and onnxruntime cannot be imported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        MLFLOW_TRACKING_URI=mlflow_server.url, INFERENCE_REDIS_URL=redis_url, REDIS_URL=redis_url
    )
    return SyncCommand([sys.executable, "-c", _WITHOUT_MLFLOW], env)


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory: pytest.TempPathFactory) -> TrainedModel:
    from training.train import TrainConfig, run_training

    model_dir = tmp_path_factory.mktemp("models")
    outcome = run_training(TrainConfig(model_dir=model_dir, n_samples=3_000, n_jobs=1))
    version_dir, manifest = load_manifest(model_dir, outcome.manifest.name)
    return TrainedModel(model_dir, version_dir, manifest, outcome.X_test)


@pytest.fixture(scope="session")
def cpu_worker(
    redis_url: str, trained_model: TrainedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningWorker]:
    """One prefork worker (2 processes) on inference.cpu, shared by the integration tests."""
    hostname = f"cpu-{uuid.uuid4().hex[:8]}@tests"
    env = celery_env(
        redis_url,
        model_dir=trained_model.model_dir,
        max_batch_rows=TEST_MAX_BATCH_ROWS,
        heartbeat_s=0.5,
    )
    log = tmp_path_factory.mktemp("logs") / "cpu-worker.log"
    proc = worker_process(env, log, queue="inference.cpu", name=hostname, concurrency=2)
    with serving(proc, redis_url, hostname, "inference.cpu", processes=2) as worker:
        yield worker


@pytest.fixture
def producer_settings(redis_url: str) -> ProducerSettings:
    return ProducerSettings(redis_url=redis_url, wait_timeout_s=30)


@pytest.fixture
def celery_sender(redis_url: str) -> Iterator[Celery]:
    """A stock Celery client app: what a hand-written producer sends, with no checks of ours."""
    app = Celery("tests-sender", broker=redis_url)
    app.conf.update(task_serializer="json", accept_content=["json"])
    try:
        yield app
    finally:
        app.close()
