"""create_app: the gateway's FastAPI app, built on demand (importing this module builds nothing)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import Depends, FastAPI

from contract.errors import RedisUnreachable
from gateway import routes
from gateway.auth import token_check
from gateway.limits import BodyLimitMiddleware
from gateway.problems import PROBLEM_MEDIA_TYPE, install
from gateway.service import Gateway
from gateway.settings import GatewaySettings
from producer import AsyncClient
from producer.connections import check_redis

log = logging.getLogger(__name__)

DESCRIPTION = """\
HTTP in front of the inference queues: the seed's `POST /api/v1/predict`, batches,
explanations, and jobs to enqueue now and read later; each may pin a model version or carry a
routing key for a canary split. Every error is a problem document (RFC 9457,
`application/problem+json`) whose `title` is the task contract's error name.

Under /api/v1, send `Authorization: Bearer <token>` when the gateway has a token
(`INFERENCE_GATEWAY_TOKEN`).
"""

TAGS = [
    {"name": "predict", "description": "Enqueue, wait, answer: the result in the response."},
    {
        "name": "explain",
        "description": "Why: each row's prediction and its SHAP contribution per feature.",
    },
    {"name": "jobs", "description": "Enqueue now (202), read the status later, or long-poll."},
    {"name": "model", "description": "What the workers serve."},
]


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    """The gateway app; `settings` from the environment when not given. Its AsyncClient is
    opened when the server starts the app and closed when it stops it."""
    settings = settings or GatewaySettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(_check_redis, settings)
        client = AsyncClient(settings)
        app.state.gateway = Gateway(settings, client)
        try:
            yield
        finally:
            await client.close()

    app = FastAPI(
        title="queue-inference gateway",
        version=_version(),
        description=DESCRIPTION,
        openapi_tags=TAGS,
        lifespan=lifespan,
    )
    install(app, settings.gateway_retry_after_s)
    app.include_router(routes.router, dependencies=[Depends(token_check(settings))])
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.gateway_max_body_bytes)
    app.openapi = _with_problem_media(app.openapi)  # type: ignore[method-assign]
    return app


def _check_redis(settings: GatewaySettings) -> None:
    """Refuse to start with credentials or a certificate Redis rejects (no retry can fix
    them); start anyway when Redis is merely down: requests get 503 until it is back, and
    the health route tells a load balancer so."""
    for role, url in (("broker", settings.broker), ("result backend", settings.backend)):
        try:
            check_redis(url, settings, role)
        except RedisUnreachable as exc:
            log.warning("starting without Redis: %s", exc)


def _with_problem_media(build: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """The OpenAPI schema with every error response filed under application/problem+json,
    the media type the gateway answers errors with (FastAPI files every model under
    application/json)."""

    def openapi() -> dict[str, Any]:
        schema = build()
        operations = (op for path in schema.get("paths", {}).values() for op in path.values())
        for operation in operations:
            for response in operation.get("responses", {}).values():
                content = response.get("content", {})
                ref = content.get("application/json", {}).get("schema", {}).get("$ref", "")
                if ref.endswith("/ProblemDocument"):
                    content[PROBLEM_MEDIA_TYPE] = content.pop("application/json")
        return schema

    return openapi


def _version() -> str:
    try:
        return version("queue-inference")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "0+unknown"
