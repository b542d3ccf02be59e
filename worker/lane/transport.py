"""The row lane's side of kombu's Redis transport: take messages, write results, release.

The only code in the worker that knows how kombu keeps a queue in Redis: a list named after
the queue (a message sent with a priority in a list of its own, `<queue>\\x06\\x16<priority>`),
and a delivered message held until acknowledged in the `unacked` hash (tag -> the JSON list
`[message, exchange, routing key]`) and the `unacked_index` sorted set (tag by delivery
time), from where kombu's own restore hands it back to its queue after the visibility
timeout. The pinned kombu versions (pyproject.toml) keep that layout; a test against
kombu's restore fails if it changes.

Results are written as Celery's Redis backend writes them (SET with the result TTL, then
PUBLISH for AsyncResult.get()); the documents come from worker.results.
"""

from __future__ import annotations

import json
import logging
import re
import time
from importlib import resources

import redis

from contract.names import (  # noqa: F401  (the priority layout is checked here by the tests)
    PRIORITY_SEP,
    PRIORITY_STEPS,
    UNACKED_INDEX_KEY,
    UNACKED_KEY,
    priority_lists,
)
from producer.connections import redis_client
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)

TAKE_MAX_BYTES = 256 * 1024
"""What one take gathers at most, in bytes (the first message is taken whatever its size):
room for a full batch of single rows (~600 bytes each), while a bulk chunk of hundreds of
kilobytes is taken alone, so the chunks queued spread over all processes' lanes instead of
one lane taking them all and the others idling."""

WRITE_RETRY_S = 60.0
"""Seconds a write of results is retried while Redis is away; the messages stay held
(unacknowledged) meanwhile, and come back to the queue if this process gives up or dies."""

_ID_IN_HEAD = re.compile(rb'"id"\s*:\s*"([^"\\]{1,255})"')


def held_record_tail(exchange: str, routing_key: str) -> str:
    """What follows the message in its `unacked` record: `,"<exchange>","<routing key>"]`."""
    return "," + json.dumps([exchange, routing_key])[1:]


def task_id_in_head(raw: bytes, head_bytes: int = 8192) -> str | None:
    """The task id of a message too large to decode, looked for in its head, where the
    producer client writes its headers."""
    found = _ID_IN_HEAD.search(raw[:head_bytes])
    return found.group(1).decode() if found else None


class RowTransport:
    """One queue's messages for one lane: an atomic take, then results and release."""

    def __init__(self, settings: WorkerSettings, queue: str) -> None:
        self.queue = queue
        self.result_ttl = settings.result_ttl_s
        self.broker = redis_client(settings.broker, settings)
        self.backend = redis_client(settings.backend, settings)
        script = resources.files(__package__).joinpath("take.lua").read_text()
        self._take = self.broker.register_script(script)
        self._lists = priority_lists(queue)
        # Held messages go back to the queue they came from, through the default exchange.
        self._record_tail = held_record_tail("", queue)

    def close(self) -> None:
        self.broker.close()
        self.backend.close()

    def take(self, most: int) -> list[tuple[str, bytes]]:
        """Up to `most` messages as (delivery tag, raw message), each recorded as held in the
        same step; "" for a message with no tag (served, but nothing to release)."""
        flat = self._take(
            keys=[UNACKED_KEY, UNACKED_INDEX_KEY, *self._lists],
            args=[most, time.time(), self._record_tail, TAKE_MAX_BYTES],
        )
        return [(_text(flat[i]), flat[i + 1]) for i in range(0, len(flat), 2)]

    def wait_for_work(self, timeout_s: int = 1) -> None:
        """Block until the queue's list has a message, without taking it: a tail-to-tail
        move of a list onto itself leaves it as it was; `take` then takes it atomically.
        Only the default priority's list is watched: a job sent with a priority waits at
        most `timeout_s` when nothing else arrives."""
        self.broker.blmove(self.queue, self.queue, timeout_s, "RIGHT", "RIGHT")

    def finish(self, results: list[tuple[str, str]], tags: list[str]) -> None:
        """Store every result (key, document), then release every tag: a job is released
        only once its result is stored. Retried while Redis is away, up to WRITE_RETRY_S."""
        deadline = time.monotonic() + WRITE_RETRY_S
        while True:
            try:
                if results:
                    with self.backend.pipeline(transaction=False) as pipe:
                        for key, doc in results:
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
