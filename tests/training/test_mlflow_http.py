"""The HTTP registry's own behaviour, on a stub that answers as MLflow 3 does: credentials
sent as MLflow's clients send them, MLflow's error answers read, `sync --every` surviving a
refusal. What MLflow itself answers is tested against a real server
(tests/training/test_registry_server.py)."""

from __future__ import annotations

import argparse
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import fakeredis
import pytest

from contract.errors import RegistryError
from training import registry_cli
from training.fetch import ArtifactAuth, read_file
from training.mlflow_http import RestRegistry, auth_headers
from training.registry_types import artifact_location
from training.settings import RegistrySettings

VERSION = {
    "name": "m",
    "version": "2",
    "source": "mlflow-artifacts:/1/abc/artifacts/model",
    "run_id": "abc",
    "creation_timestamp": 1700000000000,
    "tags": [{"key": "artifact_version", "value": "20260101-000000-aaaaaa"}],
    "aliases": ["champion"],
}


class Stub(BaseHTTPRequestHandler):
    # Each test's handler class gets its own (the stub fixture).
    answers: ClassVar[dict[str, tuple[int, dict[str, Any]]]] = {}
    seen: ClassVar[list[tuple[str, str, str | None, bytes]]] = []

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.seen.append((self.command, self.path, self.headers.get("Authorization"), body))
        status, payload = self.answers.get(self.path.split("?")[0], (404, {}))
        raw = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    do_GET = do_POST = do_DELETE = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stub() -> Iterator[tuple[str, type[Stub]]]:
    handler = type("Handler", (Stub,), {"answers": {}, "seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def test_credentials_as_mlflow_clients_send_them() -> None:
    assert auth_headers() == {}
    assert auth_headers(token="t0k") == {"Authorization": "Bearer t0k"}
    assert auth_headers(username="ann", password="s3cret") == {
        "Authorization": "Basic YW5uOnMzY3JldA=="
    }
    assert auth_headers("t0k", "ann", "s3cret") == {"Authorization": "Bearer t0k"}
    assert auth_headers(username="ann") == {}


def test_the_alias_is_read_with_the_token_and_turned_into_the_artifact_url(
    stub: tuple[str, type[Stub]],
) -> None:
    url, handler = stub
    handler.answers["/api/2.0/mlflow/registered-models/alias"] = (200, {"model_version": VERSION})
    rest = RestRegistry(url + "/", auth_headers(token="t0k"))
    version = rest.alias("m", "champion")
    assert version is not None
    assert (version.number, version.artifact_version, version.aliases) == (
        "2",
        "20260101-000000-aaaaaa",
        ("champion",),
    )
    assert (
        rest.location(version) == f"{url}/api/2.0/mlflow-artifacts/artifacts/1/abc/artifacts/model"
    )
    method, path, authorization, _ = handler.seen[-1]
    assert (method, authorization) == ("GET", "Bearer t0k")
    assert path == "/api/2.0/mlflow/registered-models/alias?name=m&alias=champion"


def test_missing_model_or_alias_is_none_and_other_refusals_are_errors(
    stub: tuple[str, type[Stub]],
) -> None:
    url, handler = stub
    rest = RestRegistry(url)
    missing = {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "Registered Model not found"}
    handler.answers["/api/2.0/mlflow/registered-models/get"] = (404, missing)
    assert rest.aliases("m") == {}
    no_alias = {"error_code": "INVALID_PARAMETER_VALUE", "message": "alias champion not found."}
    handler.answers["/api/2.0/mlflow/registered-models/alias"] = (400, no_alias)
    assert rest.alias("m", "champion") is None
    denied = {"error_code": "PERMISSION_DENIED", "message": "no"}
    handler.answers["/api/2.0/mlflow/registered-models/alias"] = (403, denied)
    with pytest.raises(RegistryError, match=r"HTTP 403 PERMISSION_DENIED.*MLFLOW_TRACKING_TOKEN"):
        rest.alias("m", "champion")
    handler.answers["/api/2.0/mlflow/registered-models/alias"] = (200, {"model_version": []})
    with pytest.raises(RegistryError):
        rest.alias("m", "champion")


def test_alias_writes_send_mlflows_json_bodies(stub: tuple[str, type[Stub]]) -> None:
    url, handler = stub
    handler.answers["/api/2.0/mlflow/registered-models/alias"] = (200, {})
    handler.answers["/api/2.0/mlflow/registered-models/get"] = (
        200,
        {"registered_model": {"name": "m", "aliases": [{"alias": "challenger", "version": "1"}]}},
    )
    rest = RestRegistry(url, auth_headers(username="ann", password="pw"))
    rest.set_alias("m", "champion", "2")
    rest.drop_alias("m", "challenger")
    rest.drop_alias("m", "other")  # not set: nothing sent
    writes = [(m, p, json.loads(b)) for m, p, _, b in handler.seen if m != "GET"]
    assert writes == [
        (
            "POST",
            "/api/2.0/mlflow/registered-models/alias",
            {"name": "m", "alias": "champion", "version": "2"},
        ),
        ("DELETE", "/api/2.0/mlflow/registered-models/alias", {"name": "m", "alias": "challenger"}),
    ]
    assert {a for _, _, a, _ in handler.seen} == {"Basic YW5uOnB3"}


def test_an_unreachable_server_is_a_registry_error() -> None:
    rest = RestRegistry("http://127.0.0.1:9", timeout_s=2)
    with pytest.raises(RegistryError, match="cannot reach MLflow"):
        rest.aliases("m")
    with pytest.raises(RegistryError, match="http"):
        RestRegistry("sqlite:///registry.db")


def test_locations_of_each_kind_of_source() -> None:
    assert artifact_location("file:///srv/mlflow/1/abc/artifacts/model", None) == (
        "/srv/mlflow/1/abc/artifacts/model"
    )
    assert artifact_location("/srv/x/model", None) == "/srv/x/model"
    assert artifact_location("mlflow-artifacts:/1/abc/model", "http://h:5000/") == (
        "http://h:5000/api/2.0/mlflow-artifacts/artifacts/1/abc/model"
    )
    for source, server in [
        ("mlflow-artifacts:/1/abc/model", None),
        ("s3://bucket/model", "http://h:5000"),
        ("models:/m-123", "http://h:5000"),
    ]:
        with pytest.raises(RegistryError):
            artifact_location(source, server)


def test_sync_against_a_server_uses_http_with_the_settings_credentials() -> None:
    settings = RegistrySettings(tracking_uri="http://h:5000", tracking_token="t0k")
    registry = registry_cli._sync_registry(settings, Path("unused"))
    assert isinstance(registry, RestRegistry)
    assert registry.headers == {"Authorization": "Bearer t0k"}
    assert "t0k" not in repr(settings)


class _Stop(BaseException):
    pass


def test_sync_once_fails_on_a_refusal_and_every_keeps_polling(
    capsys: pytest.CaptureFixture[str],
) -> None:
    calls: list[int] = []

    def refusing(*_: object) -> None:
        calls.append(1)
        if len(calls) == 3:
            raise _Stop
        raise RegistryError("version 3 is not servable: bad sha256")

    client = fakeredis.FakeRedis()
    once = argparse.Namespace(name="m", every=0.0)
    assert registry_cli._sync(refusing, RestRegistry("http://h"), client, once) == 1
    assert "bad sha256" in capsys.readouterr().err
    every = argparse.Namespace(name="m", every=0.01)
    with pytest.raises(_Stop):
        registry_cli._sync(refusing, RestRegistry("http://h"), client, every)
    assert len(calls) == 3


def test_downloads_carry_credentials_to_their_server_only(
    stub: tuple[str, type[Stub]],
) -> None:
    url, handler = stub
    handler.answers["/srv/model/manifest.json"] = (200, {"name": "m"})
    auth = ArtifactAuth(url, auth_headers(token="t0k"))
    read_file(f"{url}/srv/model", "manifest.json", auth)
    read_file(f"{url}/srv/model", "manifest.json")
    elsewhere = ArtifactAuth("http://mlflow.example:5000", auth_headers(token="t0k"))
    read_file(f"{url}/srv/model", "manifest.json", elsewhere)
    # A server whose URL is a prefix of the download's host (port 1 vs 1234) is another host.
    read_file(f"{url}/srv/model", "manifest.json", ArtifactAuth(url[:-1], {"Authorization": "x"}))
    assert [a for _, _, a, _ in handler.seen] == ["Bearer t0k", None, None, None]


def test_worker_settings_read_mlflows_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.settings import WorkerSettings

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_TOKEN", "INFERENCE_ARTIFACT_SERVER"):
        monkeypatch.delenv(name, raising=False)
    assert WorkerSettings().artifact_auth is None
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "t0k")
    assert WorkerSettings().artifact_auth is None  # no server: sent nowhere
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    settings = WorkerSettings()
    assert settings.artifact_auth == ArtifactAuth(
        "http://mlflow:5000", {"Authorization": "Bearer t0k"}
    )
    assert "t0k" not in repr(settings) and "t0k" not in repr(settings.artifact_auth)
