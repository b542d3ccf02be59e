"""Workers and producers against a Redis that wants a password, an ACL user, TLS.

Each test starts its own redis-server (requirepass, or TLS only with client
certificates), never the shared one, and real `celery worker` processes.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from pydantic import SecretStr

from producer.client import Client
from producer.connections import RedisAuthFailed, RedisTlsFailed, check_redis
from producer.settings import ProducerSettings, redact
from stack.embedded_redis import EmbeddedRedis, TlsFiles, TlsUnsupported, make_tls_files
from stack.processes import celery_env, wait_ready, worker_process
from tests.support import TrainedModel

pytestmark = pytest.mark.integration

# Characters that must be percent-encoded in a URL, to prove the merging does it.
PASSWORD = "s3cret/Pw@x:7%"
WRONG = "wr0ng-Secret-7f3a"


def start(server: EmbeddedRedis) -> EmbeddedRedis:
    try:
        return server.start()
    except TlsUnsupported as exc:
        pytest.skip(str(exc))
    except RuntimeError as exc:
        if "no redis-server binary" in str(exc):
            pytest.skip(str(exc))
        raise


@pytest.fixture(scope="module")
def password_server() -> Iterator[EmbeddedRedis]:
    server = start(
        EmbeddedRedis(
            password=PASSWORD,
            extra_args=("--user", "alice", "on", f">{PASSWORD}", "~*", "&*", "+@all"),
        )
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    try:
        return make_tls_files(tmp_path_factory.mktemp("tls"))
    except TlsUnsupported as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def tls_server(tls_files: TlsFiles) -> Iterator[EmbeddedRedis]:
    server = start(EmbeddedRedis(password=PASSWORD, tls=tls_files, tls_auth_clients="yes"))
    yield server
    server.stop()


def bare_url(server: EmbeddedRedis) -> str:
    """The server's URL without its password."""
    scheme = "rediss" if server.tls else "redis"
    return f"{scheme}://127.0.0.1:{server.port}/0"


def tls_env(files: TlsFiles) -> dict[str, object]:
    return {
        "redis_tls_ca_file": files.ca_cert,
        "redis_tls_cert_file": files.client_cert,
        "redis_tls_key_file": files.client_key,
    }


def serve_one_predict(
    env: dict[str, str],
    producer: ProducerSettings,
    trained: TrainedModel,
    tmp_path: Path,
) -> tuple[dict[str, object], str]:
    """Start a worker, send it one predict (row lane) and one batch (Celery's consumer) with
    the producer Client; (the predict's result, worker log)."""
    hostname = f"sec-{uuid.uuid4().hex[:6]}@tests"
    proc = worker_process(
        env, tmp_path / "worker.log", queue="inference.cpu", name=hostname, pool="solo"
    ).start()
    try:
        with Client(producer) as client:
            wait_ready(proc, client.redis, hostname, processes=1, timeout_s=30)
            result = client.wait(client.submit(trained.X_test[0].tolist()), timeout=30)
            # And one through Celery's own consumer (the lane above needs no consumer).
            batch = client.wait(client.submit_batch(trained.X_test[:2].tolist()), timeout=30)
            assert batch["rows"] == 2
    finally:
        proc.stop()
    return result, proc.log_tail(100_000)


def run_worker(
    env: dict[str, str], tmp_path: Path
) -> tuple[subprocess.CompletedProcess[str], float]:
    args = [
        sys.executable, "-m", "celery", "-A", "worker", "worker", "-Q", "security-test",
        "-P", "solo", "--without-mingle", "--without-gossip",
        "-n", f"refuse-{uuid.uuid4().hex[:6]}@tests",
    ]  # fmt: skip
    began = time.monotonic()
    proc = subprocess.run(
        args, env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False
    )
    return proc, time.monotonic() - began


# -- password ------------------------------------------------------------------------------


@pytest.mark.parametrize("worker_password", ["from INFERENCE_REDIS_PASSWORD", "in the URL"])
def test_the_right_password_serves_a_predict(
    password_server: EmbeddedRedis,
    trained_model: TrainedModel,
    tmp_path: Path,
    worker_password: str,
) -> None:
    # The producer gets its password the other way round, so both paths serve both sides.
    if worker_password == "in the URL":
        env = celery_env(password_server.url, model_dir=trained_model.model_dir)
        producer = ProducerSettings(
            redis_url=bare_url(password_server), redis_password=SecretStr(PASSWORD)
        )
    else:
        env = celery_env(
            bare_url(password_server), model_dir=trained_model.model_dir, redis_password=PASSWORD
        )
        producer = ProducerSettings(redis_url=password_server.url)
    result, log = serve_one_predict(env, producer, trained_model, tmp_path)
    assert result["model_version"] == trained_model.manifest.version
    assert PASSWORD not in log
    assert f"redis://:**@127.0.0.1:{password_server.port}/0" in log  # Celery's own banner


@pytest.mark.parametrize("how", ["wrong in the URL", "wrong from the environment", "missing"])
def test_a_rejected_password_stops_the_worker_at_once(
    password_server: EmbeddedRedis, trained_model: TrainedModel, tmp_path: Path, how: str
) -> None:
    url = bare_url(password_server)
    settings: dict[str, object] = {"model_dir": trained_model.model_dir}
    if how == "wrong in the URL":
        url = f"redis://:{WRONG}@127.0.0.1:{password_server.port}/0"
    elif how == "wrong from the environment":
        settings["redis_password"] = WRONG
    proc, elapsed = run_worker(celery_env(url, **settings), tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert elapsed < 20
    assert "refuses to start: Redis authentication failed" in proc.stderr
    assert f"at {redact(url)} " in proc.stderr
    assert WRONG not in output and PASSWORD not in output


def test_an_acl_user_from_the_environment(password_server: EmbeddedRedis) -> None:
    url = bare_url(password_server)
    settings = ProducerSettings(
        redis_url=url, redis_username="alice", redis_password=SecretStr(PASSWORD)
    )
    check_redis(url, settings, "broker")
    wrong_user = settings.model_copy(update={"redis_username": "mallory"})
    with pytest.raises(RedisAuthFailed, match="user mallory"):
        check_redis(url, wrong_user, "broker")


# -- TLS -----------------------------------------------------------------------------------


def test_tls_worker_and_producer_serve_a_predict(
    tls_server: EmbeddedRedis, tls_files: TlsFiles, trained_model: TrainedModel, tmp_path: Path
) -> None:
    url = bare_url(tls_server)
    env = celery_env(
        url, model_dir=trained_model.model_dir, redis_password=PASSWORD, **tls_env(tls_files)
    )
    producer = ProducerSettings(
        redis_url=url,
        redis_password=SecretStr(PASSWORD),
        redis_tls_ca_file=tls_files.ca_cert,
        redis_tls_cert_file=tls_files.client_cert,
        redis_tls_key_file=tls_files.client_key,
    )
    result, log = serve_one_predict(env, producer, trained_model, tmp_path)
    assert result["model_version"] == trained_model.manifest.version
    assert f"rediss://:**@127.0.0.1:{tls_server.port}/0" in log
    assert PASSWORD not in log


def test_a_client_without_the_ca_fails_verification(
    tls_server: EmbeddedRedis, tls_files: TlsFiles
) -> None:
    settings = ProducerSettings(
        redis_url=bare_url(tls_server),
        redis_password=SecretStr(PASSWORD),
        redis_tls_cert_file=tls_files.client_cert,
        redis_tls_key_file=tls_files.client_key,
    )
    with (
        Client(settings) as client,
        pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"),
    ):
        client.status("any-task-id")
    with pytest.raises(RedisTlsFailed, match="self-signed certificate in certificate chain"):
        check_redis(settings.redis_url, settings, "result backend")


def test_a_worker_without_the_ca_refuses_to_start(
    tls_server: EmbeddedRedis, tls_files: TlsFiles, trained_model: TrainedModel, tmp_path: Path
) -> None:
    files = tls_env(tls_files)
    del files["redis_tls_ca_file"]
    env = celery_env(
        bare_url(tls_server), model_dir=trained_model.model_dir, redis_password=PASSWORD, **files
    )
    proc, elapsed = run_worker(env, tmp_path)
    assert proc.returncode != 0
    assert elapsed < 20
    assert "refuses to start: TLS certificate verification failed" in proc.stderr
    assert f"rediss://127.0.0.1:{tls_server.port}/0" in proc.stderr
    assert PASSWORD not in proc.stdout + proc.stderr
