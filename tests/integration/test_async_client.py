"""AsyncClient against a real Redis and a real worker, and the queue-depth limit (QueueFull)
that both clients enforce in one atomic step."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
import redis

from contract.errors import QueueFull
from contract.names import TASK_PREDICT, TASK_PREDICT_BATCH
from contract.schemas import decode_f32, encode_f32
from producer import AsyncClient, Client
from producer.settings import ProducerSettings
from tests.support import RunningWorker, TrainedModel

pytestmark = pytest.mark.integration


def test_async_client_serves_rows_batches_and_f32_as_the_model_predicts(
    producer_settings: ProducerSettings, cpu_worker: RunningWorker, trained_model: TrainedModel
) -> None:
    rows = trained_model.X_test[:300]
    expected = trained_model.reference(rows)

    async def main() -> tuple[dict, list[float], dict, dict]:
        async with AsyncClient(producer_settings) as client:
            one, many, batch, compact = await asyncio.gather(
                client.submit(rows[0].tolist()),
                client.submit_many(rows.tolist()),
                client.submit_batch(rows[:50].tolist()),
                client.submit_batch_f32(encode_f32(rows[:40]), rows.shape[1]),
            )
            by_id = {s.task_id: s async for s in client.iter_finished(many, timeout=30)}
            singles = [by_id[t].result["prediction"] for t in many]  # type: ignore[index]
            return (
                await client.wait(one),
                singles,
                await client.wait(batch),
                await client.wait(compact),
            )

    one, singles, batch, compact = asyncio.run(main())
    assert one["prediction"] == pytest.approx(float(expected[0]), abs=1e-6)
    assert one["hostname"] == cpu_worker.hostname
    np.testing.assert_allclose(singles, expected, atol=1e-6)
    np.testing.assert_allclose(batch["predictions"], expected[:50], atol=1e-6)
    np.testing.assert_allclose(decode_f32(compact["predictions_f32"]), expected[:40], atol=1e-6)


@pytest.fixture
def full_queue(redis_url: str) -> Iterator[tuple[str, redis.Redis]]:
    """A queue no worker consumes (its own name), removed afterwards."""
    name = f"limits-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(redis_url)
    yield name, client
    client.delete(name, f"{name}.rows")
    client.close()


def test_both_clients_refuse_past_the_queue_limit_and_enqueue_nothing(
    redis_url: str, full_queue: tuple[str, redis.Redis]
) -> None:
    queue, probe = full_queue
    settings = ProducerSettings(redis_url=redis_url, max_queue_depth=3)
    with Client(settings) as client:
        client.send_many(TASK_PREDICT_BATCH, [{"rows": [[1.0]]}] * 2, queue)
        # Two more would make four: refused whole, nothing pushed.
        with pytest.raises(QueueFull, match=f"queue {queue} holds 2 job.*limit of 3"):
            client.send_many(TASK_PREDICT_BATCH, [{"rows": [[1.0]]}] * 2, queue)
        assert probe.llen(queue) == 2
        client.send(TASK_PREDICT_BATCH, {"rows": [[1.0]]}, queue)
        with pytest.raises(QueueFull) as info:
            client.send(TASK_PREDICT_BATCH, {"rows": [[1.0]]}, queue)
        assert info.value.retryable
    assert probe.llen(queue) == 3

    async def more() -> list[str]:
        async with AsyncClient(settings) as client:
            with pytest.raises(QueueFull):
                await client.send(TASK_PREDICT_BATCH, {"rows": [[1.0]]}, queue)
            # The row queue has a limit of its own, and room.
            return await client.send_many(TASK_PREDICT, [{"features": [1.0]}] * 3, queue)

    assert len(asyncio.run(more())) == 3
    assert probe.llen(queue) == 3 and probe.llen(f"{queue}.rows") == 3


def test_producers_racing_for_the_last_places_never_overshoot_the_limit(
    redis_url: str, full_queue: tuple[str, redis.Redis]
) -> None:
    queue, probe = full_queue
    settings = ProducerSettings(redis_url=redis_url, max_queue_depth=50)

    async def race() -> int:
        clients = [AsyncClient(settings) for _ in range(8)]

        async def fill(client: AsyncClient) -> int:
            sent = 0
            for _ in range(20):
                try:
                    await client.send_many(TASK_PREDICT_BATCH, [{"rows": [[1.0]]}] * 3, queue)
                    sent += 3
                except QueueFull:
                    pass
            return sent

        try:
            return sum(await asyncio.gather(*(fill(c) for c in clients)))
        finally:
            for client in clients:
                await client.close()

    accepted = asyncio.run(race())
    assert accepted == probe.llen(queue) == 48  # 16 whole sends of 3 fit under 50
