"""The registry against a real `mlflow server` process: runs, versions and aliases on the
server, artifacts through its REST API, a worker's fetch over HTTP, and the same registry
read over plain HTTP (training.mlflow_http) as MLflow's own client reads it, and MLflow's
webhook waking `sync --listen`."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from contract.errors import RegistryError
from tests.support import MlflowServer, SyncCommand
from tests.training.conftest import small
from training import promote
from training.fetch import fetch_version
from training.mlflow_http import RestRegistry
from training.registry import Registry
from training.settings import RegistrySettings
from training.train import run_training

pytestmark = pytest.mark.integration


def _registry(server: MlflowServer, redis_url: str, tmp_path: Path) -> Registry:
    settings = RegistrySettings(tracking_uri=server.url, redis_url=redis_url)
    return Registry(settings, tmp_path / "unused")


def test_server_mode_registers_promotes_and_workers_fetch_over_http(
    mlflow_server: MlflowServer, redis_url: str, tmp_path: Path
) -> None:
    registry = _registry(mlflow_server, redis_url, tmp_path)
    name = f"srv{uuid.uuid4().hex[:6]}"
    outcome = run_training(small(tmp_path / "models").model_copy(update={"name": name}))
    version = registry.register(outcome.version_dir, outcome.manifest)
    assert version.number == "1" and version.source.startswith("mlflow-artifacts:")
    location = registry.location(version)
    assert location.startswith(f"{mlflow_server.url}/api/2.0/mlflow-artifacts/artifacts/")

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


def test_the_rest_api_reads_what_mlflows_client_reads(
    mlflow_server: MlflowServer, redis_url: str, tmp_path: Path
) -> None:
    registry = _registry(mlflow_server, redis_url, tmp_path)
    rest = RestRegistry(mlflow_server.url)
    name = f"rest{uuid.uuid4().hex[:6]}"
    assert rest.aliases(name) == {} and rest.alias(name, "champion") is None
    config = small(tmp_path / "models").model_copy(update={"name": name})
    for seed in (0, 1):
        outcome = run_training(config.model_copy(update={"seed": seed}))
        registry.register(outcome.version_dir, outcome.manifest)
    registry.set_alias(name, "champion", "2")

    def without_metrics(versions: list) -> list:
        return [v.__class__(**{**v.__dict__, "metrics": {}}) for v in versions]

    assert rest.versions(name) == without_metrics(registry.versions(name))
    assert rest.aliases(name) == registry.aliases(name) == {"champion": "2"}
    for ref in ("1", "2", "champion", registry.versions(name)[0].artifact_version):
        by_rest, by_client = rest.get(name, ref), registry.get(name, ref)
        assert (by_rest.number, by_rest.source, by_rest.aliases) == (
            by_client.number,
            by_client.source,
            by_client.aliases,
        )
        assert rest.location(by_rest) == registry.location(by_client)
    champion = rest.alias(name, "champion")
    assert champion is not None and champion.number == "2"
    with pytest.raises(RegistryError, match="no version, alias or artifact"):
        rest.get(name, "7")

    rest.set_alias(name, "challenger", "1")
    rest.remember(name, "note", "by http")
    assert registry.aliases(name) == {"champion": "2", "challenger": "1"}
    assert registry.remembered(name, "note") == "by http"
    rest.drop_alias(name, "challenger")
    assert registry.aliases(name) == {"champion": "2"}


def test_http_sync_follows_the_alias_and_drops_the_old_challenger(
    mlflow_server: MlflowServer, redis_url: str, tmp_path: Path
) -> None:
    registry = _registry(mlflow_server, redis_url, tmp_path)
    rest = RestRegistry(mlflow_server.url)
    name = f"sync{uuid.uuid4().hex[:6]}"
    config = small(tmp_path / "models").model_copy(update={"name": name})
    outcomes = [run_training(config.model_copy(update={"seed": s})) for s in (0, 1)]
    for outcome in outcomes:
        registry.register(outcome.version_dir, outcome.manifest)
    client = redis.Redis.from_url(redis_url)
    try:
        assert promote.sync(rest, client, name) is None  # no champion alias yet
        promote.promote(registry, client, name, "1")
        promote.promote(registry, client, name, "2", canary_percent=10)
        assert promote.sync(rest, client, name) is None  # in step

        time.sleep(1.5)  # the server's cache of webhooks lives 1 s (MLFLOW_WEBHOOK_CACHE_TTL)
        registry.client.set_registered_model_alias(name, "champion", "2")  # as in the UI
        decision = promote.sync(rest, client, name)
        assert decision is not None
        assert decision.champion.version == outcomes[1].manifest.version
        assert decision.champion.registry_version == "2"
        assert decision.challenger is None and decision.canary_percent == 0
        assert decision.previous is not None and decision.previous.registry_version == "1"
        assert decision.champion == promote.served_version(registry, registry.get(name, "2"))
        assert promote.read_decision(client, name) == decision
        assert registry.aliases(name) == {"champion": "2"}
    finally:
        client.close()


def test_a_webhook_from_mlflow_syncs_at_once(
    mlflow_server: MlflowServer,
    redis_url: str,
    sync_without_mlflow: SyncCommand,
    tmp_path: Path,
) -> None:
    """No polling (`--listen` without `--every`): only MLflow's webhook can make the sync
    look again, and it does when the alias is moved."""
    registry = _registry(mlflow_server, redis_url, tmp_path)
    name = f"hook{uuid.uuid4().hex[:6]}"
    config = small(tmp_path / "models").model_copy(update={"name": name})
    for seed in (0, 1):
        outcome = run_training(config.model_copy(update={"seed": seed}))
        registry.register(outcome.version_dir, outcome.manifest)
    client = redis.Redis.from_url(redis_url)
    promote.promote(registry, client, name, "1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path / "sync.log"
    proc = sync_without_mlflow.start(
        name, "--listen", f"127.0.0.1:{port}", log=log, INFERENCE_WEBHOOK_SECRET="s3cret"
    )
    hook = None
    try:
        _wait(lambda: "in step with MLflow" in log.read_text(), log)
        hook = registry.client.create_webhook(
            name=f"sync-{name}",
            url=f"http://127.0.0.1:{port}/",
            events=["model_version_alias.created"],
            secret="s3cret",
        )
        time.sleep(1.5)  # the server's cache of webhooks lives 1 s (MLFLOW_WEBHOOK_CACHE_TTL)
        registry.client.set_registered_model_alias(name, "champion", "2")  # as in the UI

        def synced() -> bool:
            decision = promote.read_decision(client, name)
            return decision is not None and decision.champion.registry_version == "2"

        _wait(synced, log)
        assert proc.poll() is None  # still listening
    finally:
        proc.terminate()
        proc.wait(20)
        if hook is not None:
            registry.client.delete_webhook(hook.webhook_id)
        client.close()


def _wait(done: Callable[[], bool], log: Path, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)
