"""The row lane: each worker process takes jobs off <queue>.rows many at a time, predicts
the single-row ones together with one onnxruntime call and each batch job on its own.

Celery spends about a millisecond of CPU on every message (receive, a Request, the pool
hand-off, an acknowledgement, a result write, each its own Redis round trip), while one
row costs the model ~20 us. Here a thread in the process that holds the model takes up to
`row_batch_max` messages in one Redis call, predicts them together, and writes every
result and acknowledgement in one pipeline. Each job stays its own Celery task: same task
name, same message, its own result under celery-task-meta-<id>, published as Celery's
backend does, so a producer polls it, or waits with AsyncResult.get(), as before.

Batch jobs (inference.predict_batch) sent here skip Celery's consumer too: the bulk scorer
sends its chunks here, where a 20,000-row chunk costs no Celery message handling in the
worker's main process nor its pool hand-off (~7 ms a chunk). They run the same code as on
Celery's path (worker.service), without Celery's time limits: a job of max_batch_rows rows
takes well under a second.

Delivery is kombu's, made atomic: a Lua script pops the messages and records them as
unacknowledged (kombu's own `unacked` hash and `unacked_index`) in one step, so a process
killed at any point loses nothing: the Celery consumer of any worker hands held messages
back to the queue after the visibility timeout, as it does for its own.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis

from producer.connections import redis_client
from producer.contract import (
    HEADER_ENQUEUED_AT,
    TASK_PREDICT,
    TASK_PREDICT_BATCH,
    UNACKED_INDEX_KEY,
    UNACKED_KEY,
    Latency,
    PredictRequest,
    PredictResult,
    parse_request,
    result_key,
)
from producer.envelope import MessageRefused, read_task_message
from producer.errors import (
    InferenceError,
    InvalidInput,
    MessageTooLarge,
    PredictionFailed,
    TaskFailed,
)
from worker import service
from worker.messages import body_problem, envelope_problem
from worker.results import REVOKED, error_document, expired, result_document
from worker.runtime import Runtime
from worker.service import queue_wait_ms

log = logging.getLogger(__name__)

# KEYS: unacked hash, unacked index, then the queue's lists in priority order (kombu keeps
# a message sent with a priority in a list of its own). ARGV: most messages, now (Unix s),
# the tail of the unacked record (`,"<exchange>","<routing key>"]`), a byte budget: once the
# messages taken reach it, no more are taken (the first one always is).
# Returns tag, message, tag, message...; the tag is "" for a message without one (not a
# kombu message), which is served all the same but not recorded as held.
#
# The tag is found by text, not by decoding the JSON in Redis: decoding a 20,000-row batch
# costs Redis milliseconds. A quote inside the body or any JSON string is escaped, so the
# first `"delivery_tag"` is a key; the producer client writes properties first, so it is
# found within the first few hundred bytes.
_TAKE = """
local want = tonumber(ARGV[1])
local budget = tonumber(ARGV[4])
local bytes = 0
local out = {}
for k = 3, #KEYS do
  while want > 0 and bytes < budget do
    local raw = redis.call('RPOP', KEYS[k])
    if not raw then break end
    want = want - 1
    bytes = bytes + #raw
    local tag = ''
    local at = string.find(raw, '"delivery_tag"', 1, true)
    if at then
      tag = string.match(raw, '^"delivery_tag"%s*:%s*"([^"\\\\]+)"', at) or ''
      if #tag > 255 then tag = '' end
    end
    if tag ~= '' then
      redis.call('ZADD', KEYS[2], ARGV[2], tag)
      redis.call('HSET', KEYS[1], tag, '[' .. raw .. ARGV[3])
    end
    out[#out + 1] = tag
    out[#out + 1] = raw
  end
end
return out
"""

# What one take gathers at most, in bytes (the first message is taken whatever its size):
# room for a full batch of single rows (~600 bytes each), while a bulk chunk of hundreds of
# kilobytes is taken alone, so the chunks queued spread over all processes' lanes instead
# of one lane taking them all and the others idling.
TAKE_MAX_BYTES = 256 * 1024

_ID_IN_HEAD = re.compile(rb'"id"\s*:\s*"([^"\\]{1,255})"')

PRIORITY_SEP = "\x06\x16"

# Seconds a write of results is retried while Redis is away; the messages stay held
# (unacknowledged) meanwhile, and come back to the queue if this process gives up or dies.
WRITE_RETRY_S = 60.0


@dataclass
class _Job:
    tag: str
    task_id: str | None
    headers: dict[str, Any]
    features: list[float] | None = None
    batch: tuple[tuple[Any, ...], dict[str, Any]] | None = None
    """args and kwargs of an inference.predict_batch job."""
    error: InferenceError | None = None
    revoked: bool = False


class RowLane:
    """Takes batches of single-row jobs off one queue until stopped. One per process."""

    def __init__(
        self,
        rt: Runtime,
        queue: str,
        hostname: str,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.rt = rt
        self.queue = queue
        self.hostname = hostname
        settings = rt.settings
        self.max_batch = settings.row_batch_max
        self.wait_s = settings.row_batch_wait_ms / 1000.0
        self.result_ttl = settings.result_ttl_s
        self.broker = redis_client(settings.broker, settings)
        self.backend = redis_client(settings.backend, settings)
        self._take = self.broker.register_script(_TAKE)
        # kombu's Redis transport: priority 0 (the default) is the queue's own list, and is
        # served first; 3, 6 and 9 have lists of their own.
        self._lists = [queue, *(f"{queue}{PRIORITY_SEP}{p}" for p in (3, 6, 9))]
        self._record_tail = "," + json.dumps(["", queue])[1:]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="inference-row-lane", daemon=True)
        self._on_batch = on_batch or rt.stats.batch

    # -- life ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        log.info(
            "row lane on %s: batches of up to %d, waiting up to %g ms to fill one",
            self.queue,
            self.max_batch,
            self.wait_s * 1000,
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the batch in hand (its results written, its messages acknowledged), then
        stop taking more."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.broker.close()
        self.backend.close()

    def _run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            taken: list[tuple[str, bytes]] = []
            try:
                taken = self.take()
                if not taken:
                    self._wait_for_work()
                    continue
                self.serve(taken)
                backoff = 0.1
            except redis.RedisError as exc:
                log.warning("row lane: Redis error, retrying in %.1fs: %s", backoff, exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception as exc:
                # Never let one bad batch end the lane, nor leave its producers waiting.
                log.exception("row lane: unexpected error serving %d job(s)", len(taken))
                self.fail_all(taken, exc)

    def fail_all(self, taken: list[tuple[str, bytes]], exc: Exception) -> None:
        """A FAILURE for every job of a batch the lane could not serve (a bug, not the
        jobs' fault: TaskFailed), then their acknowledgement. Should even that fail, they
        stay held, and come back to the queue after the visibility timeout."""
        error = TaskFailed(f"the worker could not serve this job: {exc!r}")
        writes = []
        for _, raw in taken:
            try:
                task_id = read_task_message(raw).task_id
            except MessageRefused:
                continue
            if isinstance(task_id, str) and envelope_problem({"id": task_id}) is None:
                writes.append((task_id, result_document(task_id, "FAILURE", error_document(error))))
        try:
            self._write(writes, [tag for tag, _ in taken if tag])
        except Exception:
            log.exception("row lane: could not fail the batch either; it stays held")

    def _wait_for_work(self) -> None:
        # Blocks until the list has an element, without taking it: a tail-to-tail move of
        # a list onto itself leaves it as it was. The take script then takes it atomically.
        # Only the default priority's list is watched: a job sent with a priority waits at
        # most this timeout (1 s) when nothing else arrives.
        self.broker.blmove(self.queue, self.queue, 1, "RIGHT", "RIGHT")

    # -- one batch -------------------------------------------------------------------------

    def take(self) -> list[tuple[str, bytes]]:
        """Up to max_batch messages, each recorded as held; waits up to row_batch_wait_ms
        for more once there is one."""
        taken = self._take_now(self.max_batch)
        if taken and self.wait_s > 0 and len(taken) < self.max_batch:
            deadline = time.monotonic() + self.wait_s
            while len(taken) < self.max_batch and time.monotonic() < deadline:
                more = self._take_now(self.max_batch - len(taken))
                if more:
                    taken.extend(more)
                else:
                    time.sleep(min(0.0005, max(0.0, deadline - time.monotonic())))
        return taken

    def _take_now(self, most: int) -> list[tuple[str, bytes]]:
        flat = self._take(
            keys=[UNACKED_KEY, UNACKED_INDEX_KEY, *self._lists],
            args=[most, time.time(), self._record_tail, TAKE_MAX_BYTES],
        )
        return [(_text(flat[i]), flat[i + 1]) for i in range(0, len(flat), 2)]

    def serve(self, taken: list[tuple[str, bytes]]) -> None:
        started_wall, started = time.time(), time.perf_counter()
        jobs = [self._read(tag, raw) for tag, raw in taken]
        writes: list[tuple[str, str]] = []
        valid = [j for j in jobs if j.error is None and not j.revoked and j.batch is None]
        inference_ms = 0.0
        predictions: list[float] = []
        if valid:
            t0 = time.perf_counter()
            valid, predictions = self._predict(valid)
            inference_ms = (time.perf_counter() - t0) * 1000.0
        task_ms = (time.perf_counter() - started) * 1000.0
        common = self._common()
        for job, prediction in zip(valid, predictions, strict=True):
            result = PredictResult(
                prediction=prediction,
                batch_size=len(valid),
                latency=Latency(
                    queue_wait_ms=queue_wait_ms(job.headers.get(HEADER_ENQUEUED_AT), started_wall),
                    inference_ms=round(inference_ms, 3),
                    task_ms=round(task_ms, 3),
                ),
                **common,
            )
            assert job.task_id is not None
            writes.append(
                (job.task_id, result_document(job.task_id, "SUCCESS", result.model_dump()))
            )
            self.rt.stats.succeeded(task_ms, 1)
        # Batch jobs after the single rows, which they would otherwise hold up.
        for job in jobs:
            if job.batch is not None and job.error is None and not job.revoked:
                writes.append(self._serve_batch(job))
        for job in jobs:
            if job.revoked and job.task_id is not None:
                writes.append((job.task_id, result_document(job.task_id, "REVOKED", REVOKED)))
            if job.error is not None:
                if job.batch is None:  # service.predict_batch counted its own
                    self.rt.stats.failed()
                if job.task_id is not None:
                    doc = result_document(job.task_id, "FAILURE", error_document(job.error))
                    writes.append((job.task_id, doc))
        self._write(writes, [j.tag for j in jobs if j.tag])
        if valid:
            self._on_batch(len(valid))

    def _serve_batch(self, job: _Job) -> tuple[str, str]:
        assert job.batch is not None and job.task_id is not None
        args, kwargs = job.batch
        job.batch = (args, {})  # the rows are not kept beyond their job
        try:
            result = service.predict_batch(
                self.rt, args, kwargs, job.headers.get(HEADER_ENQUEUED_AT), self.hostname
            )
        except InferenceError as exc:
            job.error = exc.with_traceback(None)
            job.error.__context__ = None
            return job.task_id, result_document(job.task_id, "FAILURE", error_document(job.error))
        return job.task_id, result_document(job.task_id, "SUCCESS", result)

    def _predict(self, jobs: list[_Job]) -> tuple[list[_Job], list[float]]:
        """One onnxruntime call for the batch. Should it raise, each job is run alone, so one
        job the model fails on fails alone (PredictionFailed) and the rest are served."""
        matrix = np.asarray([j.features for j in jobs], dtype=np.float32)
        try:
            return jobs, self.rt.model.predict(matrix).astype(np.float64).tolist()
        except Exception:
            log.exception("row lane: a batch of %d failed; running its jobs one by one", len(jobs))
        served: list[_Job] = []
        predictions: list[float] = []
        for job, row in zip(jobs, matrix, strict=True):
            try:
                predictions.append(float(self.rt.model.predict(row[None, :])[0]))
                served.append(job)
            except Exception as exc:
                job.error = PredictionFailed(f"inference failed: {exc}")
        return served, predictions

    def _read(self, tag: str, raw: bytes) -> _Job:
        # An empty tag: the take script did not register the message (too large for Redis
        # to decode, or not a kombu message): it is served all the same, with nothing to
        # acknowledge, and is lost only if this process dies within the batch.
        limit = self.rt.settings.max_message_bytes
        if len(raw) > limit:
            # Not decoded: the id is looked for in the message's head, where the producer
            # client writes its headers.
            found = _ID_IN_HEAD.search(raw[:8192])
            task_id = found.group(1).decode() if found else None
            if task_id is None:
                log.error("row lane: dropped a message of %d bytes on %s", len(raw), self.queue)
            error = MessageTooLarge(f"message of {len(raw)} bytes exceeds the maximum of {limit}")
            return _Job(tag, task_id, {}, error=error)
        try:
            message = read_task_message(raw)
        except MessageRefused as exc:
            return self._refused(tag, exc.headers, str(exc))
        problem = envelope_problem(message.headers) or body_problem(message.body)
        if problem is None and message.task not in (TASK_PREDICT, TASK_PREDICT_BATCH):
            problem = (
                f"queue {self.queue} takes {TASK_PREDICT} and {TASK_PREDICT_BATCH} jobs only, "
                f"not {message.task!r}"
            )
        if problem is None and message.headers.get("eta") is not None:
            problem = f"a delayed job (eta) is not accepted on {self.queue}"
        if problem is not None:
            return self._refused(tag, message.headers, problem)
        if expired(message.headers.get("expires")):
            # As Celery does: the job is not run, and its state says why.
            return _Job(tag, message.task_id, message.headers, revoked=True)
        job = _Job(tag, message.task_id, message.headers)
        args, kwargs, _ = message.body
        if message.task == TASK_PREDICT_BATCH:
            # Served on its own, by the same code as Celery's path (worker.service).
            job.batch = (tuple(args), kwargs)
            return job
        try:
            request = parse_request(
                PredictRequest,
                tuple(args),
                kwargs,
                n_features=self.rt.model.n_features,
                max_rows=1,
            )
            job.features = request.features
        except InferenceError as exc:
            # Kept without its traceback: its frames hold the job that holds it, a cycle that
            # only a full garbage collection would free (the pool process's RSS grew ~30 MB
            # over a few thousand bad jobs).
            job.error = exc.with_traceback(None)
            job.error.__context__ = None
        return job

    def _refused(self, tag: str, headers: dict[str, Any], reason: str) -> _Job:
        task_id = headers.get("id")
        if envelope_problem({"id": task_id}) is not None:
            log.error("row lane: dropped a message on %s: %s", self.queue, reason)
            task_id = None
        return _Job(tag, task_id, headers, error=InvalidInput(reason))

    def _common(self) -> dict[str, Any]:
        model = self.rt.model
        return {
            "model_name": model.manifest.name,
            "model_version": model.manifest.version,
            "provider": model.provider,
            "device": model.device,
            "hostname": self.hostname,
        }

    def _write(self, results: list[tuple[str, str]], tags: list[str]) -> None:
        """Every result (SET with the result TTL, and PUBLISH for AsyncResult.get()), then
        every acknowledgement: a job is released only once its result is stored."""
        deadline = time.monotonic() + WRITE_RETRY_S
        while True:
            try:
                if results:
                    with self.backend.pipeline(transaction=False) as pipe:
                        for task_id, doc in results:
                            key = result_key(task_id)
                            pipe.set(key, doc, ex=self.result_ttl)
                            pipe.publish(key, doc)
                        pipe.execute()
                    results = []
                if tags:
                    with self.broker.pipeline(transaction=False) as pipe:
                        pipe.zrem(UNACKED_INDEX_KEY, *tags)
                        pipe.hdel(UNACKED_KEY, *tags)
                        pipe.execute()
                return
            except redis.RedisError as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("row lane: could not write results yet: %s", exc)
                time.sleep(0.5)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
