"""The asyncio client against the sync one: the same single-row jobs sent with send_many and
collected with iter_finished, from one event loop or from plain Python, in alternating
rounds; and how late a 1 ms ticker on the same loop runs meanwhile (a blocked loop shows
up as lag)."""

from __future__ import annotations

import asyncio
import gc
import itertools
import time
from typing import Any

import numpy as np
from numpy.typing import NDArray

from contract.names import TASK_PREDICT, result_key
from producer import AsyncClient, Client
from stack.bench.jobs import forget

ROUNDS = 2
SEND_CHUNK = 1_000
"""Jobs per send_many call: one LPUSH each, as a producer streaming rows would send them."""
TICK_S = 0.001


def _kwargs(rows: list[list[float]]) -> list[dict[str, Any]]:
    return [{"features": row} for row in rows]


def _sync_round(client: Client, rows: list[list[float]], queue: str) -> tuple[float, int]:
    start = time.perf_counter()
    ids: list[str] = []
    for i in range(0, len(rows), SEND_CHUNK):
        ids += client.send_many(TASK_PREDICT, _kwargs(rows[i : i + SEND_CHUNK]), queue)
    failed = sum(s.state != "SUCCESS" for s in client.iter_finished(ids))
    elapsed = time.perf_counter() - start
    forget(client, ids)
    return elapsed, failed


async def _async_round(
    client: AsyncClient, rows: list[list[float]], queue: str
) -> tuple[float, int, list[tuple[float, float]]]:
    lags: list[tuple[float, float]] = []

    async def ticker() -> None:
        while True:
            before, cpu = time.perf_counter(), time.thread_time()
            await asyncio.sleep(TICK_S)
            # How late, and how much of that this thread was computing: a loop held by
            # code on it computes all along, a process the OS left waiting for a core
            # (2 cores, shared with the workers and Redis) computes nothing meanwhile.
            late = time.perf_counter() - before - TICK_S
            lags.append((late, min(late, time.thread_time() - cpu)))

    ticking = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    start = time.perf_counter()
    ids: list[str] = []
    for i in range(0, len(rows), SEND_CHUNK):
        ids += await client.send_many(TASK_PREDICT, _kwargs(rows[i : i + SEND_CHUNK]), queue)
    failed = 0
    async for status in client.iter_finished(ids):
        failed += status.state != "SUCCESS"
    elapsed = time.perf_counter() - start
    ticking.cancel()
    for i in range(0, len(ids), 1000):
        await client.redis.delete(*(result_key(t) for t in ids[i : i + 1000]))
    return elapsed, failed, lags


def async_vs_sync(client: Client, rows: NDArray[np.float64], queue: str) -> dict[str, Any]:
    """Both clients, ROUNDS rounds each of len(rows) / ROUNDS jobs, alternating.

    The bench's own heap (every earlier measurement) is frozen out of the garbage collector
    meanwhile, as a service freezes its start-up objects: a full collection of it held the
    loop ~45 ms in one run, which says nothing about the client."""
    gc.freeze()
    try:
        return _async_vs_sync(client, rows, queue)
    finally:
        gc.unfreeze()


def _async_vs_sync(client: Client, rows: NDArray[np.float64], queue: str) -> dict[str, Any]:
    features = rows.tolist()
    bounds = np.linspace(0, len(features), ROUNDS + 1).astype(int).tolist()
    sync_s = async_s = 0.0
    failed = 0
    lags: list[tuple[float, float]] = []

    async def run_async(part: list[list[float]]) -> tuple[float, int, list[tuple[float, float]]]:
        async with AsyncClient(client.settings) as aclient:
            return await _async_round(aclient, part, queue)

    for lo, hi in itertools.pairwise(bounds):
        part = features[lo:hi]
        seconds, bad = _sync_round(client, part, queue)
        sync_s += seconds
        failed += bad
        seconds, bad, round_lags = asyncio.run(run_async(part))
        async_s += seconds
        failed += bad
        lags += round_lags
    jobs = len(features)
    lag_ms = np.asarray([late for late, _ in lags] or [0.0]) * 1e3
    held_ms = np.asarray([held for _, held in lags] or [0.0]) * 1e3
    return {
        "jobs": jobs,
        "send_chunk": SEND_CHUNK,
        "sync": {"seconds": sync_s, "jobs_per_s": jobs / sync_s if sync_s else None},
        "async": {"seconds": async_s, "jobs_per_s": jobs / async_s if async_s else None},
        "failed": failed,
        "loop_lag": {
            "tick_ms": TICK_S * 1e3,
            "ticks": len(lags),
            "p50_ms": float(np.percentile(lag_ms, 50)),
            "p99_ms": float(np.percentile(lag_ms, 99)),
            "max_ms": float(lag_ms.max()),
            "held_p99_ms": float(np.percentile(held_ms, 99)),
            "held_max_ms": float(held_ms.max()),
        },
    }
