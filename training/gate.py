"""The retraining gate (`python -m training ... --promote-if-better`): the candidate and the
champion are scored by onnxruntime on the same held-out rows; the candidate is promoted
only if it is not worse by more than the tolerance, and is the challenger otherwise."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import redis
from numpy.typing import NDArray
from sklearn.metrics import r2_score

from contract.names import ALIAS_CHALLENGER
from contract.schemas import ServingDecision
from training.artifact import Manifest
from training.fetch import fetch_version
from training.promote import promote, read_decision
from training.registry import Registry, RegistryVersion
from training.train import TrainOutcome


@dataclass(frozen=True)
class GateResult:
    candidate: RegistryVersion
    promoted: bool
    reason: str
    decision: ServingDecision | None


def onnx_r2(
    version_dir: Path, manifest: Manifest, X: NDArray[np.float64], y: NDArray[np.float64]
) -> float:
    session = ort.InferenceSession(
        str(version_dir / manifest.files["cpu"].path), providers=["CPUExecutionProvider"]
    )
    (out,) = session.run([manifest.output_name], {manifest.input_name: X.astype(np.float32)})
    return float(r2_score(y, np.asarray(out, dtype=np.float64).reshape(-1)))


def run_gate(
    registry: Registry,
    client: redis.Redis,
    outcome: TrainOutcome,
    tolerance: float,
    say: Callable[[str], None] = print,
) -> GateResult:
    manifest = outcome.manifest
    name = manifest.name
    X, y = outcome.X_test, outcome.y_test
    candidate_r2 = onnx_r2(outcome.version_dir, manifest, X, y)
    current = read_decision(client, name)
    champion_r2: float | None = None
    if current is not None and current.champion.n_features == manifest.n_features:
        with tempfile.TemporaryDirectory(prefix="gate-") as cache:
            champion_dir, champion = fetch_version(
                current.champion, Path(cache), name, registry.artifact_auth
            )
            champion_r2 = onnx_r2(champion_dir, champion, X, y)
    metrics = {"gate_r2": candidate_r2}
    if champion_r2 is not None:
        metrics["gate_champion_r2"] = champion_r2
    candidate = registry.register(outcome.version_dir, manifest, metrics)
    say(f"registered {name} version {candidate.number} ({manifest.version})")
    if current is None:
        decision = promote(registry, client, name, candidate.number)
        return GateResult(candidate, True, "no champion yet", decision)
    if champion_r2 is None:
        reason = (
            f"the champion takes {current.champion.n_features} features, the candidate "
            f"{manifest.n_features}: not comparable, promote it by hand"
        )
    elif candidate_r2 >= champion_r2 - tolerance:
        decision = promote(registry, client, name, candidate.number)
        reason = (
            f"held-out R2 {candidate_r2:.4f} vs champion {champion_r2:.4f} "
            f"(tolerance {tolerance:g})"
        )
        return GateResult(candidate, True, reason, decision)
    else:
        reason = (
            f"held-out R2 {candidate_r2:.4f} is below the champion's {champion_r2:.4f} "
            f"by more than {tolerance:g}"
        )
    registry.set_alias(name, ALIAS_CHALLENGER, candidate.number)
    return GateResult(candidate, False, reason, None)
