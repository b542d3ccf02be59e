"""The model registry: MLflow runs and registered versions, embedded or on a server.

Embedded (no MLFLOW_TRACKING_URI): a SQLite registry and an artifact folder under
<model_dir>/mlflow/, created on first use. MLflow creates or migrates a SQLite schema when
a client first opens it, and processes doing that at once corrupt it: the first open runs
under a file lock, alone. MLflow is imported here only, by training and the promote
commands; workers never need it (they read the serving decision from Redis).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from contract.errors import RegistryError
from training.artifact import Manifest
from training.fetch import ArtifactAuth, auth_headers
from training.registry_types import (
    ARTIFACT_PATH,
    TAG_ARTIFACT_VERSION,
    TAG_N_FEATURES,
    TAG_PREVIOUS_CHAMPION,
    RegistryVersion,
    artifact_location,
    find_version,
)
from training.settings import RegistrySettings

__all__ = ["TAG_PREVIOUS_CHAMPION", "Registry", "RegistryVersion"]

DB_FILE = "registry.db"
LOCK_FILE = ".open.lock"


def _import_mlflow() -> Any:
    # Before the import: MLflow sends usage telemetry unless told not to.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        import mlflow
    except ImportError:
        raise RegistryError(
            "the model registry needs MLflow: install the training extra "
            "(pip install 'queue-inference[training]')"
        ) from None
    return mlflow


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class Registry:
    """One model name's versions in MLflow."""

    def __init__(self, settings: RegistrySettings, model_dir: Path) -> None:
        mlflow = _import_mlflow()
        self.server = settings.tracking_uri
        self.artifact_auth: ArtifactAuth | None = None
        if self.server:
            uri = self.server
            self.artifact_root: str | None = None
            self.artifact_auth = ArtifactAuth(
                self.server,
                auth_headers(
                    settings.tracking_token, settings.tracking_username, settings.tracking_password
                ),
            )
            self.client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
            return
        root = settings.embedded_dir(model_dir).resolve()
        uri = f"sqlite:///{root / DB_FILE}"
        self.artifact_root = str(root / "artifacts")
        with _locked(root / LOCK_FILE):
            self.client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
            # Both stores open (and create or migrate) the database on first use.
            self.client.search_experiments(max_results=1)
            self.client.search_registered_models(max_results=1)

    # -- writing ---------------------------------------------------------------------------

    def register(
        self, version_dir: Path, manifest: Manifest, extra_metrics: dict[str, float] | None = None
    ) -> RegistryVersion:
        """Log a run (parameters, metrics, the artifact folder byte for byte) and register
        it as a new version of the manifest's model."""
        client = self.client
        name = manifest.name
        experiment = client.get_experiment_by_name(name)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else client.create_experiment(name, artifact_location=self._artifact_location(name))
        )
        run = client.create_run(experiment_id, run_name=manifest.version)
        run_id = run.info.run_id
        for key, value in sorted(manifest.params.items()):
            client.log_param(run_id, key, str(value)[:500])
        for key, value in sorted({**manifest.metrics, **(extra_metrics or {})}.items()):
            client.log_metric(run_id, key, float(value))
        client.log_artifacts(run_id, str(version_dir), ARTIFACT_PATH)
        client.set_terminated(run_id)
        if not client.search_registered_models(filter_string=f"name = '{name}'"):
            client.create_registered_model(name)
        created = client.create_model_version(
            name,
            source=f"{run.info.artifact_uri}/{ARTIFACT_PATH}",
            run_id=run_id,
            tags={TAG_ARTIFACT_VERSION: manifest.version, TAG_N_FEATURES: str(manifest.n_features)},
        )
        return self.get(name, str(created.version))

    def set_alias(self, name: str, alias: str, number: str) -> None:
        self.client.set_registered_model_alias(name, alias, number)

    def drop_alias(self, name: str, alias: str) -> None:
        if alias in self.aliases(name):
            self.client.delete_registered_model_alias(name, alias)

    def remember(self, name: str, key: str, value: str) -> None:
        self.client.set_registered_model_tag(name, key, value)

    def record_metrics(self, number_of: RegistryVersion, metrics: dict[str, float]) -> None:
        """Add metrics to a version's run (the retraining gate's scores on shared rows)."""
        if number_of.run_id:
            for key, value in sorted(metrics.items()):
                self.client.log_metric(number_of.run_id, key, float(value))

    # -- reading ---------------------------------------------------------------------------

    def aliases(self, name: str) -> dict[str, str]:
        """alias -> version number."""
        try:
            model = self.client.get_registered_model(name)
        except Exception:
            return {}
        return {alias: str(v) for alias, v in (model.aliases or {}).items()}

    def remembered(self, name: str, key: str) -> str | None:
        try:
            value = self.client.get_registered_model(name).tags.get(key)
        except Exception:
            return None
        return None if value is None else str(value)

    def get(self, name: str, ref: str) -> RegistryVersion:
        """A version by number, alias or artifact version."""
        return find_version(self.versions(name), name, ref)

    def versions(self, name: str) -> list[RegistryVersion]:
        """Every registered version of `name`, oldest first."""
        by_number: dict[str, list[str]] = {}
        for alias, number in self.aliases(name).items():
            by_number.setdefault(number, []).append(alias)
        found = self.client.search_model_versions(f"name = '{name}'")
        rows = []
        for mv in sorted(found, key=lambda v: int(v.version)):
            metrics: dict[str, float] = {}
            if mv.run_id:
                metrics = dict(self.client.get_run(mv.run_id).data.metrics)
            rows.append(
                RegistryVersion(
                    number=str(mv.version),
                    artifact_version=(mv.tags or {}).get(TAG_ARTIFACT_VERSION, ""),
                    source=mv.source,
                    created_ms=int(mv.creation_timestamp or 0),
                    run_id=mv.run_id,
                    aliases=tuple(sorted(by_number.get(str(mv.version), []))),
                    metrics=metrics,
                )
            )
        return rows

    def location(self, version: RegistryVersion) -> str:
        """Where workers fetch the version's files: a path (embedded: the artifact folder,
        which hosts share) or the server's artifact REST API."""
        return artifact_location(version.source, self.server)

    def _artifact_location(self, name: str) -> str | None:
        if self.artifact_root is None:
            return None  # the server's default: proxied through its artifact REST API
        return f"{self.artifact_root}/{name}"
