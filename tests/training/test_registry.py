"""The embedded model registry (MLflow on SQLite) and the serving decision in a real Redis."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest
import redis

from contract.errors import RegistryError
from contract.names import SERVING_CHANNEL, serving_key
from contract.schemas import ServingDecision
from tests.training.conftest import small
from training import promote
from training.cli import main as cli_main
from training.gate import run_gate
from training.registry import Registry, RegistryVersion
from training.settings import RegistrySettings
from training.train import TrainOutcome, run_training

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("registry-models")


@pytest.fixture(scope="module")
def registry(model_dir: Path, redis_url: str) -> Registry:
    return Registry(RegistrySettings(redis_url=redis_url), model_dir)


@pytest.fixture(scope="module")
def outcomes(model_dir: Path) -> list[TrainOutcome]:
    name = f"m{uuid.uuid4().hex[:6]}"
    first = run_training(small(model_dir).model_copy(update={"name": name}))
    second = run_training(small(model_dir).model_copy(update={"name": name, "seed": 1}))
    return [first, second]


@pytest.fixture(scope="module")
def registered(registry: Registry, outcomes: list[TrainOutcome]) -> list[RegistryVersion]:
    return [registry.register(o.version_dir, o.manifest) for o in outcomes]


def test_register_logs_the_artifact_byte_for_byte(
    registry: Registry, outcomes: list[TrainOutcome], registered: list[RegistryVersion]
) -> None:
    first = registered[0]
    assert first.artifact_version == outcomes[0].manifest.version
    assert first.metrics["r2"] == pytest.approx(outcomes[0].manifest.metrics["r2"])
    logged = Path(registry.location(first))
    for source in outcomes[0].version_dir.iterdir():
        assert (logged / source.name).read_bytes() == source.read_bytes()
    assert [v.number for v in registry.versions(outcomes[0].manifest.name)] == ["1", "2"]


def test_promote_publishes_the_decision_and_rollback_restores(
    registry: Registry,
    redis_url: str,
    outcomes: list[TrainOutcome],
    registered: list[RegistryVersion],
) -> None:
    client = redis.Redis.from_url(redis_url)
    name = outcomes[0].manifest.name
    pubsub = client.pubsub()
    pubsub.subscribe(SERVING_CHANNEL)
    first = promote.promote(registry, client, name, registered[0].number)
    assert first.champion.version == registered[0].artifact_version
    stored = ServingDecision.model_validate_json(client.get(serving_key(name)) or b"")
    assert stored == first
    second = promote.promote(registry, client, name, registered[1].artifact_version)
    assert second.generation == first.generation + 1
    assert second.previous == first.champion
    assert registry.aliases(name)["champion"] == registered[1].number
    notices = [m["data"] for m in _drain(pubsub) if m["type"] == "message"]
    assert notices.count(name.encode()) == 2

    canary = promote.promote(registry, client, name, registered[0].number, canary_percent=10)
    assert canary.challenger is not None and canary.canary_percent == 10
    assert canary.champion == second.champion
    assert registry.aliases(name)["challenger"] == registered[0].number
    dropped = promote.rollback(registry, client, name)
    assert dropped.challenger is None and dropped.champion == second.champion
    assert "challenger" not in registry.aliases(name)
    back = promote.rollback(registry, client, name)
    assert back.champion == first.champion
    assert registry.aliases(name)["champion"] == registered[0].number
    with pytest.raises(RegistryError, match="no previous champion"):
        promote.rollback(registry, client, name)
    client.close()


def test_a_tampered_version_is_refused_and_nothing_changes(
    registry: Registry, redis_url: str, outcomes: list[TrainOutcome], model_dir: Path
) -> None:
    client = redis.Redis.from_url(redis_url)
    name = f"t{uuid.uuid4().hex[:6]}"
    good = run_training(small(model_dir).model_copy(update={"name": name}))
    bad_dir = model_dir / "bad" / good.manifest.version
    shutil.copytree(good.version_dir, bad_dir)
    version = registry.register(good.version_dir, good.manifest)
    promote.promote(registry, client, name, version.number)
    before = client.get(serving_key(name))
    broken = registry.register(bad_dir, good.manifest)
    model_file = Path(registry.location(broken)) / good.manifest.files["cpu"].path
    model_file.write_bytes(model_file.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(RegistryError, match="sha256"):
        promote.promote(registry, client, name, broken.number)
    assert client.get(serving_key(name)) == before
    assert registry.aliases(name)["champion"] == version.number
    client.close()


def test_cli_versions_lists_aliases(
    registry: Registry,
    redis_url: str,
    registered: list[RegistryVersion],
    outcomes: list[TrainOutcome],
    model_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("INFERENCE_REDIS_URL", redis_url)
    name = outcomes[0].manifest.name
    argv = ["--model-dir", str(model_dir), "--name", name]
    assert cli_main([*argv, "promote", registered[1].number]) == 0
    assert cli_main([*argv, "versions"]) == 0
    out = capsys.readouterr().out
    line = next(row for row in out.splitlines() if registered[1].artifact_version in row)
    assert "champion" in line
    assert cli_main([*argv, "promote", "99"]) == 1


def test_gate_promotes_only_a_candidate_that_is_not_worse(
    registry: Registry, redis_url: str, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = redis.Redis.from_url(redis_url)
    name = f"g{uuid.uuid4().hex[:6]}"
    base = small(model_dir).model_copy(update={"name": name, "n_estimators": 20})
    good = run_gate(registry, client, run_training(base), tolerance=0.01, say=print)
    assert good.promoted and good.reason == "no champion yet"
    # Trees of depth 1 on the same rows: far worse than the champion.
    worse = run_training(base.model_copy(update={"max_depth": 1}))
    refused = run_gate(registry, client, worse, tolerance=0.01, say=print)
    assert not refused.promoted and "below the champion" in refused.reason
    decision = promote.read_decision(client, name)
    assert decision is not None and decision.champion.version == good.candidate.artifact_version
    assert registry.aliases(name)["challenger"] == refused.candidate.number
    client.close()


def _drain(pubsub: redis.client.PubSub) -> list[dict[str, object]]:
    messages = []
    while (message := pubsub.get_message(timeout=0.2)) is not None:
        messages.append(message)
    return messages


def test_sync_serves_an_alias_moved_in_mlflow(
    registry: Registry, redis_url: str, model_dir: Path
) -> None:
    client = redis.Redis.from_url(redis_url)
    name = f"s{uuid.uuid4().hex[:6]}"
    config = small(model_dir).model_copy(update={"name": name})
    first, second = (
        registry.register(o.version_dir, o.manifest)
        for o in (run_training(config), run_training(config.model_copy(update={"seed": 2})))
    )
    promote.promote(registry, client, name, first.number)
    assert promote.sync(registry, client, name) is None
    registry.set_alias(name, "champion", second.number)  # as MLflow's UI would
    moved = promote.sync(registry, client, name)
    assert moved is not None and moved.champion.version == second.artifact_version
    assert promote.read_decision(client, name) == moved
    client.close()


def test_cli_trains_registers_and_gates(
    redis_url: str,
    model_dir: Path,
    registry: Registry,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("INFERENCE_REDIS_URL", redis_url)
    name = f"c{uuid.uuid4().hex[:6]}"
    argv = ["--model-dir", str(model_dir), "--name", name, "--n-samples", "1500"]
    argv += ["--n-estimators", "10", "--n-jobs", "1", "--no-benchmark", "--no-gpu-model"]
    assert cli_main([*argv, "--promote-if-better"]) == 0
    assert "version 1 promoted to champion: no champion yet" in capsys.readouterr().out
    assert cli_main([*argv, "--max-depth", "1", "--promote-if-better"]) == 0
    assert "version 2 kept as challenger: held-out R2" in capsys.readouterr().out
    assert registry.aliases(name) == {"champion": "1", "challenger": "2"}


def test_serving_now_reads_the_workers_heartbeats(redis_url: str) -> None:
    from contract.names import worker_state_key
    from contract.schemas import ServingStatus, WorkerState

    client = redis.Redis.from_url(redis_url)
    host = f"h{uuid.uuid4().hex[:6]}"
    version, challenger = f"v-{uuid.uuid4().hex[:6]}", f"c-{uuid.uuid4().hex[:6]}"
    state = WorkerState(
        hostname=host, queues=["q"], pool="prefork", model_name="m", model_version=version,
        provider="cpu", device="cpu", pid=7, started_at=0.0, updated_at=0.0,
        serving=ServingStatus(generation=1, challenger_version=challenger),
    )  # fmt: skip
    client.set(worker_state_key(host, 7), state.model_dump_json(), ex=30)
    serving = promote.serving_now(client)
    assert serving[version] == [f"{host}:7"]
    assert serving[challenger] == [f"{host}:7 (challenger)"]
    client.delete(worker_state_key(host, 7))
    client.close()
