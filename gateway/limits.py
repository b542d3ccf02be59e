"""The request body limit, enforced while the body arrives: an ASGI middleware.

A body whose Content-Length is over the limit is refused before a byte of it is read; one
sent without a length (chunked) is counted as it is read and refused as soon as it passes
the limit. Either way the answer is a 413 problem document and the body is never held
whole: the server (uvicorn) discards the rest of it and the connection serves on.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.problems import Problem


class BodyTooLarge(Exception):
    """Raised into the app from `receive` once the body passes the limit, so that it stops
    reading; the middleware has answered 413 already."""


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def problem(self) -> Problem:
        return Problem(
            413,
            f"the request body exceeds {self.max_bytes} bytes "
            "(INFERENCE_GATEWAY_MAX_BODY_BYTES); send a smaller batch",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self.problem().response()(scope, receive, send)
            return

        received = 0
        started = False
        refused = False

        async def limited_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    if not started:
                        refused = True
                        await self.problem().response()(scope, receive, send)
                    raise BodyTooLarge(f"request body over {self.max_bytes} bytes")
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            # The app may turn BodyTooLarge into an answer of its own (FastAPI answers a
            # body it could not read with 400): the 413 has gone out, so that one is dropped.
            if refused:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyTooLarge:
            if not refused:
                raise


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                # The server refuses a malformed length itself before the app is called.
                return None
    return None
