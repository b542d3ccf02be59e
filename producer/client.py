"""The producer client: enqueue jobs by task name, poll or wait for their results.

Results are read straight from the result backend with GET/MGET, not through
one pub/sub subscription per task, so collecting thousands of results never
stalls on a subscription backlog. producer.aio.AsyncClient is the same client for
asyncio; both do only their I/O around producer.core.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from contract.errors import NotReplicated
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
    check_shape,
)
from producer.connections import redis_client
from producer.core import (
    LIMITED_PUSH,
    Batch,
    ClientCore,
    Poll,
    TaskError,
    TaskStatus,
    parse,
    raise_for,
    resolve_queue,
    routed,
    status_from_meta,
)
from producer.settings import ProducerSettings

log = logging.getLogger(__name__)

__all__ = ["Client", "TaskError", "TaskStatus", "raise_for", "resolve_queue", "status_from_meta"]


class Client(ClientCore):
    def __init__(self, settings: ProducerSettings | None = None) -> None:
        super().__init__(settings)
        # Messages are built here (contract.envelope) and pushed with LPUSH: no Celery app,
        # whose send_task costs ~0.8 ms of CPU a message, and whose Redis result backend
        # would subscribe to a pub/sub channel for every task sent. Results are read with
        # GET/MGET. Both clients retry through a Redis restart (redis_client).
        self.redis = redis_client(self.settings.backend, self.settings)
        self.broker = redis_client(self.settings.broker, self.settings)
        self._limited_push = self.broker.register_script(LIMITED_PUSH)

    def close(self) -> None:
        self.redis.close()
        self.broker.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- model facts, for validating before enqueueing -------------------------------------

    def model_info(self, queue: str = "cpu", refresh: bool = False) -> ModelInfo | None:
        """What the workers of `queue` serve (they publish it at start), or None if none of
        them ever started."""
        name, read = self._info_cached(queue, refresh)
        if read:
            return self._info_read(name, self.redis.get(model_info_key(name)))
        return self._model_info[name]

    def validate_rows(self, rows: list[list[float]], queue: str = "cpu") -> None:
        info = self.model_info(queue)
        if info is not None:
            check_shape(rows, info.n_features, info.max_batch_rows)

    # -- enqueue ---------------------------------------------------------------------------

    def send(
        self, task: str, kwargs: dict[str, Any], queue: str = "cpu", task_id: str | None = None
    ) -> str:
        """Enqueue already-validated kwargs; returns the task id. `queue` names the workers
        ("cpu", "gpu" or a queue name); single-row jobs go to its row queue."""
        return self.send_many(task, [kwargs], queue, [task_id])[0]

    def send_many(
        self,
        task: str,
        kwargs_list: Sequence[dict[str, Any]],
        queue: str = "cpu",
        task_ids: Sequence[str | None] | None = None,
    ) -> list[str]:
        """Enqueue many jobs of one task in one round trip; their ids, in order. QueueFull
        (nothing enqueued) when they would pass the queue's limit."""
        batch = self._batch(task, kwargs_list, queue, task_ids)
        return self._pushed(batch, self._push(batch)) if batch.messages else []

    def _push(self, batch: Batch) -> int:
        # LPUSH takes many values at once; the worker pops from the other end, in order.
        limit = self.settings.max_queue_depth
        replicas = self.settings.enqueue_replicas
        with self.broker.pipeline(transaction=False) as pipe:
            if limit is None:
                pipe.lpush(batch.target, *batch.texts)
            else:
                self._limited_push(keys=[batch.target], args=[limit, *batch.texts], client=pipe)
            if replicas:
                # WAIT counts this connection's writes: the pipeline keeps both on one.
                pipe.wait(replicas, self.settings.enqueue_replicas_timeout_ms)
            replies = pipe.execute()
        if replicas and int(replies[1]) < replicas and int(replies[0]) > 0:
            raise NotReplicated(
                f"{len(batch.texts)} job(s) on {batch.target} reached the primary, but "
                f"{replies[1]} of {replicas} replica(s) confirmed them within "
                f"{self.settings.enqueue_replicas_timeout_ms} ms; resending under the same "
                "ids is safe"
            )
        return int(replies[0])

    def resend_lost(self, pending: list[str]) -> list[str]:
        """Send again, under the same ids, the pending jobs Redis no longer holds anywhere."""
        known, queues = self._lost.candidates(pending, self._sent)
        lengths = [int(self.broker.llen(q)) for q in queues] if known else []
        held = self.broker.hvals(UNACKED_KEY) if known and not any(lengths) else None
        lost = self._lost.judge(known, lengths, held)
        for task_id in lost:
            job = self._sent.get(task_id)
            if job is not None:
                log.warning(
                    "job %s is in no queue and held by no worker: sending it again", task_id
                )
                self.send(job.task, job.kwargs, job.queue, task_id=task_id)
        return lost

    def submit(
        self,
        features: Sequence[float],
        queue: str = "cpu",
        *,
        model_version: str | None = None,
        routing_key: str | None = None,
    ) -> str:
        """`model_version` pins the version (or alias) that serves the job; `routing_key`
        keeps a canary split sticky per entity (docs/registry.md)."""
        kwargs = routed({"features": list(features)}, model_version, routing_key)
        request = parse(PredictRequest, kwargs, self.model_info(queue))
        return self.send(TASK_PREDICT, request.model_dump(), queue)

    def submit_many(self, rows: Sequence[Sequence[float]], queue: str = "cpu") -> list[str]:
        """One single-row job per row, enqueued in one round trip; their ids, in order."""
        info = self.model_info(queue)
        requests = [parse(PredictRequest, {"features": list(r)}, info) for r in rows]
        return self.send_many(TASK_PREDICT, [r.model_dump() for r in requests], queue)

    def submit_batch(
        self,
        rows: Sequence[Sequence[float]],
        queue: str = "cpu",
        *,
        model_version: str | None = None,
        routing_key: str | None = None,
    ) -> str:
        kwargs = routed({"rows": [list(r) for r in rows]}, model_version, routing_key)
        request = parse(BatchRequest, kwargs, self.model_info(queue))
        return self.send(TASK_PREDICT_BATCH, request.model_dump(), queue)

    def submit_batch_f32(
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
        request = parse(BatchRequest, kwargs, self.model_info(queue))
        return self.send(TASK_PREDICT_BATCH, request.model_dump(exclude_none=True), queue)

    def submit_explain(
        self,
        rows: Sequence[Sequence[float]],
        queue: str = "cpu",
        *,
        model_version: str | None = None,
        routing_key: str | None = None,
    ) -> str:
        """An inference.explain job for `rows` (sent to the row lane); its id. It is
        explained by the version that serves it, chosen as for submit_batch."""
        kwargs = routed({"rows": [list(r) for r in rows]}, model_version, routing_key)
        request = parse(ExplainRequest, kwargs, self.model_info(queue))
        return self.send(TASK_EXPLAIN, request.model_dump(exclude_none=True), queue)

    def explain(
        self,
        rows: Sequence[Sequence[float]],
        queue: str = "cpu",
        timeout: float | None = None,
        *,
        model_version: str | None = None,
        routing_key: str | None = None,
    ) -> list[Explanation]:
        """Each row's prediction and SHAP contributions, named by feature; the job's error
        raised (ExplainUnavailable when the workers cannot explain)."""
        task_id = self.submit_explain(
            rows, queue, model_version=model_version, routing_key=routing_key
        )
        result = self.wait(task_id, timeout)
        return ExplainResult.model_validate(result).explanations()

    # -- results ---------------------------------------------------------------------------

    def status(self, task_id: str) -> TaskStatus:
        return self.statuses([task_id])[0]

    def statuses(self, task_ids: Sequence[str]) -> list[TaskStatus]:
        if not task_ids:
            return []
        return self._settled(task_ids, self.redis.mget(self._keys(task_ids)))

    def wait(self, task_id: str, timeout: float | None = None) -> dict[str, Any]:
        """The task's result; its error raised as an exception; TimeoutError past `timeout`."""
        for status in self.iter_finished([task_id], timeout):
            return raise_for(status)
        raise AssertionError("unreachable")  # pragma: no cover

    def iter_finished(
        self, task_ids: Iterable[str], timeout: float | None = None
    ) -> Iterator[TaskStatus]:
        """Yield each task's final status as it finishes."""
        pending = list(dict.fromkeys(task_ids))
        while pending:
            done = self.wait_any(pending, timeout)
            finished = {s.task_id for s in done}
            pending = [t for t in pending if t not in finished]
            yield from done

    def wait_any(self, task_ids: Sequence[str], timeout: float | None = None) -> list[TaskStatus]:
        """The final statuses of those tasks that are finished, once at least one is;
        polls with MGET, backing off from 0.5 ms to 20 ms."""
        if not task_ids:
            return []
        poll = Poll(self.settings, len(task_ids), task_ids[0], timeout)
        while True:
            statuses = self.statuses(task_ids)
            done = [s for s in statuses if s.ready]
            if done:
                return done
            if poll.check_lost_now():
                self.resend_lost([s.task_id for s in statuses if s.state == "PENDING"])
            time.sleep(poll.next_delay())

    # -- health ----------------------------------------------------------------------------

    def health(self) -> dict[str, Any] | None:
        raw = self.redis.get(HEALTH_REPORT_KEY)
        return None if raw is None else json.loads(raw)
