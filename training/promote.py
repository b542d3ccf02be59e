"""Promote and roll back: move MLflow's aliases, and publish the serving decision to Redis.

A version is checked before anyone is pointed at it: fetched as a worker fetches it (every
sha256), opened with onnxruntime and run on rows of the champion's width. A version that
fails is refused, and nothing changes. Then the decision (contract.schemas.ServingDecision)
is written to Redis, where every worker reads it, and its model's name published on
SERVING_CHANNEL, so that workers load it at once instead of at their next poll.

The registry is MLflow's client (training.registry) or its REST API over plain HTTP
(training.mlflow_http, for `sync` where MLflow is not installed): one code path for both.
Where onnxruntime is not installed either, a version's files are checked (every sha256,
the manifest) but not run; the workers run it before they serve it.
"""

from __future__ import annotations

import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import redis

from contract.errors import InferenceError, RegistryError
from contract.names import (
    ALIAS_CHALLENGER,
    ALIAS_CHAMPION,
    SERVING_CHANNEL,
    WORKER_STATE_PREFIX,
    serving_key,
)
from contract.schemas import ServedVersion, ServingDecision, WorkerState
from training.artifact import Manifest
from training.fetch import fetch_version, file_hashes
from training.registry_types import TAG_PREVIOUS_CHAMPION, RegistryLike, RegistryVersion


def read_decision(client: redis.Redis, name: str) -> ServingDecision | None:
    raw = client.get(serving_key(name))
    return None if raw is None else ServingDecision.model_validate_json(raw)


def publish_decision(client: redis.Redis, decision: ServingDecision) -> None:
    client.set(serving_key(decision.name), decision.model_dump_json())
    client.publish(SERVING_CHANNEL, decision.name)


def served_version(registry: RegistryLike, version: RegistryVersion) -> ServedVersion:
    """The version as workers will fetch it, after the checks they will make."""
    location = registry.location(version)
    try:
        hashes = file_hashes(location, registry.artifact_auth)
        with tempfile.TemporaryDirectory(prefix="promote-check-") as cache:
            _, manifest = fetch_version(
                ServedVersion(
                    version=version.artifact_version,
                    location=location,
                    sha256=hashes,
                    n_features=0,
                ),
                Path(cache),
                "check",
                registry.artifact_auth,
            )
            _run_once(Path(cache) / "check" / version.artifact_version, manifest)
    except InferenceError as exc:
        raise RegistryError(f"version {version.number} is not servable: {exc}") from None
    return ServedVersion(
        version=manifest.version,
        registry_version=version.number,
        location=location,
        sha256=hashes,
        n_features=manifest.n_features,
    )


def can_run_models() -> bool:
    """Whether this install can run a version before serving it (onnxruntime is there)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _run_once(version_dir: Path, manifest: Manifest) -> None:
    if not can_run_models():
        return
    import onnxruntime as ort

    path = version_dir / manifest.files["cpu"].path
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        rows = np.zeros((4, manifest.n_features), dtype=np.float32)
        (out,) = session.run([manifest.output_name], {manifest.input_name: rows})
    except Exception as exc:
        raise RegistryError(
            f"onnxruntime cannot run {path.name} on {manifest.n_features} features: {exc}"
        ) from None
    if np.asarray(out).size != len(rows) or not np.all(np.isfinite(out)):
        raise RegistryError(f"{path.name} does not give one finite prediction a row")


def promote(
    registry: RegistryLike,
    client: redis.Redis,
    name: str,
    ref: str,
    *,
    alias: str = ALIAS_CHAMPION,
    canary_percent: float = 0.0,
    shadow: bool = False,
) -> ServingDecision:
    """Serve version `ref` (number, alias or artifact version) as `alias`; a canary share or
    shadow makes it the challenger."""
    if canary_percent or shadow:
        alias = ALIAS_CHALLENGER
    if alias not in (ALIAS_CHAMPION, ALIAS_CHALLENGER):
        raise RegistryError(f"alias must be {ALIAS_CHAMPION} or {ALIAS_CHALLENGER}, not {alias!r}")
    if not 0.0 <= canary_percent <= 100.0:
        raise RegistryError(f"the canary share is a percentage, not {canary_percent}")
    version = registry.get(name, ref)
    target = served_version(registry, version)
    current = read_decision(client, name)
    if current is not None and target.n_features != current.champion.n_features:
        raise RegistryError(
            f"version {version.number} takes {target.n_features} features, the champion "
            f"{current.champion.n_features}: producers would send rows it cannot read"
        )
    generation = 0 if current is None else current.generation + 1
    if alias == ALIAS_CHAMPION:
        previous = None
        if current is not None and current.champion.version != target.version:
            previous = current.champion
        elif current is not None:
            previous = current.previous
        decision = ServingDecision(
            name=name,
            generation=generation,
            champion=target,
            previous=previous,
            decided_at=time.time(),
        )
    else:
        if current is None:
            raise RegistryError(f"model {name!r} has no champion: promote one first")
        decision = current.model_copy(
            update={
                "generation": generation,
                "challenger": target,
                "canary_percent": canary_percent,
                "shadow": shadow,
                "decided_at": time.time(),
            }
        )
    _move_aliases(registry, name, decision)
    publish_decision(client, decision)
    return decision


def rollback(registry: RegistryLike, client: redis.Redis, name: str) -> ServingDecision:
    """Drop the challenger if there is one (canary, shadow); otherwise serve the previous
    champion again."""
    current = read_decision(client, name)
    if current is None:
        raise RegistryError(f"model {name!r} has no serving decision to roll back")
    if current.challenger is not None:
        update: dict[str, object] = {"challenger": None, "canary_percent": 0.0, "shadow": False}
    elif current.previous is not None:
        update = {"champion": current.previous, "previous": None}
    else:
        raise RegistryError(f"model {name!r} has no previous champion to roll back to")
    decision = current.model_copy(
        update={**update, "generation": current.generation + 1, "decided_at": time.time()}
    )
    _move_aliases(registry, name, decision)
    publish_decision(client, decision)
    return decision


def sync(registry: RegistryLike, client: redis.Redis, name: str) -> ServingDecision | None:
    """Serve the version MLflow's champion alias names, if the decision says otherwise: an
    alias moved in MLflow's UI (or by another client) reaches the workers. None if in step."""
    number = registry.aliases(name).get(ALIAS_CHAMPION)
    if number is None:
        return None
    current = read_decision(client, name)
    if current is not None and current.champion.registry_version == number:
        return None
    return promote(registry, client, name, number)


def _move_aliases(registry: RegistryLike, name: str, decision: ServingDecision) -> None:
    champion = decision.champion.registry_version
    old = registry.aliases(name).get(ALIAS_CHAMPION)
    # No write when the alias is already there: `sync` follows an alias moved in MLflow and
    # may hold read-only credentials.
    if champion is not None and old != champion:
        if old is not None:
            registry.remember(name, TAG_PREVIOUS_CHAMPION, old)
        registry.set_alias(name, ALIAS_CHAMPION, champion)
    challenger = decision.challenger
    if challenger is not None and challenger.registry_version is not None:
        registry.set_alias(name, ALIAS_CHALLENGER, challenger.registry_version)
    else:
        registry.drop_alias(name, ALIAS_CHALLENGER)


def serving_now(client: redis.Redis) -> dict[str, list[str]]:
    """Artifact version -> the live worker processes serving it (from their heartbeats)."""
    serving: dict[str, list[str]] = defaultdict(list)
    for key in client.scan_iter(match=f"{WORKER_STATE_PREFIX}*", count=500):
        raw = client.get(key)
        if raw is None:
            continue
        try:
            state = WorkerState.model_validate_json(raw)
        except ValueError:
            continue
        who = f"{state.hostname}:{state.pid}"
        serving[state.model_version].append(who)
        if state.serving is not None and state.serving.challenger_version:
            serving[state.serving.challenger_version].append(f"{who} (challenger)")
    return dict(serving)
