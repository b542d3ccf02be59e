"""An MLflow server's model registry over plain HTTP (its REST API), without MLflow.

`python -m training sync` runs where MLflow is not installed (beside the workers, in the
gateway's image): it reads the aliases and versions here, then checks and publishes the
decision through training.promote, as `promote` does with MLflow's client. Endpoints
(MLflow 3.x, `mlflow/server/handlers.py`):

- GET  /api/2.0/mlflow/registered-models/alias?name=N&alias=A   the version an alias names
- GET  /api/2.0/mlflow/registered-models/get?name=N              its aliases and tags
- GET  /api/2.0/mlflow/model-versions/get?name=N&version=V       one version
- GET  /api/2.0/mlflow/model-versions/search?filter=name='N'     every version
- POST/DELETE /api/2.0/mlflow/registered-models/alias, POST .../registered-models/set-tag

Credentials as MLflow's clients send them: MLFLOW_TRACKING_TOKEN as a bearer token, else
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD as basic auth.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from contract.errors import RegistryError
from training.fetch import ArtifactAuth, auth_headers
from training.registry_types import (
    TAG_ARTIFACT_VERSION,
    RegistryVersion,
    artifact_location,
    find_version,
)

__all__ = ["NotFound", "RestRegistry", "auth_headers"]

API = "/api/2.0/mlflow"
HTTP_TIMEOUT_S = 30.0
# A JSON answer larger than this is not MLflow's: bounded, so a wrong URL cannot fill memory.
MAX_ANSWER_BYTES = 64 * 1024**2
NOT_FOUND = "RESOURCE_DOES_NOT_EXIST"


class NotFound(RegistryError):
    """MLflow answered RESOURCE_DOES_NOT_EXIST (no such model, version or alias)."""


class RestRegistry:
    """One MLflow server's registry, through its REST API (implements RegistryLike)."""

    def __init__(
        self,
        server: str,
        headers: dict[str, str] | None = None,
        timeout_s: float = HTTP_TIMEOUT_S,
    ) -> None:
        if not server.startswith(("http://", "https://")):
            raise RegistryError(f"the HTTP registry needs an http(s) MLflow server, not {server!r}")
        self.server = server.rstrip("/")
        self.headers = dict(headers or {})
        self.timeout_s = timeout_s
        self.artifact_auth: ArtifactAuth | None = ArtifactAuth(self.server, self.headers)

    # -- reading ---------------------------------------------------------------------------

    def alias(self, name: str, alias: str) -> RegistryVersion | None:
        """The version `alias` names; None when the model or the alias does not exist."""
        try:
            answer = self._call("GET", "/registered-models/alias", {"name": name, "alias": alias})
        except NotFound:
            return None
        return self._version(answer["model_version"])

    def aliases(self, name: str) -> dict[str, str]:
        try:
            model = self._call("GET", "/registered-models/get", {"name": name})["registered_model"]
        except NotFound:
            return {}
        return {str(a["alias"]): str(a["version"]) for a in model.get("aliases", [])}

    def get(self, name: str, ref: str) -> RegistryVersion:
        if ref.isdigit():
            try:
                answer = self._call("GET", "/model-versions/get", {"name": name, "version": ref})
                return self._version(answer["model_version"])
            except NotFound:
                pass
        else:
            by_alias = self.alias(name, ref)
            if by_alias is not None:
                return by_alias
        return find_version(self.versions(name), name, ref)

    def versions(self, name: str) -> list[RegistryVersion]:
        """Every registered version of `name`, oldest first (without their runs' metrics)."""
        found: list[dict[str, Any]] = []
        page: str | None = None
        while True:
            query = {"filter": f"name = '{name}'", **({"page_token": page} if page else {})}
            answer = self._call("GET", "/model-versions/search", query)
            found.extend(answer.get("model_versions", []))
            page = answer.get("next_page_token")
            if not page:
                break
        by_number: dict[str, list[str]] = {}
        for alias, number in self.aliases(name).items():
            by_number.setdefault(number, []).append(alias)
        rows = [self._version(mv, by_number.get(str(mv["version"]))) for mv in found]
        return sorted(rows, key=lambda v: int(v.number))

    def location(self, version: RegistryVersion) -> str:
        return artifact_location(version.source, self.server)

    # -- writing (promote's alias moves; `sync` makes none unless a challenger is dropped) --

    def set_alias(self, name: str, alias: str, number: str) -> None:
        self._call(
            "POST",
            "/registered-models/alias",
            body={"name": name, "alias": alias, "version": number},
        )

    def drop_alias(self, name: str, alias: str) -> None:
        if alias in self.aliases(name):
            self._call("DELETE", "/registered-models/alias", body={"name": name, "alias": alias})

    def remember(self, name: str, key: str, value: str) -> None:
        self._call(
            "POST", "/registered-models/set-tag", body={"name": name, "key": key, "value": value}
        )

    # -- HTTP ------------------------------------------------------------------------------

    def _call(
        self,
        method: str,
        path: str,
        query: dict[str, str] | None = None,
        body: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        url = f"{self.server}{API}{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        headers = {"Accept": "application/json", **self.headers}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = response.read(MAX_ANSWER_BYTES + 1)
        except urllib.error.HTTPError as exc:
            raise _error(exc, method, path) from None
        except OSError as exc:
            raise RegistryError(f"cannot reach MLflow at {self.server}: {exc}") from None
        if len(raw) > MAX_ANSWER_BYTES:
            raise RegistryError(f"{method} {path}: an answer over {MAX_ANSWER_BYTES} bytes")
        try:
            answer = json.loads(raw or b"{}")
        except ValueError:
            raise RegistryError(f"{method} {path}: MLflow's answer is not JSON") from None
        if not isinstance(answer, dict):
            raise RegistryError(f"{method} {path}: MLflow's answer is not a JSON object")
        return answer

    @staticmethod
    def _version(mv: Any, aliases: list[str] | None = None) -> RegistryVersion:
        try:
            tags = {str(t["key"]): str(t.get("value", "")) for t in mv.get("tags", [])}
            return RegistryVersion(
                number=str(mv["version"]),
                artifact_version=tags.get(TAG_ARTIFACT_VERSION, ""),
                source=str(mv.get("source", "")),
                created_ms=int(mv.get("creation_timestamp") or 0),
                run_id=mv.get("run_id") or None,
                aliases=tuple(sorted(aliases if aliases is not None else mv.get("aliases", []))),
                metrics={},
            )
        except (AttributeError, KeyError, TypeError, ValueError):
            raise RegistryError(f"MLflow's model version is not one: {str(mv)[:200]}") from None


def _error(exc: urllib.error.HTTPError, method: str, path: str) -> RegistryError:
    try:
        detail = json.loads(exc.read(64 * 1024) or b"{}")
    except (OSError, ValueError):
        detail = {}
    code = detail.get("error_code", "") if isinstance(detail, dict) else ""
    message = detail.get("message", exc.reason) if isinstance(detail, dict) else exc.reason
    text = f"MLflow refused {method} {path}: HTTP {exc.code} {code} {message}".rstrip()
    if exc.code in (401, 403):
        text += " (credentials: MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME/PASSWORD)"
    # MLflow 3 answers an alias missing on an existing model with INVALID_PARAMETER_VALUE
    # ("Registered model alias X not found"), a missing model with RESOURCE_DOES_NOT_EXIST.
    missing = code == NOT_FOUND or (
        code == "INVALID_PARAMETER_VALUE" and "not found" in str(message).lower()
    )
    return NotFound(text) if missing else RegistryError(text)
