"""The row lane's side of kombu's Redis transport: take messages, write results, release.

Takes with the worker's atomic take (worker.broker: popped and recorded as held, by this
lane's holder, in one step), so a process killed at any moment loses nothing, and its held
jobs go back to the queue once its holder lapses.

Results are written as Celery's Redis backend writes them (SET with the result TTL, then
PUBLISH for AsyncResult.get()), by its rule (a stored SUCCESS is never overwritten, whoever
sends a job under the same id later), in one script (store.lua); the documents come from
worker.results.
"""

from __future__ import annotations

import logging
import re
import time
from importlib import resources

import redis

from contract.names import (  # re-exported: the lane's view of kombu's layout
    PRIORITY_SEP,
    PRIORITY_STEPS,
    UNACKED_INDEX_KEY,
    UNACKED_KEY,
    held_key,
    priority_lists,
)
from producer.connections import redis_client
from worker.broker.holders import holders, new_holder
from worker.broker.layout import Take, held_record_tail
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

_ID_IN_HEADERS = re.compile(rb'"id"\s*:\s*"([^"\\]{1,255})"')
_TASK_IN_HEADERS = re.compile(rb'"task"\s*:\s*"([^"\\]{1,255})"')


def task_id_in_ends(raw: bytes, end_bytes: int = 8192) -> str | None:
    """The task id of a message too large to decode, looked for at both ends: the producer
    client writes its headers first, kombu's own clients after the body."""
    return _in_ends(_ID_IN_HEADERS, raw, end_bytes)


def task_name_in_ends(raw: bytes, end_bytes: int = 8192) -> str | None:
    """The task name of a message too large to decode, found as task_id_in_ends finds ids."""
    return _in_ends(_TASK_IN_HEADERS, raw, end_bytes)


def _in_ends(pattern: re.Pattern[bytes], raw: bytes, end_bytes: int) -> str | None:
    for end in (raw[:end_bytes], raw[-end_bytes:]):
        found = pattern.search(end)
        if found:
            return found.group(1).decode()
    return None


class RowTransport:
    """One queue's messages for one lane: an atomic take, then results and release."""

    def __init__(self, settings: WorkerSettings, queue: str) -> None:
        self.queue = queue
        self.result_ttl = settings.result_ttl_s
        # No retries hidden inside redis-py: a take whose reply is lost with its connection
        # has run (its messages are held), and a silent resend would take others under the
        # same holder, leaving the first ones held by a live process. Every error reaches
        # the lane instead, which takes under a new holder from then on (renew_holder).
        self.broker = redis_client(settings.broker, settings, retries=0)
        self.backend = redis_client(settings.backend, settings)
        self._lists = priority_lists(queue)
        self.result_replicas = settings.result_replicas
        self.result_replicas_timeout_ms = settings.result_replicas_timeout_ms
        self.held_ttl_s = settings.held_ttl_s
        self.holder = new_holder("lane")
        holders().add(self.holder, self.broker, settings.held_ttl_s)
        self._take = Take(self.broker, self.holder)
        script = resources.files(__package__).joinpath("store.lua").read_text()
        self._store = self.backend.register_script(script)

    def close(self) -> None:
        holders().drop(self.holder)
        self.broker.close()
        self.backend.close()

    def take(self, most: int) -> list[tuple[str, bytes]]:
        """Up to `most` messages as (delivery tag, raw message), each recorded as held in the
        same step; "" for a message with no tag (served, but nothing to release)."""
        return [(tag, raw) for _, tag, raw in self._take(self._lists, most, TAKE_MAX_BYTES)]

    def wait_for_work(self, timeout_s: int = 1) -> None:
        """Block until the queue's list has a message, without taking it: a tail-to-tail
        move of a list onto itself leaves it as it was; `take` then takes it atomically.
        Only the default priority's list is watched: a job sent with a priority waits at
        most `timeout_s` when nothing else arrives."""
        self.broker.blmove(self.queue, self.queue, timeout_s, "RIGHT", "RIGHT")

    def _store_results(self, results: list[tuple[str, str]]) -> list[bytes | str]:
        keys = [key for key, _ in results]
        args: list[int | str] = [self.result_ttl, *(doc for _, doc in results)]
        if not self.result_replicas:
            return list(self._store(keys=keys, args=args))
        with self.backend.pipeline(transaction=False) as pipe:
            self._store(keys=keys, args=args, client=pipe)
            # WAIT counts this connection's writes: the pipeline keeps both on one.
            pipe.wait(self.result_replicas, self.result_replicas_timeout_ms)
            kept, acked = pipe.execute()
        if int(acked) < self.result_replicas:
            log.warning(
                "row lane: %d result(s) confirmed by %s of %d replica(s) within %d ms; "
                "acknowledging their jobs all the same",
                len(results), acked, self.result_replicas, self.result_replicas_timeout_ms,
            )  # fmt: skip
        return list(kept)

    def renew_holder(self) -> None:
        """Take under a new holder from now on, and let the old one lapse. After a lost
        connection a take's reply may have been lost with it (the script ran: its messages
        are held, but not in this process's hands) or Redis may have failed over to a replica
        that knows another state: whatever the old holder holds there goes back once it
        lapses, and what this process still has in hand is released as usual."""
        holders().drop(self.holder, release=False)
        self.holder = new_holder("lane")
        holders().add(self.holder, self.broker, self.held_ttl_s)
        self._take = Take(self.broker, self.holder)

    def finish(self, results: list[tuple[str, str]], tags: list[str]) -> None:
        """Store every result (key, document), then release every tag: a job is released
        only once its result is stored. Retried while Redis is away, up to WRITE_RETRY_S."""
        deadline = time.monotonic() + WRITE_RETRY_S
        while True:
            try:
                if results:
                    kept = self._store_results(results)
                    results = []
                    for key in kept:
                        log.warning(
                            "row lane: %s already holds a successful result, kept as it is: "
                            "a job run twice, or a task id reused by another sender",
                            key.decode() if isinstance(key, bytes) else key,
                        )
                if tags:
                    with self.broker.pipeline(transaction=False) as pipe:
                        pipe.zrem(UNACKED_INDEX_KEY, *tags)
                        pipe.hdel(UNACKED_KEY, *tags)
                        pipe.srem(held_key(self.holder), *tags)
                        pipe.execute()
                return
            except redis.RedisError as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("row lane: could not write results yet: %s", exc)
                time.sleep(0.5)


__all__ = [
    "PRIORITY_SEP",
    "PRIORITY_STEPS",
    "TAKE_MAX_BYTES",
    "RowTransport",
    "held_record_tail",
    "priority_lists",
    "task_id_in_ends",
    "task_name_in_ends",
]
