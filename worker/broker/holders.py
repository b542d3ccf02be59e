"""Which process holds which message, kept alive while it lives; a dead holder's messages
handed back in seconds.

Each consumer that takes messages (Celery's consumer channel in a worker's main process, the
row lane in each pool process) gets a holder id; take.lua adds every tag it takes to the
holder's set, and acknowledging removes it. A daemon thread per process refreshes the
holder's `alive` key (TTL `ttl_s`) every third of it, whatever the process's own threads are
busy with, so a slow job never lets it lapse. In worker main processes the same thread reaps:
for every holder whose key has lapsed, its held messages are marked as due (their
`unacked_index` score set to 0), and kombu's own restore scan, which every worker runs every
few seconds, hands them back to their queues in its usual way (priority list, exchange,
`redelivered` flag). The visibility timeout stays the backstop for a process that is alive
but stuck.

A holder is per connection, not per process: a consumer that lost its connection (Redis
restarted) takes under a new holder id, and the old one lapses, so the jobs it held come back
without waiting out the visibility timeout.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import uuid

import redis
from redis.commands.core import Script

from contract.names import UNACKED_INDEX_KEY, alive_key, held_key

log = logging.getLogger(__name__)

_REAP = """
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
local n = 0
for _, tag in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  n = n + redis.call('ZADD', KEYS[3], 'XX', 'CH', 0, tag)
end
redis.call('DEL', KEYS[2])
return n
"""
"""KEYS: the holder's alive key, its held set, kombu's unacked index. Atomic, so a holder
that comes back (a refresh racing the reap) keeps its messages, and idempotent: two workers
reaping the same holder mark its messages once."""


def new_holder(kind: str) -> str:
    """An id naming the host, process and consumer, unique per connection."""
    return f"{socket.gethostname()}:{os.getpid()}:{kind}:{uuid.uuid4().hex[:8]}"


class Holders:
    """This process's holders and the thread that keeps them alive (and reaps, if asked)."""

    def __init__(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._live: dict[str, redis.Redis] = {}
        self._ttl_s = 15.0
        self._reaper: redis.Redis | None = None
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, holder: str, client: redis.Redis, ttl_s: float, reap: bool = False) -> None:
        """Keep `holder` alive through `client` (thread-safe: its own pool) from now on; with
        `reap`, this process also hands back the messages of lapsed holders."""
        with contextlib.suppress(redis.RedisError):  # the thread retries
            client.set(alive_key(holder), b"1", px=int(ttl_s * 1000))
        with self._lock:
            self._live[holder] = client
            self._ttl_s = min(self._ttl_s, ttl_s) if len(self._live) > 1 else ttl_s
            if reap:
                self._reaper = client
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="inference-holders", daemon=True
                )
                self._thread.start()

    def drop(self, holder: str, release: bool = True) -> None:
        """Stop keeping `holder` alive; with `release`, end it now, so whatever it still holds
        goes back at the next reap instead of after its TTL."""
        with self._lock:
            client = self._live.pop(holder, None)
            if self._reaper is client and client is not None:
                self._reaper = next(iter(self._live.values()), None)
        if client is not None and release:
            with contextlib.suppress(redis.RedisError):  # else it lapses on its own
                client.delete(alive_key(holder))

    def _run(self) -> None:
        scripts: dict[int, Script] = {}
        while True:
            with self._lock:
                live = dict(self._live)
                reaper = self._reaper
                ttl_ms = int(self._ttl_s * 1000)
            for holder, client in live.items():
                try:
                    client.set(alive_key(holder), b"1", px=ttl_ms)
                except redis.RedisError as exc:
                    log.debug("could not refresh holder %s: %s", holder, exc)
            if reaper is not None:
                try:
                    if id(reaper) not in scripts:
                        scripts.clear()
                        scripts[id(reaper)] = reaper.register_script(_REAP)
                    reap(reaper, scripts[id(reaper)])
                except redis.RedisError as exc:
                    log.debug("could not reap lapsed holders: %s", exc)
            self._wake.wait(ttl_ms / 3000)


def reap(client: redis.Redis, script: Script | None = None) -> int:
    """Mark as due every message of every holder whose alive key has lapsed; returns how many
    were marked. kombu's restore scan then hands them back. `script`: _REAP registered on
    `client` once, for a caller that reaps every few seconds."""
    if script is None:
        script = client.register_script(_REAP)
    marked = 0
    for key in client.scan_iter(match=f"{held_key('')}*", count=500):
        holder = (key.decode() if isinstance(key, bytes) else key)[len(held_key("")) :]
        n = int(script(keys=[alive_key(holder), held_key(holder), UNACKED_INDEX_KEY]))
        if n > 0:
            log.warning("handed back %d job(s) held by %s, which is gone", n, holder)
            marked += n
    return marked


_holders: Holders | None = None


def holders() -> Holders:
    """This process's Holders (a fresh one after a fork: a child inherits no thread)."""
    global _holders
    if _holders is None or _holders._pid != os.getpid():
        _holders = Holders()
    return _holders


__all__ = ["Holders", "holders", "new_holder", "reap"]
