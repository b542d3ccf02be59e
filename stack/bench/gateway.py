"""The HTTP gateway, measured as its users call it: one `python -m gateway` process started
for the run against the same Redis, the seed's `POST /api/v1/predict` over HTTP/1.1
keep-alive. Sequential round trips alternate with the direct client's, so their ratio sees
the same machine; sustained throughput keeps 64 connections busy."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from producer.client import Client
from stack.bench.config import latency_summary
from stack.bench.jobs import forget
from stack.embedded_redis import free_port
from stack.processes import celery_env, gateway_process, wait_http

CONNECTIONS = 64
WARMUP_PER_CONNECTION = 4
READY_TIMEOUT_S = 30.0


@contextlib.contextmanager
def gateway_server(client: Client, log_path: Path) -> Iterator[str]:
    """A gateway on a free loopback port, for the client's Redis; its base URL."""
    settings = client.settings
    env = celery_env(settings.redis_url)
    for name, value in (
        ("BROKER_URL", settings.broker_url),
        ("RESULT_BACKEND", settings.result_backend),
    ):
        env.pop(f"INFERENCE_{name}", None)
        if value:
            env[f"INFERENCE_{name}"] = value
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    process = gateway_process(env, log_path, port).start()
    try:
        wait_http(process, f"{base}/openapi.json", READY_TIMEOUT_S)
        yield base
    finally:
        process.stop()


async def _sequential(
    client: Client, base: str, rows: list[list[float]], queue: str, warmup: int
) -> tuple[list[float], list[float], int]:
    """One row through our client, the next through the gateway, in turn: both sides see
    the same moments of a noisy machine. The direct client blocks this loop, which runs
    nothing else meanwhile."""
    direct_s: list[float] = []
    http_s: list[float] = []
    failed = 0
    ids: list[str] = []
    conn = await _Connection.open(base)
    try:
        for i, row in enumerate(rows):
            start = time.perf_counter()
            ids.append(client.submit(row, queue))
            client.wait(ids[-1])
            direct = time.perf_counter() - start
            start = time.perf_counter()
            status, answer = await conn.post("/api/v1/predict", {"data": row})
            elapsed = time.perf_counter() - start
            if status != 200:
                failed += 1
            else:
                ids.append(str(answer.get("task_id", "")))
            if i >= warmup:
                direct_s.append(direct)
                http_s.append(elapsed)
    finally:
        await conn.close()
    forget(client, [t for t in ids if t])
    return direct_s, http_s, failed


class _Connection:
    """One HTTP/1.1 keep-alive connection that POSTs JSON and reads the answer.

    Written here rather than taken from httpx: at 64 connections httpx's pool cost this
    machine ~5 ms of CPU a request (measured: 10 s of client CPU for 2,000 requests), so
    the load generator, not the gateway, set the pace. This one costs tens of
    microseconds: it sends a request and reads a status line, headers and a body of
    Content-Length bytes (the gateway answers with a length, never chunked)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str):
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, base: str) -> _Connection:
        host, _, port = base.removeprefix("http://").partition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        return cls(reader, writer, f"{host}:{port}")

    async def post(self, path: str, payload: Any) -> tuple[int, dict[str, Any]]:
        body = json.dumps(payload).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        answer = json.loads(await self.reader.readexactly(length)) if length else {}
        return status, answer

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


async def _sustained(
    base: str, rows: list[list[float]]
) -> tuple[float, list[float], int, list[str]]:
    latencies: list[float] = []
    failed = 0
    ids: list[str] = []
    next_row = iter(range(len(rows)))
    connections = [await _Connection.open(base) for _ in range(CONNECTIONS)]

    async def serve(conn: _Connection) -> None:
        nonlocal failed
        for i in next_row:
            start = time.perf_counter()
            status, answer = await conn.post("/api/v1/predict", {"data": rows[i]})
            latencies.append(time.perf_counter() - start)
            if status == 200:
                ids.append(str(answer.get("task_id", "")))
            else:
                failed += 1

    # Untimed: every connection's first requests, and the gateway's first of everything
    # (its model info, its Redis connections, uvicorn's per-connection set-up).
    warm = iter(range(min(WARMUP_PER_CONNECTION * CONNECTIONS, len(rows))))

    async def warm_up(conn: _Connection) -> None:
        for i in warm:
            await conn.post("/api/v1/predict", {"data": rows[i]})

    await asyncio.gather(*(warm_up(c) for c in connections))
    start = time.perf_counter()
    try:
        await asyncio.gather(*(serve(c) for c in connections))
    finally:
        seconds = time.perf_counter() - start
        for conn in connections:
            await conn.close()
    return seconds, latencies, failed, ids


def gateway(
    client: Client,
    single: NDArray[np.float64],
    sustained: NDArray[np.float64],
    queue: str,
    log_path: Path,
    warmup: int,
) -> dict[str, Any]:
    """The gateway's round trips next to the direct client's, and its sustained rate."""
    if importlib.util.find_spec("fastapi") is None:
        return {"available": False, "reason": "the gateway extra is not installed"}
    with gateway_server(client, log_path) as base:
        direct_s, http_s, seq_failed = asyncio.run(
            _sequential(client, base, single.tolist(), queue, warmup)
        )
        seconds, latencies, failed, ids = asyncio.run(_sustained(base, sustained.tolist()))
    forget(client, [t for t in ids if t])
    jobs = len(sustained)
    return {
        "available": True,
        "connections": CONNECTIONS,
        "sequential": {
            "gateway": latency_summary(http_s),
            "direct_client": latency_summary(direct_s),
            "failed": seq_failed,
        },
        "sustained": {
            "jobs": jobs,
            "seconds": seconds,
            "jobs_per_s": jobs / seconds if seconds else None,
            "failed": failed,
            "latency": latency_summary(latencies),
        },
        "log": str(log_path),
    }
