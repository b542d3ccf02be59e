"""The body limit, in process: a declared length over it is refused unread, a streamed body as
soon as it passes it, and the app never holds more than the limit."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
from starlette.types import Message, Receive, Scope, Send

from gateway.limits import BodyLimitMiddleware
from gateway.problems import PROBLEM_MEDIA_TYPE
from tests.gateway.fakes import FakeClient, app_with

LIMIT = 1000


class Echo:
    """An ASGI app that reads the whole body and answers its length; records what it read."""

    def __init__(self) -> None:
        self.called = False
        self.read = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.called = True
        more = True
        while more:
            message = await receive()
            self.read += len(message.get("body", b""))
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(self.read).encode()})


def post(app: Any, content: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            return await client.post("/api/v1/jobs", content=content, headers=headers)

    return asyncio.run(go())


async def chunks(count: int, size: int) -> AsyncIterator[bytes]:
    for _ in range(count):
        yield b" " * size


def assert_413(response: httpx.Response) -> None:
    assert response.status_code == 413
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE
    doc = response.json()
    assert doc["type"] == "about:blank" and doc["status"] == 413
    assert f"exceeds {LIMIT} bytes" in doc["detail"]


def test_a_declared_length_over_the_limit_is_refused_before_the_app_runs() -> None:
    echo = Echo()
    assert_413(post(BodyLimitMiddleware(echo, LIMIT), b"x" * (LIMIT + 1)))
    assert not echo.called


def test_a_streamed_body_is_refused_once_it_passes_the_limit() -> None:
    echo = Echo()
    # No Content-Length: sent chunked, 100 chunks of 100 bytes.
    assert_413(post(BodyLimitMiddleware(echo, LIMIT), chunks(100, 100)))
    assert echo.called and echo.read <= LIMIT


def test_bodies_up_to_the_limit_pass_whole() -> None:
    for content in (b"", b"x" * LIMIT, chunks(10, 100)):
        echo = Echo()
        response = post(BodyLimitMiddleware(echo, LIMIT), content)
        assert response.status_code == 200
        assert int(response.text) == echo.read


def test_the_app_answers_413_even_where_fastapi_would_answer_its_own_error() -> None:
    # FastAPI turns an error while it reads a body into a 400 of its own; the 413 wins.
    app = app_with(FakeClient(), gateway_max_body_bytes=LIMIT)
    headers = {"content-type": "application/json"}
    assert_413(post(app, b'{"rows": [' + b"1.0, " * 1000 + b"1.0]}", headers))
    assert_413(post(app, chunks(100, 100), headers))
    ok = post(app, json.dumps({"features": [1, 2, 3, 4, 5]}).encode(), headers)
    assert ok.status_code == 202


def test_other_scopes_pass_through() -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    async def nothing() -> Message:
        raise AssertionError("the middleware read from a lifespan scope")

    async def drop(message: Message) -> None:
        raise AssertionError("the middleware sent into a lifespan scope")

    asyncio.run(BodyLimitMiddleware(app, LIMIT)({"type": "lifespan"}, nothing, drop))
    assert seen == ["lifespan"]
