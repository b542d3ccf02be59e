"""The queue exporter, `python -m producer metrics --port N`: what no single worker can
see, from one place, for Prometheus to scrape (and queue-length autoscalers to act on).

At each scrape, from Redis (a handful of round trips, whatever the number of queues):
- inference_queue_depth{queue}: jobs waiting, every priority list of the queue summed.
- inference_queue_oldest_age_seconds{queue}: now minus the enqueued_at header
  (contract.names.HEADER_ENQUEUED_AT, set by this project's clients) of the oldest job
  waiting, the one kombu delivers next; 0 for an empty queue, NaN when that job has no
  such header (a stock Celery sender's), since its age cannot be known.
- inference_workers_live{queue}: worker processes consuming the queue whose heartbeat key
  is alive (the same keys as the health report).
- inference_jobs_held{queue}: jobs delivered to a worker and not yet acknowledged (kombu's
  `unacked` hash, by the routing key each held record ends with).

The headers and routing keys are read inside Redis by small Lua scripts: a waiting bulk
chunk of hundreds of kilobytes never crosses the network for its age.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import redis

from contract.metrics import JOBS_HELD, QUEUE_DEPTH, QUEUE_OLDEST_AGE_SECONDS, WORKERS_LIVE
from contract.names import UNACKED_KEY, all_queues, priority_lists
from producer.connections import redis_client
from producer.health import live_states, queue_depths
from producer.settings import ConnectionSettings

log = logging.getLogger(__name__)

# The enqueued_at header of the job each list delivers next (kombu pushes on the left and
# pops on the right), as text; "" for an empty list, "-" for a job without the header.
_OLDEST_LUA = """
local out = {}
for i, key in ipairs(KEYS) do
  local m = redis.call('LINDEX', key, -1)
  if not m then
    out[i] = ''
  else
    out[i] = string.match(m, '"enqueued_at"%s*:%s*([-+%d%.eE]+)') or '-'
  end
end
return out
"""

# Held jobs per routing key: each `unacked` record is the JSON list
# [message, exchange, routing key], so the key is the last string of the record.
_HELD_LUA = """
local counts = {}
for _, v in ipairs(redis.call('HVALS', KEYS[1])) do
  local rk = string.match(v, '"([^"]*)"%s*%]%s*$')
  if rk then counts[rk] = (counts[rk] or 0) + 1 end
end
local out = {}
for rk, n in pairs(counts) do
  out[#out + 1] = rk
  out[#out + 1] = n
end
return out
"""


def oldest_ages(broker: redis.Redis, queues: list[str], now: float) -> dict[str, float]:
    """Seconds the oldest waiting job of each queue has waited (see the module's doc)."""
    keys = [name for q in queues for name in priority_lists(q)]
    heads = broker.eval(_OLDEST_LUA, len(keys), *keys)
    per = len(priority_lists(""))
    ages = {}
    for i, queue in enumerate(queues):
        found = [_text(h) for h in heads[i * per : (i + 1) * per]]
        waiting = [h for h in found if h]
        if not waiting:
            ages[queue] = 0.0
            continue
        # kombu serves the first non-empty list of the queue's priorities next; its job is
        # the one whose age matters, but any waiting job older than it is older still.
        stamps = [_float(h) for h in waiting]
        known = [s for s in stamps if s is not None]
        ages[queue] = max(0.0, now - min(known)) if len(known) == len(stamps) else math.nan
    return ages


def held_per_queue(broker: redis.Redis, queues: list[str]) -> dict[str, int]:
    flat = broker.eval(_HELD_LUA, 1, UNACKED_KEY)
    counts = {_text(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}
    return {q: counts.get(q, 0) for q in queues}


def live_per_queue(state: redis.Redis, queues: list[str]) -> dict[str, int]:
    live: Counter[str] = Counter()
    for s in live_states(state):
        live.update(set(s.queues))
    return {q: live.get(q, 0) for q in queues}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _float(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


class QueueCollector:
    """A prometheus_client collector that reads Redis at each scrape."""

    def __init__(self, broker: redis.Redis, state: redis.Redis, queues: list[str]) -> None:
        self.broker = broker
        self.state = state
        self.queues = queues

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        now = time.time()
        values: dict[str, tuple[str, dict[str, float] | dict[str, int]]] = {
            QUEUE_DEPTH: (
                "Jobs waiting, every priority list of the queue summed.",
                queue_depths(self.broker, self.queues),
            ),
            QUEUE_OLDEST_AGE_SECONDS: (
                "Seconds the oldest waiting job has waited (NaN: it has no enqueued_at).",
                oldest_ages(self.broker, self.queues, now),
            ),
            WORKERS_LIVE: (
                "Live worker processes consuming the queue.",
                live_per_queue(self.state, self.queues),
            ),
            JOBS_HELD: (
                "Jobs delivered to a worker and not yet acknowledged.",
                held_per_queue(self.broker, self.queues),
            ),
        }
        for name, (doc, per_queue) in values.items():
            family = GaugeMetricFamily(name, doc, labels=["queue"])
            for queue in self.queues:
                family.add_metric([queue], float(per_queue[queue]))
            yield family


class Exporter:
    """The queue exporter's HTTP server (/metrics) on a thread of this process."""

    def __init__(
        self,
        settings: ConnectionSettings,
        port: int,
        addr: str = "0.0.0.0",
        queues: list[str] | None = None,
    ) -> None:
        from prometheus_client import CollectorRegistry

        self.broker = redis_client(settings.broker, settings)
        self.state = redis_client(settings.backend, settings)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(QueueCollector(self.broker, self.state, queues or all_queues()))
        self.port = port
        self.addr = addr
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> Exporter:
        from prometheus_client import start_http_server

        self._server, self._thread = start_http_server(
            self.port, addr=self.addr, registry=self.registry
        )
        self.port = self._server.server_port
        return self

    def text(self) -> bytes:
        """What a scrape gets, without the server."""
        from prometheus_client import generate_latest

        return bytes(generate_latest(self.registry))

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        self.broker.close()
        self.state.close()


def serve_forever(settings: ConnectionSettings, port: int, addr: str) -> None:
    exporter = Exporter(settings, port, addr).start()
    log.info("queue metrics on http://%s:%d/metrics", addr, exporter.port)
    try:
        threading.Event().wait()
    finally:
        exporter.close()
