"""What the routes do with the queues, through the app's one AsyncClient."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import redis

from contract.errors import InferenceError
from contract.schemas import ModelInfo
from gateway.problems import problem_for
from gateway.settings import GatewaySettings
from producer import AsyncClient, TaskStatus


class Gateway:
    """One app's link to the queues. It holds no job state, only a client and the time it
    last read each queue's model info, so any number of replicas can serve side by side."""

    def __init__(self, settings: GatewaySettings, client: AsyncClient) -> None:
        self.settings = settings
        self.client = client
        self._info_read_at: dict[str, float] = {}

    async def model_info(self, queue: str, refresh: bool = False) -> ModelInfo | None:
        """What the workers of `queue` serve. The client keeps what it read; read it again
        when it is older than gateway_model_info_ttl_s, so that a new model (another
        feature count, another row limit) is taken up while the gateway runs."""
        now = time.monotonic()
        read_at = self._info_read_at.get(queue)
        ttl = self.settings.gateway_model_info_ttl_s
        stale = refresh or read_at is None or now - read_at >= ttl
        info = await self.client.model_info(queue, refresh=stale)
        if stale:
            self._info_read_at[queue] = now
        return info

    # -- enqueue: the client checks the rows against the model info, as the worker will ---

    # `route`: the job's model_version and routing_key (each None when not given), passed to
    # the client as they are, so the workers route it as any producer's job.

    async def submit_row(
        self, features: Sequence[float], queue: str, route: Mapping[str, str | None]
    ) -> str:
        await self.model_info(queue)
        return await self.client.submit(features, queue=queue, **route)

    async def submit_rows(
        self, rows: Sequence[Sequence[float]], queue: str, route: Mapping[str, str | None]
    ) -> str:
        await self.model_info(queue)
        return await self.client.submit_batch(rows, queue=queue, **route)

    async def submit_explain(
        self, rows: Sequence[Sequence[float]], queue: str, route: Mapping[str, str | None]
    ) -> str:
        await self.model_info(queue)
        return await self.client.submit_explain(rows, queue=queue, **route)

    async def submit_f32(
        self, rows_f32: str, n_features: int, queue: str, route: Mapping[str, str | None]
    ) -> str:
        await self.model_info(queue)
        return await self.client.submit_batch_f32(rows_f32, n_features, queue=queue, **route)

    # -- results ---------------------------------------------------------------------------

    async def result(self, task_id: str, status_url: str) -> dict[str, Any]:
        """The job's result within gateway_predict_timeout_s; its error, a timeout or Redis
        failing raised as a Problem that names the job."""
        try:
            return await self.client.wait(task_id, timeout=self.settings.gateway_predict_timeout_s)
        except (InferenceError, TimeoutError, redis.RedisError) as exc:
            raise problem_for(
                exc,
                retry_after_s=self.settings.gateway_retry_after_s,
                task_id=task_id,
                status_url=status_url,
            ) from exc

    async def status(self, task_id: str, wait_s: float) -> TaskStatus:
        """The job's status, once it is finished or `wait_s` (capped by gateway_max_wait_s)
        has passed, whichever comes first."""
        wait_s = min(wait_s, self.settings.gateway_max_wait_s)
        if wait_s > 0:
            # The client's wait, not wait_any: every request waiting at once shares its one
            # polling loop, one MGET a look, however many clients long-poll.
            with contextlib.suppress(InferenceError, TimeoutError):
                await self.client.wait(task_id, timeout=wait_s)
        return await self.client.status(task_id)
