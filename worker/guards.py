"""Guards in front of Celery's own message handling, in the worker's main process.

- checked_strategy: cheap checks of every task message before Celery handles it.
- GuardedConsumer: a message Celery's handler fails on is dropped, not fatal.
- bound_decompression: kombu's decompressors stop at the message size limit (applied at
  worker start by worker.lifecycle, never at import).
"""

from __future__ import annotations

import bz2
import contextlib
import logging
import lzma
import zlib
from collections.abc import Callable
from typing import Any

import kombu.compression
from celery import Task
from celery.exceptions import InvalidTaskError
from celery.worker.consumer import Consumer
from celery.worker.strategy import default as default_strategy

from contract.errors import InvalidInput, MessageTooLarge
from contract.names import TASK_PREDICT
from worker import observe
from worker.messages import body_problem, body_size, envelope_problem
from worker.settings import load

log = logging.getLogger(__name__)

# Set by checked_strategy on every message it lets through (a value the producer put there
# is overwritten); Celery copies message headers into the task's request.
MESSAGE_BYTES_HEADER = "inference_message_bytes"

# What an oversized message's body is replaced with: no args, no kwargs, no embed.
_EMPTY_BODY = b"[[], {}, {}]"


def _fail(app: Any, task_id: Any, reason: str) -> None:
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
      max_message_bytes (max_row_message_bytes for a single row) is replaced by an empty
      one first, and the task fails the job with MessageTooLarge: the producer gets a
      typed error, and the pool never sees the bytes.
    - Time limits: a producer may not stretch them per message (the header is dropped).

    A refused message with a usable id gets an InvalidInput FAILURE result.
    """
    handle = default_strategy(task, app, consumer, **options)
    limit = message_limit(task.name)

    def handle_checked(message: Any, body: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return checked(message, body, *args, **kwargs)
        except InvalidTaskError:
            observe.refused(message, task.name)
            raise

    def checked(message: Any, body: Any, *args: Any, **kwargs: Any) -> Any:
        if body is not None:
            # Protocol 1 (no `task` header): the consumer has decoded the whole body
            # already, and its headers would not reach the task.
            raise InvalidTaskError("task protocol 1 is not accepted; send protocol 2")
        headers = message.headers
        problem = envelope_problem(headers)
        if problem is not None:
            _fail(app, headers.get("id"), problem)
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
            _fail(app, headers["id"], f"task message refused: {exc}")
            raise InvalidTaskError(f"task message refused: {exc!r}") from exc
        problem = body_problem(payload)
        if problem is not None:
            _fail(app, headers["id"], problem)
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
                    _fail(self.app, headers.get("id"), f"task message refused: {exc!r}")
                return None

        return on_task_received


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


def message_limit(task_name: str | None) -> int:
    """The largest message body accepted for a task: a single row's is far smaller than a
    batch's."""
    settings = load()
    if task_name == TASK_PREDICT:
        return min(settings.max_message_bytes, settings.max_row_message_bytes)
    return settings.max_message_bytes


def refuse_oversized(request: Any) -> None:
    """MessageTooLarge for a message checked_strategy found over the limit (and emptied)."""
    size = getattr(request, MESSAGE_BYTES_HEADER, None)
    limit = message_limit(getattr(request, "task", None))
    if isinstance(size, int) and size > limit:
        if getattr(request, "compression", None):
            # The decompressor stopped at limit + 1 bytes: the real size is unknown.
            raise MessageTooLarge(f"message body exceeds the maximum of {limit} bytes")
        raise MessageTooLarge(f"message body of {size} bytes exceeds the maximum of {limit}")
