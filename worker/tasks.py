"""The Celery tasks: thin wrappers that hand their arguments to worker.service.

Every task message also passes `checked_strategy` in the worker's main process before
Celery's own handling, and kombu's decompressors are bounded: see their docstrings.
"""

from __future__ import annotations

import bz2
import contextlib
import gc
import logging
import lzma
import zlib
from collections.abc import Callable
from typing import Any

import kombu.compression
from celery import Task
from celery.exceptions import InvalidTaskError
from celery.signals import task_failure
from celery.worker.consumer import Consumer
from celery.worker.strategy import default as default_strategy

from producer.connections import redis_client
from producer.contract import (
    HEADER_ENQUEUED_AT,
    QUEUES,
    TASK_HEALTH,
    TASK_NOOP,
    TASK_PREDICT,
    TASK_PREDICT_BATCH,
    row_queue,
)
from producer.errors import (
    InvalidInput,
    MessageTooLarge,
    ModelNotReady,
    PermanentError,
    TransientError,
)
from worker import health, runtime, service
from worker.app import app, settings
from worker.messages import body_problem, body_size, envelope_problem

log = logging.getLogger(__name__)

# Set by checked_strategy on every message it lets through (a value the producer put there
# is overwritten); Celery copies message headers into the task's request.
MESSAGE_BYTES_HEADER = "inference_message_bytes"

# What an oversized message's body is replaced with: no args, no kwargs, no embed.
_EMPTY_BODY = b"[[], {}, {}]"


def _fail(task_id: Any, reason: str) -> None:
    """Store a FAILURE for a message Celery is about to drop, so its producer is not left
    waiting on PENDING until it times out. Best effort: the message is dropped either way."""
    if not isinstance(task_id, str) or envelope_problem({"id": task_id}) is not None:
        return
    try:
        app.backend.mark_as_failure(task_id, InvalidInput(reason))
    except Exception:
        log.exception("could not store the failure of task %s", task_id)


def checked_strategy(task: Task, app: Any, consumer: Any, **options: Any) -> Callable[..., Any]:
    """Celery's default strategy behind cheap checks of each message, in the main process.

    - Envelope: a message Celery's own handler would choke on is refused (InvalidTaskError:
      Celery logs it and drops it) instead of wedging the consumer in a reconnect loop.
    - Size: Celery's handler decodes the body's JSON here (to tell protocol variants
      apart), copies it to the pool process and has it decoded again there. A body over
      max_message_bytes is replaced by an empty one first, and the task fails the job with
      MessageTooLarge: the producer gets a typed error, and the pool never sees the bytes.
    - Time limits: a producer may not stretch them per message (the header is dropped).

    A refused message with a usable id gets an InvalidInput FAILURE result.
    """
    handle = default_strategy(task, app, consumer, **options)
    limit = settings.max_message_bytes

    def handle_checked(message: Any, body: Any, *args: Any, **kwargs: Any) -> Any:
        if body is not None:
            # Protocol 1 (no `task` header): the consumer has decoded the whole body
            # already, and its headers would not reach the task.
            raise InvalidTaskError("task protocol 1 is not accepted; send protocol 2")
        headers = message.headers
        problem = envelope_problem(headers)
        if problem is not None:
            _fail(headers.get("id"), problem)
            raise InvalidTaskError(problem)
        size = body_size(message.body)
        headers[MESSAGE_BYTES_HEADER] = size
        headers.pop("timelimit", None)
        if size > limit:
            message.body = _EMPTY_BODY
        try:
            # Celery's handler would decode it next; the result is cached on the message.
            payload = message.payload
        except Exception as exc:
            # A refused content type, bad JSON, or bytes that are not in the declared
            # encoding (which kombu does not wrap in DecodeError).
            _fail(headers["id"], f"task message refused: {exc}")
            raise InvalidTaskError(f"task message refused: {exc!r}") from exc
        problem = body_problem(payload)
        if problem is not None:
            _fail(headers["id"], problem)
            raise InvalidTaskError(problem)
        return handle(message, body, *args, **kwargs)

    return handle_checked


class GuardedConsumer(Consumer):
    """Celery's consumer, except that a message its task handler fails on is dropped.

    Celery lets an unexpected exception from its handler escape into the event loop. The
    Redis transport counts KeyError among connection errors, so a KeyError makes Celery
    reconnect and the message is redelivered, again and again: the queue is stuck. Other
    exceptions stop the worker ("Unrecoverable error"). Either can be caused by one message
    that no strategy sees, e.g. a `task` header that is a list (the strategy lookup raises
    TypeError) or an unknown task without an id. Real connection errors still propagate.
    """

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Any], Any]:
        handle = super().create_task_handler(*args, **kwargs)
        this: Any = self  # Celery's stubs omit the error tuples Consumer.__init__ sets
        recoverable = tuple(
            e
            for e in (*this.connection_errors, *this.channel_errors)
            if not issubclass(e, LookupError)
        )

        def on_task_received(message: Any) -> Any:
            try:
                return handle(message)
            except recoverable:
                raise
            except Exception as exc:
                headers = getattr(message, "headers", None)
                log.error(
                    "dropped a task message Celery could not handle: %r; headers: %.500r",
                    exc,
                    headers,
                )
                # It may have been acknowledged or rejected before the failure.
                with contextlib.suppress(Exception):
                    message.reject(requeue=False)
                if isinstance(headers, dict):
                    _fail(headers.get("id"), f"task message refused: {exc!r}")
                return None

        return on_task_received


# By name: a function set as a task class attribute would be bound as a method.
CHECKED_STRATEGY = f"{__name__}:checked_strategy"


def _bounded(make: Callable[[], Any], limit: int) -> Callable[[bytes], bytes]:
    def decompress(body: bytes) -> bytes:
        inflater = make()
        # Stop one byte past the limit: checked_strategy then refuses the message, and a
        # few kilobytes of zeros never inflate to gigabytes in the worker's main process.
        out: bytes = inflater.decompress(body, limit + 1)
        if len(out) <= limit and not inflater.eof:
            raise ValueError("compressed message body is truncated")
        return out

    return decompress


def _refuse_compression(content_type: str) -> Callable[[bytes], bytes]:
    def decompress(body: bytes) -> bytes:
        raise ValueError(f"{content_type} message bodies are not accepted by this worker")

    return decompress


def bound_decompression(limit: int) -> None:
    """Make every kombu decompressor in this process stop at `limit` bytes.

    kombu inflates a message whose `compression` header asks for it as soon as the message
    is read, with no limit. zlib, bz2 and lzma get bounded decoders; any other codec kombu
    found installed (brotli, zstd) is refused: its decoder cannot be bounded here.
    """
    inflaters: dict[str, Callable[[], Any]] = {
        "application/x-gzip": zlib.decompressobj,
        "application/x-bz2": bz2.BZ2Decompressor,
        "application/x-lzma": lzma.LZMADecompressor,
    }
    for content_type in kombu.compression.encoders():
        encoder: Any = kombu.compression.get_encoder(content_type)[0]  # type: ignore[index]
        if content_type in inflaters:
            decoder = _bounded(inflaters[content_type], limit)
        else:
            decoder = _refuse_compression(content_type)
        kombu.compression.register(encoder, decoder, content_type)


bound_decompression(settings.max_message_bytes)


def refuse_oversized(request: Any) -> None:
    """MessageTooLarge for a message checked_strategy found over the limit (and emptied)."""
    size = getattr(request, MESSAGE_BYTES_HEADER, None)
    limit = settings.max_message_bytes
    if isinstance(size, int) and size > limit:
        if getattr(request, "compression", None):
            # The decompressor stopped at limit + 1 bytes: the real size is unknown.
            raise MessageTooLarge(f"message body exceeds the maximum of {limit} bytes")
        raise MessageTooLarge(f"message body of {size} bytes exceeds the maximum of {limit}")


def _runtime_for(task: Task) -> runtime.Runtime:
    """The process's runtime, once the message has passed the size limit.

    Checked before runtime.current(): an oversized message carries no kwargs any more, and
    must not reach autoretry (on ModelNotReady), which would re-send it without them.
    """
    try:
        refuse_oversized(task.request)
    except MessageTooLarge:
        with contextlib.suppress(ModelNotReady):
            runtime.current().stats.failed()
        raise
    return runtime.current()


# A failed task leaves ~75 KB of cyclic garbage (the exception, its traceback and the
# tracer's frames) that only a full collection frees, and CPython's full collections wait
# until long-lived objects grow by 25%: a pool process that fails jobs grew from ~100 to
# ~200 MB before one ran. A full collection every so many failures keeps it flat, for a
# few milliseconds each (measured: ~45 ms with the model loaded, amortized <0.5 ms/failure).
COLLECT_EVERY_FAILURES = 100
_failures_since_collect = 0


@task_failure.connect
def _collect_failure_garbage(**_: Any) -> None:
    global _failures_since_collect
    _failures_since_collect += 1
    if _failures_since_collect >= COLLECT_EVERY_FAILURES:
        _failures_since_collect = 0
        gc.collect()


# Bad input is an expected outcome: logged without a traceback, never retried.
# A process without its model may recover: retried with backoff.
_POLICY: dict[str, Any] = {
    "throws": (PermanentError,),
    "autoretry_for": (TransientError,),
    "retry_backoff": True,
    "max_retries": 3,
}


@app.task(name=TASK_PREDICT, bind=True, Strategy=CHECKED_STRATEGY, **_POLICY)
def predict(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return service.predict_one(
        _runtime_for(self),
        args,
        kwargs,
        getattr(self.request, HEADER_ENQUEUED_AT, None),
        self.request.hostname or "",
    )


@app.task(
    name=TASK_PREDICT_BATCH, bind=True, track_started=True, Strategy=CHECKED_STRATEGY, **_POLICY
)
def predict_batch(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return service.predict_batch(
        _runtime_for(self),
        args,
        kwargs,
        getattr(self.request, HEADER_ENQUEUED_AT, None),
        self.request.hostname or "",
    )


@app.task(name=TASK_HEALTH, bind=True, ignore_result=True, Strategy=CHECKED_STRATEGY)
def report_health(self: Task, ttl_s: int | None = None) -> dict[str, Any]:
    refuse_oversized(self.request)
    state = redis_client(settings.backend, settings)
    broker = redis_client(settings.broker, settings)
    try:
        queues = sorted({q for main in QUEUES.values() for q in (main, row_queue(main))})
        report = health.build_report(state, broker, queues)
        default_ttl = int(settings.health_interval_s * 3) + 1
        ttl = ttl_s if isinstance(ttl_s, int) and ttl_s > 0 else default_ttl
        health.store_report(state, report, ttl_s=ttl)
    finally:
        state.close()
        broker.close()
    health.log_report(report)
    return report.model_dump()


@app.task(name=TASK_NOOP, bind=True, Strategy=CHECKED_STRATEGY)
def noop(self: Task) -> dict[str, Any]:
    """Does nothing: Celery's own cost per message, the baseline `python -m producer bench`
    measures inference.predict against. Behind the same message checks as every task."""
    refuse_oversized(self.request)
    return {}
