"""Fetch a served version's artifact folder into a local cache, checked before it is used.

The folder is read from a path (a folder shared by the hosts) or over HTTP (MLflow's
artifact REST API), downloaded into a temporary folder beside its place in the cache,
checked (every file's sha256 against the serving decision, then the manifest's own
checks) and renamed into place in one step: two processes fetching the same version at
once each build their own copy, and a reader never sees a half-written one.

Standard library and pydantic only, so that workers use it without MLflow. Credentials for
an MLflow server (ArtifactAuth) go to that server's URLs only, never to another host a
decision might name.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import shutil
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from contract.errors import ArtifactUnreachable, ModelArtifactError
from contract.schemas import ServedVersion
from training.artifact import MANIFEST_FILE, Manifest, Variant, load_manifest, verified_model_path

HTTP_TIMEOUT_S = 30.0
# A model file is read whole into memory before it is checked: bounded, so a wrong URL
# cannot fill it.
MAX_FILE_BYTES = 2 * 1024**3


def auth_headers(
    token: str | None = None, username: str | None = None, password: str | None = None
) -> dict[str, str]:
    """The Authorization header MLflow's clients send for these credentials (none: {}):
    MLFLOW_TRACKING_TOKEN as a bearer token, else basic auth."""
    if token:
        return {"Authorization": f"Bearer {token}"}
    if username and password:
        pair = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
        return {"Authorization": f"Basic {pair}"}
    return {}


@dataclass(frozen=True)
class ArtifactAuth:
    """Headers sent with downloads from one MLflow server, and to no other URL."""

    server: str
    headers: dict[str, str] = field(default_factory=dict, repr=False)

    def for_url(self, url: str) -> dict[str, str]:
        return dict(self.headers) if url.startswith(self.server.rstrip("/") + "/") else {}


def is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def read_file(location: str, name: str, auth: ArtifactAuth | None = None) -> bytes:
    """File `name` of the artifact folder at `location`."""
    if is_url(location):
        url = f"{location.rstrip('/')}/{name}"
        request = urllib.request.Request(url, headers=auth.for_url(url) if auth else {})
        try:
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
                data = response.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise ArtifactUnreachable(f"cannot download {url}: {exc}") from None
        if len(data) > MAX_FILE_BYTES:
            raise ModelArtifactError(f"{url} is larger than {MAX_FILE_BYTES} bytes")
        return data
    path = Path(location.removeprefix("file://")) / name
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ArtifactUnreachable(f"cannot read {path}: {exc}") from None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_hashes(location: str, auth: ArtifactAuth | None = None) -> dict[str, str]:
    """sha256 of the manifest and of every model file it names, after checking the model
    files against the manifest: what a serving decision records."""
    raw = read_file(location, MANIFEST_FILE, auth)
    manifest = _manifest(raw, location)
    hashes = {MANIFEST_FILE: sha256_bytes(raw)}
    for entry in manifest.files.values():
        actual = sha256_bytes(read_file(location, entry.path, auth))
        if actual != entry.sha256:
            raise ModelArtifactError(
                f"{entry.path} at {location} has sha256 {actual[:12]}..., its manifest says "
                f"{entry.sha256[:12]}...: refusing a tampered or half-copied model"
            )
        hashes[entry.path] = actual
    return hashes


def fetch_version(
    served: ServedVersion,
    cache_dir: Path,
    name: str,
    auth: ArtifactAuth | None = None,
    *,
    check_files: bool = True,
) -> tuple[Path, Manifest]:
    """The checked local copy of `served`: <cache_dir>/<name>/<version>/ and its manifest,
    fetched first if the cache does not hold it. Its manifest is always checked against the
    decision; its model files against the manifest too unless `check_files` is False: a
    loader that checks each file it opens (worker.model) then hashes each file once, not
    every variant twice."""
    model_dir = cache_dir
    final = model_dir / name / served.version
    if not final.is_dir():
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = final.parent / f".fetch-{os.getpid()}-{secrets.token_hex(4)}"
        staging.mkdir()
        try:
            for filename, expected in sorted(served.sha256.items()):
                if Path(filename).name != filename:
                    raise ModelArtifactError(f"refusing the file name {filename!r}")
                data = read_file(served.location, filename, auth)
                actual = sha256_bytes(data)
                if actual != expected:
                    raise ModelArtifactError(
                        f"{filename} of {name}/{served.version} has sha256 {actual[:12]}..., "
                        f"the serving decision says {expected[:12]}...: not served"
                    )
                (staging / filename).write_bytes(data)
            try:
                staging.rename(final)
            except OSError:
                if not final.is_dir():  # not another process's copy, renamed first
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    version_dir, manifest = load_manifest(model_dir, name, served.version)
    if sha256_bytes((version_dir / MANIFEST_FILE).read_bytes()) != served.sha256.get(MANIFEST_FILE):
        raise ModelArtifactError(
            f"the cached manifest of {name}/{served.version} differs from the serving decision"
        )
    if check_files:
        for variant in manifest.files:
            verified_model_path(version_dir, manifest, cast(Variant, variant))
    return version_dir, manifest


def _manifest(raw: bytes, location: str) -> Manifest:
    try:
        return Manifest.model_validate_json(raw)
    except ValueError as exc:
        raise ModelArtifactError(f"the manifest at {location} is invalid: {exc}") from None
