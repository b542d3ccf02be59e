"""What the promote commands need of a model registry, without MLflow.

Two registries implement `RegistryLike`: training.registry.Registry (MLflow's Python client:
embedded SQLite or a server) and training.mlflow_http.RestRegistry (a server's REST API over
plain HTTP, for `sync` where MLflow is not installed). training.promote builds and checks the
serving decision against either, so both take one code path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from contract.errors import RegistryError
from training.fetch import ArtifactAuth

TAG_ARTIFACT_VERSION = "artifact_version"
TAG_N_FEATURES = "n_features"
# Where the remembered previous champion is kept, on the registered model.
TAG_PREVIOUS_CHAMPION = "previous_champion"
ARTIFACT_PATH = "model"
# MLflow's artifact REST API (`mlflow server --serve-artifacts`): GET <server><route><path>
# downloads one file.
ARTIFACTS_ROUTE = "/api/2.0/mlflow-artifacts/artifacts/"


@dataclass(frozen=True)
class RegistryVersion:
    number: str
    artifact_version: str
    source: str
    created_ms: int
    run_id: str | None
    aliases: tuple[str, ...]
    metrics: dict[str, float]


class RegistryLike(Protocol):
    artifact_auth: ArtifactAuth | None
    """Credentials for downloading the versions' files (a server's), or None."""

    def aliases(self, name: str) -> dict[str, str]:
        """alias -> version number ({} for an unknown model)."""
        ...

    def get(self, name: str, ref: str) -> RegistryVersion:
        """A version by number, alias or artifact version (RegistryError if none)."""
        ...

    def location(self, version: RegistryVersion) -> str:
        """Where workers fetch the version's files: a path or an http(s) URL."""
        ...

    def set_alias(self, name: str, alias: str, number: str) -> None: ...

    def drop_alias(self, name: str, alias: str) -> None: ...

    def remember(self, name: str, key: str, value: str) -> None: ...


def artifact_location(source: str, server: str | None) -> str:
    """A model version's `source` as workers fetch it: a path (embedded: the artifact folder,
    which hosts share) or, for `mlflow-artifacts:` sources, the URL of the `server`'s
    artifact REST API."""
    if source.startswith("file://"):
        return urlsplit(source).path
    if source.startswith("mlflow-artifacts:"):
        if not server:
            raise RegistryError(f"{source} needs an MLflow server (MLFLOW_TRACKING_URI)")
        path = urlsplit(source).path.lstrip("/")
        return f"{server.rstrip('/')}{ARTIFACTS_ROUTE}{path}"
    if "://" in source or source.startswith(("runs:", "models:")):
        raise RegistryError(f"workers cannot fetch {source}: not a path nor served by MLflow")
    return source


def find_version(versions: list[RegistryVersion], name: str, ref: str) -> RegistryVersion:
    """The version `ref` names (number, artifact version or alias), as both registries read it."""
    for version in versions:
        if ref in (version.number, version.artifact_version, *version.aliases):
            return version
    raise RegistryError(f"model {name!r} has no version, alias or artifact {ref!r}")
