"""Bearer-token authentication, and the rule that an open gateway stays on loopback."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gateway.problems import Problem
from gateway.settings import GatewaySettings

REALM = "queue-inference"

_bearer = HTTPBearer(
    auto_error=False,
    description="INFERENCE_GATEWAY_TOKEN, when the gateway is started with one",
)


def is_loopback(host: str) -> bool:
    """Whether binding `host` serves this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        # A host name other than localhost may resolve to anything.
        return False


def exposure_error(host: str, settings: GatewaySettings) -> str | None:
    """Why the gateway must not serve on `host` with `settings`, or None when it may."""
    if settings.gateway_token is None and not is_loopback(host):
        return (
            f"refusing to serve on {host} without a token: anyone who can reach it could "
            "enqueue jobs. Set INFERENCE_GATEWAY_TOKEN, or serve on a loopback host "
            "(127.0.0.1, ::1, localhost)."
        )
    return None


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _unauthorized(detail: str, error: str | None) -> Problem:
    challenge = f'Bearer realm="{REALM}"'
    if error:
        challenge += f', error="{error}"'
    return Problem(401, detail, headers={"WWW-Authenticate": challenge})


def token_check(
    settings: GatewaySettings,
) -> Callable[[HTTPAuthorizationCredentials | None], Awaitable[None]]:
    """The dependency that guards /api/v1: it lets every request through when no token is
    configured, and otherwise only one with `Authorization: Bearer <the token>`."""
    token = settings.gateway_token
    expected = _digest(token.get_secret_value()) if token is not None else None

    async def require_token(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> None:
        if expected is None:
            return
        if credentials is None:
            raise _unauthorized("send Authorization: Bearer <token>", None)
        # Digests compared in constant time: how long a wrong token takes to refuse tells
        # nothing of the right one, not even its length.
        if not hmac.compare_digest(_digest(credentials.credentials), expected):
            raise _unauthorized("the token is not valid", "invalid_token")

    return require_token
