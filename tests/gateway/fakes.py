"""An app whose AsyncClient is replaced by canned answers: how the routes turn the client's
answers and errors into HTTP, checked without Redis or workers."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI

from contract.schemas import ModelInfo
from gateway.app import create_app
from gateway.service import Gateway
from gateway.settings import GatewaySettings
from producer import TaskStatus

TASK_ID = "5f0c6a3e-7d1b-4e0f-9a51-2f9d8c3b7e10"

INFO = ModelInfo(
    name="friedman1",
    version="v1",
    n_features=5,
    feature_names=[f"x{i}" for i in range(5)],
    max_batch_rows=100,
)

RESULT: dict[str, Any] = {
    "prediction": 12.5,
    "batch_size": 3,
    "model_name": "friedman1",
    "model_version": "v1",
    "provider": "CPUExecutionProvider",
    "device": "cpu",
    "hostname": "cpu1@host",
    "latency": {"queue_wait_ms": 1.5, "inference_ms": 0.2, "task_ms": 0.3},
}


@dataclass
class FakeClient:
    """Answers as AsyncClient would, from what a test sets; records what it was asked."""

    info: ModelInfo | None = field(default_factory=lambda: INFO)
    result: dict[str, Any] = field(default_factory=lambda: dict(RESULT))
    submit_error: Exception | None = None
    wait_error: Exception | None = None
    report: dict[str, Any] | None = None
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    routes: list[dict[str, str | None]] = field(default_factory=list)
    """Each submit's model_version and routing_key, in order."""

    async def model_info(self, queue: str = "cpu", refresh: bool = False) -> ModelInfo | None:
        self.calls.append(("model_info", queue, refresh))
        return self.info

    async def _submitted(self, *call: Any) -> str:
        self.calls.append(call)
        if self.submit_error is not None:
            raise self.submit_error
        return TASK_ID

    def _routed(self, model_version: str | None, routing_key: str | None) -> None:
        self.routes.append({"model_version": model_version, "routing_key": routing_key})

    async def submit(
        self,
        features: Sequence[float],
        queue: str = "cpu",
        *,
        model_version: str | None = None,
        routing_key: str | None = None,
    ) -> str:
        self._routed(model_version, routing_key)
        return await self._submitted("submit", list(features), queue)

    async def submit_batch(
        self,
        rows: Sequence[Sequence[float]],
        queue: str = "cpu",
        *,
        model_version: str | None = None,
        routing_key: str | None = None,
    ) -> str:
        self._routed(model_version, routing_key)
        return await self._submitted("submit_batch", [list(r) for r in rows], queue)

    async def submit_explain(
        self,
        rows: Sequence[Sequence[float]],
        queue: str = "cpu",
        *,
        model_version: str | None = None,
        routing_key: str | None = None,
    ) -> str:
        self._routed(model_version, routing_key)
        return await self._submitted("submit_explain", [list(r) for r in rows], queue)

    async def submit_batch_f32(
        self,
        rows_f32: str,
        n_features: int,
        queue: str = "cpu",
        *,
        model_version: str | None = None,
        routing_key: str | None = None,
    ) -> str:
        self._routed(model_version, routing_key)
        return await self._submitted("submit_batch_f32", rows_f32, n_features, queue)

    async def wait(self, task_id: str, timeout: float | None = None) -> dict[str, Any]:
        self.calls.append(("wait", task_id, timeout))
        if self.wait_error is not None:
            raise self.wait_error
        return self.result

    async def status(self, task_id: str) -> TaskStatus:
        self.calls.append(("status", task_id))
        return TaskStatus(task_id=task_id, state="PENDING")

    async def health(self) -> dict[str, Any] | None:
        return self.report

    async def close(self) -> None:
        pass


def app_with(fake: FakeClient, **settings: Any) -> FastAPI:
    """The gateway app, serving with `fake` as its client (its lifespan, which would open a
    real one, is not run)."""
    config = GatewaySettings(redis_url="redis://127.0.0.1:1/0", **settings)
    app = create_app(config)
    app.state.gateway = Gateway(config, fake)  # type: ignore[arg-type]
    return app


class Http:
    """A synchronous HTTP client of an app, in process (httpx's ASGI transport): each request
    runs on a loop of its own, as the fakes hold nothing bound to one."""

    def __init__(self, app: FastAPI, root_path: str = "") -> None:
        self.app = app
        self.root_path = root_path

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        async def send() -> httpx.Response:
            transport = httpx.ASGITransport(
                app=self.app, root_path=self.root_path, raise_app_exceptions=False
            )
            async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
                return await c.request(method, url, **kwargs)

        return asyncio.run(send())

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)


def http(fake: FakeClient, root_path: str = "", **settings: Any) -> Http:
    return Http(app_with(fake, **settings), root_path)
