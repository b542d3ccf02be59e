"""AsyncClient: the producer client for asyncio services (redis.asyncio, never blocking the
event loop). Same methods, validation, errors and lost-job repair as producer.client.Client:
both do only their own I/O around producer.core."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

from contract.names import (
    HEALTH_REPORT_KEY,
    TASK_EXPLAIN,
    TASK_PREDICT,
    TASK_PREDICT_BATCH,
    UNACKED_KEY,
    model_info_key,
)
from contract.schemas import (
    BatchRequest,
    ExplainRequest,
    ExplainResult,
    Explanation,
    ModelInfo,
    PredictRequest,
)
from producer.connections import async_redis_client
from producer.core import (
    LIMITED_PUSH,
    Batch,
    ClientCore,
    Poll,
    TaskStatus,
    parse,
    raise_for,
    routed,
)
from producer.settings import ProducerSettings

log = logging.getLogger(__name__)

YIELD_EVERY = 256
"""Messages built, or results parsed, between two yields to the event loop."""

FIRST_LOOK_S = 0.00025
"""The shared poller's first delay, and again after each look that finds a job finished."""


class AsyncClient(ClientCore):
    """`async with AsyncClient() as client: await client.wait(await client.submit(row))`."""

    def __init__(self, settings: ProducerSettings | None = None) -> None:
        super().__init__(settings)
        self.redis = async_redis_client(self.settings.backend, self.settings)
        self.broker = async_redis_client(self.settings.broker, self.settings)
        self._limited_push = self.broker.register_script(LIMITED_PUSH)
        self._waiters: dict[str, asyncio.Future[TaskStatus]] = {}
        self._waiting: dict[str, int] = {}
        self._outbox: dict[str, tuple[list[str], asyncio.Future[int]]] = {}
        self._poller: asyncio.Task[None] | None = None

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        await self.redis.aclose()
        await self.broker.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    # -- model facts, for validating before enqueueing -------------------------------------

    async def model_info(self, queue: str = "cpu", refresh: bool = False) -> ModelInfo | None:
        """What the workers of `queue` serve (they publish it at start), or None if none of
        them ever started."""
        name, read = self._info_cached(queue, refresh)
        if read:
            return self._info_read(name, await self.redis.get(model_info_key(name)))
        return self._model_info[name]

    # -- enqueue ---------------------------------------------------------------------------

    async def send(
        self, task: str, kwargs: dict[str, Any], queue: str = "cpu", task_id: str | None = None
    ) -> str:
        """Enqueue already-validated kwargs; returns the task id."""
        return (await self.send_many(task, [kwargs], queue, [task_id]))[0]

    async def send_many(
        self,
        task: str,
        kwargs_list: Sequence[dict[str, Any]],
        queue: str = "cpu",
        task_ids: Sequence[str | None] | None = None,
    ) -> list[str]:
        """Enqueue many jobs of one task in one round trip; their ids, in order. QueueFull
        (nothing enqueued) when they would pass the queue's limit."""
        ids = task_ids or [None] * len(kwargs_list)
        batch = self._batch(task, kwargs_list[:YIELD_EVERY], queue, ids[:YIELD_EVERY])
        for i in range(YIELD_EVERY, len(kwargs_list), YIELD_EVERY):
            # Building a message costs ~20 us: thousands at once would hold the loop.
            await asyncio.sleep(0)
            part = self._batch(
                task, kwargs_list[i : i + YIELD_EVERY], queue, ids[i : i + YIELD_EVERY]
            )
            batch.extend(part)
        return self._pushed(batch, await self._push(batch)) if batch.messages else []

    async def _push(self, batch: Batch) -> int:
        limit = self.settings.max_queue_depth
        if limit is None:
            return await self._lpush_together(batch.target, batch.texts)
        # With a limit each call stays its own all-or-nothing push: a job is never refused
        # for jobs that other callers happened to send at the same moment.
        return int(await self._limited_push(keys=[batch.target], args=[limit, *batch.texts]))

    async def _lpush_together(self, target: str, texts: list[str]) -> int:
        """LPUSH `texts`, in one command with those that other tasks on this loop push to
        the same queue before it next runs: a service sending a row per request then pays
        one round trip per loop iteration, not one per job. Order is kept."""
        loop = asyncio.get_running_loop()
        pending = self._outbox.get(target)
        if pending is None:
            pending = self._outbox[target] = ([], loop.create_future())
            loop.call_soon(self._flush_outbox, target)
        pending[0].extend(texts)
        # Shielded: one caller cancelled must not cancel the push the others wait on.
        return await asyncio.shield(pending[1])

    def _flush_outbox(self, target: str) -> None:
        texts, done = self._outbox.pop(target)
        push = asyncio.ensure_future(self.broker.lpush(target, *texts))

        def settle(task: asyncio.Future[Any]) -> None:
            if done.cancelled():
                return
            if task.exception() is not None:
                done.set_exception(task.exception())  # type: ignore[arg-type]
            else:
                done.set_result(int(task.result()))

        push.add_done_callback(settle)

    async def resend_lost(self, pending: list[str]) -> list[str]:
        """Send again, under the same ids, the pending jobs Redis no longer holds anywhere."""
        known, queues = self._lost.candidates(pending, self._sent)
        lengths = [int(await self.broker.llen(q)) for q in queues] if known else []
        held = await self.broker.hvals(UNACKED_KEY) if known and not any(lengths) else None
        lost = self._lost.judge(known, lengths, held)
        for task_id in lost:
            job = self._sent.get(task_id)
            if job is not None:
                log.warning(
                    "job %s is in no queue and held by no worker: sending it again", task_id
                )
                await self.send(job.task, job.kwargs, job.queue, task_id=task_id)
        return lost

    async def submit(
        self,
        features: Sequence[float],
        queue: str = "cpu",
        *,
        model_version: str | None = None,
        routing_key: str | None = None,
    ) -> str:
        """`model_version` pins the version (or alias) that serves the job; `routing_key`
        keeps a canary split sticky per entity (docs/registry.md)."""
        info = await self.model_info(queue)
        kwargs = routed({"features": list(features)}, model_version, routing_key)
        request = parse(PredictRequest, kwargs, info)
        return await self.send(TASK_PREDICT, request.model_dump(), queue)

    async def submit_many(self, rows: Sequence[Sequence[float]], queue: str = "cpu") -> list[str]:
        """One single-row job per row, enqueued in one round trip; their ids, in order."""
        info = await self.model_info(queue)
        requests = [parse(PredictRequest, {"features": list(r)}, info) for r in rows]
        return await self.send_many(TASK_PREDICT, [r.model_dump() for r in requests], queue)

    async def submit_batch(
        self,
        rows: Sequence[Sequence[float]],
        queue: str = "cpu",
        *,
        model_version: str | None = None,
        routing_key: str | None = None,
    ) -> str:
        info = await self.model_info(queue)
        kwargs = routed({"rows": [list(r) for r in rows]}, model_version, routing_key)
        request = parse(BatchRequest, kwargs, info)
        return await self.send(TASK_PREDICT_BATCH, request.model_dump(), queue)

    async def submit_explain(
        self,
        rows: Sequence[Sequence[float]],
        queue: str = "cpu",
        *,
        model_version: str | None = None,
        routing_key: str | None = None,
    ) -> str:
        """An inference.explain job for `rows` (sent to the row lane); its id."""
        info = await self.model_info(queue)
        kwargs = routed({"rows": [list(r) for r in rows]}, model_version, routing_key)
        request = parse(ExplainRequest, kwargs, info)
        return await self.send(TASK_EXPLAIN, request.model_dump(exclude_none=True), queue)

    async def explain(
        self,
        rows: Sequence[Sequence[float]],
        queue: str = "cpu",
        timeout: float | None = None,
        *,
        model_version: str | None = None,
        routing_key: str | None = None,
    ) -> list[Explanation]:
        """Each row's prediction and SHAP contributions, named by feature (Client.explain)."""
        task_id = await self.submit_explain(
            rows, queue, model_version=model_version, routing_key=routing_key
        )
        result = await self.wait(task_id, timeout)
        return ExplainResult.model_validate(result).explanations()

    async def submit_batch_f32(
        self,
        rows_f32: str,
        n_features: int,
        queue: str = "cpu",
        *,
        model_version: str | None = None,
        routing_key: str | None = None,
    ) -> str:
        """A batch job in the compact form: rows as base64 float32 (contract.schemas)."""
        kwargs = routed(
            {"rows_f32": rows_f32, "n_features": n_features}, model_version, routing_key
        )
        request = parse(BatchRequest, kwargs, await self.model_info(queue))
        return await self.send(TASK_PREDICT_BATCH, request.model_dump(exclude_none=True), queue)

    # -- results ---------------------------------------------------------------------------

    async def status(self, task_id: str) -> TaskStatus:
        return (await self.statuses([task_id]))[0]

    async def statuses(self, task_ids: Sequence[str]) -> list[TaskStatus]:
        if not task_ids:
            return []
        # In slices, each its own MGET: redis-py parses a reply whole once it has arrived,
        # and parsing thousands of results at once (then validating them) would hold the
        # loop for tens of milliseconds.
        statuses: list[TaskStatus] = []
        for i in range(0, len(task_ids), YIELD_EVERY):
            part = task_ids[i : i + YIELD_EVERY]
            statuses += self._settled(part, await self.redis.mget(self._keys(part)))
            await asyncio.sleep(0)
        return statuses

    async def wait(self, task_id: str, timeout: float | None = None) -> dict[str, Any]:
        """The task's result; its error raised as an exception; TimeoutError past `timeout`.

        Concurrent waits share one polling loop (one MGET for every task waited on), so a
        service waiting on thousands of jobs at once costs Redis one round trip a look."""
        limit = self.settings.wait_timeout_s if timeout is None else timeout
        future = self._waiters.get(task_id)
        if future is None:
            future = self._waiters[task_id] = asyncio.get_running_loop().create_future()
        self._waiting[task_id] = self._waiting.get(task_id, 0) + 1
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll_waiters())
        try:
            status = await asyncio.wait_for(asyncio.shield(future), limit)
        except TimeoutError:
            raise TimeoutError(
                f"task {task_id} not finished after {limit:g}s; are workers consuming the queue?"
            ) from None
        finally:
            self._waiting[task_id] -= 1
            if not self._waiting[task_id]:
                # The last one waiting for it: the poller stops looking it up.
                del self._waiting[task_id]
                self._waiters.pop(task_id, None)
        return raise_for(status)

    async def _poll_waiters(self) -> None:
        """Look up every waited-on task with one MGET, backing off from 0.5 ms to 20 ms
        while nothing finishes; stops once nobody waits."""
        # Looks start sooner than a lone wait_any's (0.25 ms, not 0.5): every waiter on the
        # loop shares them, and a job the row lane serves in under a millisecond is then
        # seen within a quarter of one.
        poll = Poll(self.settings, 0, "", float("inf"), delay=FIRST_LOOK_S)
        while self._waiters:
            ids = list(self._waiters)
            try:
                statuses = await self.statuses(ids)
            except Exception as exc:
                for future in self._waiters.values():
                    if not future.done():
                        future.set_exception(exc)
                self._waiters.clear()
                return
            done = [s for s in statuses if s.ready]
            for status in done:
                waited = self._waiters.pop(status.task_id, None)
                if waited is not None and not waited.done():
                    waited.set_result(status)
            if done:
                poll.delay = FIRST_LOOK_S
                continue
            if poll.check_lost_now():
                await self.resend_lost([s.task_id for s in statuses if s.state == "PENDING"])
            await asyncio.sleep(poll.next_delay())

    async def iter_finished(
        self, task_ids: Iterable[str], timeout: float | None = None
    ) -> AsyncIterator[TaskStatus]:
        """Yield each task's final status as it finishes."""
        pending = list(dict.fromkeys(task_ids))
        while pending:
            done = await self.wait_any(pending, timeout)
            finished = {s.task_id for s in done}
            pending = [t for t in pending if t not in finished]
            for status in done:
                yield status

    async def wait_any(
        self, task_ids: Sequence[str], timeout: float | None = None
    ) -> list[TaskStatus]:
        """The final statuses of those tasks that are finished, once at least one is;
        polls with MGET, backing off from 0.5 ms to 20 ms, yielding to the loop between."""
        if not task_ids:
            return []
        poll = Poll(self.settings, len(task_ids), task_ids[0], timeout)
        while True:
            statuses = await self.statuses(task_ids)
            done = [s for s in statuses if s.ready]
            if done:
                return done
            if poll.check_lost_now():
                await self.resend_lost([s.task_id for s in statuses if s.state == "PENDING"])
            await asyncio.sleep(poll.next_delay())

    # -- health ----------------------------------------------------------------------------

    async def health(self) -> dict[str, Any] | None:
        raw = await self.redis.get(HEALTH_REPORT_KEY)
        return None if raw is None else json.loads(raw)
