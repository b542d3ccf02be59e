"""AsyncClient: the same validation, errors and results as Client (fakeredis: no server).

Each test runs its coroutine with asyncio.run, so no pytest plugin is needed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import fakeredis
import pytest

from contract.errors import FeatureCountMismatch, InferenceError, TooManyRows
from contract.names import QUEUE_CPU, model_info_key, result_key
from contract.schemas import ModelInfo, encode_f32
from producer import AsyncClient, Client
from producer.settings import ProducerSettings

SETTINGS = ProducerSettings(redis_url="redis://127.0.0.1:1/0", wait_timeout_s=0.2)
INFO = ModelInfo(name="m", version="v", n_features=2, feature_names=["a", "b"], max_batch_rows=3)


def run(make: Callable[[AsyncClient], Awaitable[Any]]) -> Any:
    """`make(client)` on an AsyncClient whose Redis is an in-memory fake with INFO published."""

    async def main() -> Any:
        client = AsyncClient(SETTINGS)
        fake = fakeredis.FakeAsyncRedis()
        client.redis = client.broker = fake
        await fake.set(model_info_key(QUEUE_CPU), INFO.model_dump_json())
        try:
            return await make(client)
        finally:
            await fake.aclose()

    return asyncio.run(main())


def sync_client() -> Client:
    client = Client(SETTINGS)
    client.redis = client.broker = fakeredis.FakeRedis()
    client.redis.set(model_info_key(QUEUE_CPU), INFO.model_dump_json())
    return client


def meta(status: str, result: object) -> bytes:
    return json.dumps({"status": status, "result": result, "task_id": "t"}).encode()


BAD = [
    ("submit", ([1.0],)),
    ("submit", ([1.0, float("nan")],)),
    ("submit", (["1", 2.0],)),
    ("submit_many", ([[1.0, 2.0], [3.0]],)),
    ("submit_batch", ([[1.0, 2.0]] * 4,)),
    ("submit_batch", ([[1.0, 2.0], [1.0]],)),
    ("submit_batch_f32", (encode_f32([[1.0, 2.0, 3.0]]), 3)),
    ("submit_batch_f32", (encode_f32([[1.0, 2.0]] * 4), 2)),
]


@pytest.mark.parametrize(("method", "args"), BAD)
def test_bad_input_raises_what_the_sync_client_raises(method: str, args: tuple[Any, ...]) -> None:
    with pytest.raises(InferenceError) as sync_error:
        getattr(sync_client(), method)(*args)

    async def call(client: AsyncClient) -> None:
        await getattr(client, method)(*args)

    with pytest.raises(InferenceError) as async_error:
        run(call)
    assert type(async_error.value) is type(sync_error.value)
    assert str(async_error.value) == str(sync_error.value)


def test_jobs_are_enqueued_as_the_sync_client_enqueues_them() -> None:
    async def submit(client: AsyncClient) -> tuple[list[str], list[bytes]]:
        ids = [await client.submit([1.0, 2.0])]
        ids += await client.submit_many([[3.0, 4.0], [5.0, 6.0]])
        ids.append(await client.submit_batch_f32(encode_f32([[1.0, 2.0]]), 2))
        return ids, [*await client.broker.lrange("inference.cpu.rows", 0, -1)]

    ids, rows = run(submit)
    assert len(set(ids)) == 4
    bodies = [json.loads(json.loads(raw)["body"]) for raw in reversed(rows)]
    assert [b[1] for b in bodies] == [{"features": [1.0, 2.0]}, {"features": [3.0, 4.0]},
                                      {"features": [5.0, 6.0]}]  # fmt: skip
    assert [json.loads(raw)["headers"]["id"] for raw in reversed(rows)] == ids[:3]


ROUTE = {"model_version": "2", "routing_key": "user-42"}


def _kwargs(raw: list[Any]) -> list[dict[str, Any]]:
    return [json.loads(json.loads(m)["body"])[1] for m in reversed(raw)]


def test_every_submit_sends_a_pin_and_a_routing_key_in_its_kwargs_sync_and_async() -> None:
    f32 = encode_f32([[1.0, 2.0]])

    async def submit(client: AsyncClient) -> list[dict[str, Any]]:
        await client.submit([1.0, 2.0], **ROUTE)
        await client.submit_batch([[1.0, 2.0]], **ROUTE)
        await client.submit_batch_f32(f32, 2, **ROUTE)
        await client.submit_batch_f32(f32, 2)
        rows = await client.broker.lrange("inference.cpu.rows", 0, -1)
        return _kwargs(rows) + _kwargs(await client.broker.lrange("inference.cpu", 0, -1))

    sync = sync_client()
    sync.submit([1.0, 2.0], **ROUTE)
    sync.submit_batch([[1.0, 2.0]], **ROUTE)
    sync.submit_batch_f32(f32, 2, **ROUTE)
    sync.submit_batch_f32(f32, 2)
    sent = _kwargs(sync.broker.lrange("inference.cpu.rows", 0, -1))
    sent += _kwargs(sync.broker.lrange("inference.cpu", 0, -1))
    expected = [
        {"features": [1.0, 2.0], **ROUTE},
        {"rows": [[1.0, 2.0]], "rows_f32": None, "n_features": None, **ROUTE},
        {"rows_f32": f32, "n_features": 2, **ROUTE},
        {"rows_f32": f32, "n_features": 2},  # neither: sent as before they existed
    ]
    assert sent == expected
    assert run(submit) == expected


def test_results_typed_errors_and_timeouts() -> None:
    async def read(client: AsyncClient) -> list[Any]:
        await client.redis.set(result_key("a"), meta("SUCCESS", {"prediction": 2.0}))
        failure = {"exc_type": "TooManyRows", "exc_message": ["too many"]}
        await client.redis.set(result_key("b"), meta("FAILURE", failure))
        states = [s.state for s in await client.statuses(["a", "b", "c"])]
        result = await client.wait("a")
        errors: list[type[BaseException]] = []
        for task_id, timeout in (("b", None), ("c", 0.05)):
            try:
                await client.wait(task_id, timeout=timeout)
            except (InferenceError, TimeoutError) as exc:
                errors.append(type(exc))
        finished = sorted([s.task_id async for s in client.iter_finished(["a", "b"])])
        return [states, result, errors, finished]

    states, result, errors, finished = run(read)
    assert states == ["SUCCESS", "FAILURE", "PENDING"]
    assert result == {"prediction": 2.0}
    assert errors == [TooManyRows, TimeoutError]
    assert finished == ["a", "b"]


def test_waiting_yields_to_the_event_loop() -> None:
    """A pending job's poll sleeps with asyncio.sleep: other tasks run meanwhile."""

    async def wait_and_tick(client: AsyncClient) -> int:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        ticking = asyncio.create_task(ticker())
        with pytest.raises(TimeoutError):
            await client.wait("never", timeout=0.1)
        ticking.cancel()
        return ticks

    assert run(wait_and_tick) > 10


def test_model_info_is_read_once_and_refreshed_on_demand() -> None:
    async def read(client: AsyncClient) -> list[ModelInfo | None]:
        first = await client.model_info()
        newer = INFO.model_copy(update={"n_features": 3})
        await client.redis.set(model_info_key(QUEUE_CPU), newer.model_dump_json())
        cached = await client.model_info()
        return [first, cached, await client.model_info(refresh=True)]

    first, cached, refreshed = run(read)
    assert first == cached == INFO
    assert refreshed is not None and refreshed.n_features == 3


def test_a_row_of_the_wrong_length_is_refused_before_it_is_sent() -> None:
    async def submit(client: AsyncClient) -> int:
        with pytest.raises(FeatureCountMismatch, match="row 0 has 1 features"):
            await client.submit([1.0])
        return int(await client.broker.llen("inference.cpu.rows"))

    assert run(submit) == 0


def test_concurrent_waits_share_one_lookup_per_poll_and_stop_when_nobody_waits() -> None:
    async def wait_many(client: AsyncClient) -> tuple[list[float], list[int], int, int]:
        lookups: list[int] = []
        mget = client.redis.mget

        async def counting_mget(keys: list[str]) -> list[Any]:
            lookups.append(len(keys))
            return await mget(keys)

        client.redis.mget = counting_mget  # type: ignore[method-assign]
        ids = [f"job-{i}" for i in range(50)]
        waits = [asyncio.create_task(client.wait(t, timeout=5)) for t in ids]
        await asyncio.sleep(0.01)
        await client.redis.mset(
            {result_key(t): meta("SUCCESS", {"prediction": i}) for i, t in enumerate(ids)}
        )
        results = [r["prediction"] for r in await asyncio.gather(*waits)]
        with pytest.raises(TimeoutError, match=r"task never not finished after 0\.05s"):
            await client.wait("never", timeout=0.05)
        await asyncio.sleep(0.05)  # the poller notices that nobody waits any more
        settled = len(lookups)
        await asyncio.sleep(0.1)
        return results, lookups, settled, len(lookups)

    results, lookups, settled, later = run(wait_many)
    assert results == list(range(50))
    assert max(lookups) == 50  # every waited-on job in one MGET
    assert len(lookups) < 50  # not one poll per waiter
    assert later == settled  # no lookups once nobody waits


def test_concurrent_sends_to_one_queue_go_out_in_one_push_in_order() -> None:
    async def send(client: AsyncClient) -> tuple[list[str], list[int], list[str]]:
        pushes: list[int] = []
        lpush = client.broker.lpush

        async def counting_lpush(name: str, *values: Any) -> int:
            pushes.append(len(values))
            return int(await lpush(name, *values))

        client.broker.lpush = counting_lpush  # type: ignore[method-assign]
        await client.model_info()  # read once, as a running service has
        ids = await asyncio.gather(*(client.submit([float(i), 1.0]) for i in range(20)))
        raws = await client.broker.lrange("inference.cpu.rows", 0, -1)
        queued = [json.loads(raw)["headers"]["id"] for raw in reversed(raws)]
        return list(ids), pushes, queued

    ids, pushes, queued = run(send)
    assert pushes == [20]  # one LPUSH for the twenty submits issued together
    assert queued == ids  # in the order they were submitted
