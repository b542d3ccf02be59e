"""The token, and the refusal to serve beyond loopback without one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import SecretStr

from gateway.auth import exposure_error, is_loopback
from gateway.settings import GatewaySettings
from tests.gateway.fakes import FakeClient, http
from tests.gateway.support import REPO, problem

TOKEN = "t0ken-for-the-tests"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.20", False),
        ("gateway.internal", False),
        ("", False),
    ],
)
def test_only_loopback_hosts_count_as_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_without_a_token_only_loopback_may_be_served() -> None:
    open_settings = GatewaySettings(gateway_token=None)
    message = exposure_error("0.0.0.0", open_settings)
    assert message is not None and "INFERENCE_GATEWAY_TOKEN" in message
    assert exposure_error("127.0.0.1", open_settings) is None
    assert exposure_error("0.0.0.0", GatewaySettings(gateway_token=SecretStr(TOKEN))) is None


def run_main(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("INFERENCE_GATEWAY_")}
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=REPO,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_python_m_gateway_refuses_a_public_host_without_a_token() -> None:
    proc = run_main("--host", "0.0.0.0", "--port", "1")
    assert proc.returncode == 2
    assert "refusing to serve on 0.0.0.0 without a token" in proc.stderr
    assert "Uvicorn running" not in proc.stderr + proc.stdout


def test_python_m_gateway_refuses_bad_settings_with_their_name() -> None:
    proc = run_main("--port", "1", INFERENCE_GATEWAY_MAX_BODY_BYTES="0")
    assert proc.returncode == 2
    assert "invalid settings" in proc.stderr and "gateway_max_body_bytes" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_python_m_gateway_help_names_its_options() -> None:
    proc = run_main("--help")
    assert proc.returncode == 0
    for option in ("--host", "--port", "--workers", "127.0.0.1", "8000"):
        assert option in proc.stdout


def test_with_a_token_the_api_wants_it_and_the_docs_do_not() -> None:
    client = http(FakeClient(), gateway_token=TOKEN)
    response = client.get("/api/v1/model")
    problem(response, 401, "Unauthorized")
    assert response.headers["www-authenticate"] == 'Bearer realm="queue-inference"'

    response = client.get("/api/v1/model", headers={"Authorization": "Bearer wrong"})
    problem(response, 401, "Unauthorized")
    assert response.headers["www-authenticate"].endswith('error="invalid_token"')
    # The scheme is Bearer's alone; the token alone is not enough.
    for header in (TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}"):
        assert client.get("/api/v1/model", headers={"Authorization": header}).status_code == 401

    assert client.get("/api/v1/model", headers={"Authorization": f"Bearer {TOKEN}"}).json()[
        "name"
    ] == ("friedman1")
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/docs").status_code == 200


def test_the_token_is_checked_before_the_request_is() -> None:
    client = http(FakeClient(), gateway_token=TOKEN)
    # A malformed id, without the token: 401, not a 422 that would tell what the API takes.
    assert client.get("/api/v1/jobs/a%20b").status_code == 401
    authorized = client.get("/api/v1/jobs/a%20b", headers={"Authorization": f"Bearer {TOKEN}"})
    problem(authorized, 422, "InvalidInput")


def test_without_a_token_the_api_is_open() -> None:
    assert http(FakeClient()).get("/api/v1/model").status_code == 200
