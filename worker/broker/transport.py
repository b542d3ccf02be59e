"""kombu's Redis transport with an atomic take, for the queues Celery's consumer serves.

kombu's consumer pops a message with BRPOP and only then records it as unacknowledged: a
worker killed in between loses that job, whoever sent it. Here the consumer takes with
take.lua instead, which pops and records (kombu's `unacked` hash and index, and this
connection's holder set, see worker.broker.holders) in one step. Redis scripts cannot block,
so while the queues are empty the consumer waits with a BLMOVE of the first queue's list onto
itself, which leaves the list as it was, then takes; a message on another queue or priority
list is taken within `brpop_timeout` (1 s). While there is work, it takes without waiting.

Everything else is kombu's: acknowledgement (plus the holder's set), restore after the
visibility timeout, publishing. The worker's app names this module's `Transport` (or
`SentinelTransport` for `sentinel://` URLs) as its broker transport; producers and stock
clients need nothing.
"""

from __future__ import annotations

import logging
import uuid
from queue import Empty
from time import monotonic
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

from contract.names import held_key
from worker.broker.holders import holders, new_holder
from worker.broker.layout import Take, parse_take, queue_of_list

log = logging.getLogger(__name__)


class QoS(kombu_redis.QoS):
    def append(self, message: Any, delivery_tag: str) -> None:
        # take.lua recorded it as held when it took it: only the local bookkeeping is left.
        virtual.QoS.append(self, message, delivery_tag)

    def _remove_from_indices(self, delivery_tag: str, pipe: Any = None) -> Any:
        with self.pipe_or_acquire(pipe) as pipe:
            pipe.zrem(self.unacked_index_key, delivery_tag).hdel(self.unacked_key, delivery_tag)
            holder = getattr(self.channel, "holder", None)
            return pipe.srem(held_key(holder), delivery_tag) if holder else pipe

    def restore_unacked(self, client: Any = None) -> None:
        # With Redis down (a restart) kombu's hand-back fails, and Celery would take the error
        # for a fatal one. The jobs stay held under this connection's holder, which is no
        # longer kept alive: they go back once it lapses (held_ttl_s).
        try:
            super().restore_unacked(client)
        except Exception as exc:
            log.warning(
                "could not hand %d unacknowledged job(s) back now (%r); they go back to their "
                "queue once this connection's hold lapses, within %g s",
                len(self._delivered or ()), exc, getattr(self.channel, "held_ttl_s", None),
            )  # fmt: skip
            if self._delivered is not None:
                self._delivered.clear()


class Channel(kombu_redis.Channel):
    """kombu's channel, taking with take.lua (the Sentinel channel below inherits it)."""

    QoS = QoS
    from_transport_options = (*kombu_redis.Channel.from_transport_options, "held_ttl_s")

    held_ttl_s: float = 15.0
    """Seconds this connection's hold on its messages outlives the process (transport option
    `held_ttl_s`, from INFERENCE_HELD_TTL_S)."""

    holder: str | None = None
    _taker: Take | None = None
    _take_next = True
    _sent: tuple[str, list[str]] | None = None

    # kombu's, missing from its type stubs.
    _q_for_pri: Any
    _queue_cycle: Any
    _flush_brpop_reauth: Any
    connection_errors: Any

    def _take(self) -> Take:
        if self._taker is None:
            if self.global_keyprefix:
                raise ValueError("the atomic take does not support kombu's global_keyprefix")
            self.holder = new_holder("consumer")
            client = redis.Redis(connection_pool=self.pool)
            holders().add(self.holder, client, self.held_ttl_s, reap=True)
            self._taker = Take(client, self.holder)
        return self._taker

    def _lists(self, queues: list[str]) -> list[str]:
        # kombu's order: every queue's default list first, then each priority in turn.
        return [self._q_for_pri(q, pri) for pri in self.priority_steps for q in queues]

    def _brpop_start(self, timeout: float | None = None) -> None:
        if timeout is None:
            timeout = self.brpop_timeout
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        take = self._take()
        connection = self.client.connection
        self._in_poll = connection
        self._brpop_sent_at = monotonic()
        if self._take_next:
            lists = self._lists(queues)
            keys, args = take.keys_and_args(lists, 1, 1, uuid.uuid4().hex)
            # EVALSHA: the take is the consumer's hot path, and the script is ~1.7 KB; a
            # NOSCRIPT reply (Redis restarted) reloads it and the next poll takes.
            self._sent = ("EVALSHA", lists)
            connection.send_command("EVALSHA", take.sha, len(keys), *keys, *args)
        else:
            first = self._q_for_pri(queues[0], 0)
            self._sent = ("BLMOVE", [])
            connection.send_command("BLMOVE", first, first, "RIGHT", "RIGHT", timeout or 0)

    def _brpop_read(self, **options: Any) -> bool:
        command, lists = self._sent or ("BLMOVE", [])
        try:
            try:
                reply = self.client.parse_response(self.client.connection, command, **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            except redis.exceptions.NoScriptError:
                self._take().load()
                raise Empty() from None
            if command == "BLMOVE":
                # Work arrived (or the wait timed out): take from every list next.
                self._take_next = True
                raise Empty()
            taken = parse_take(reply, lists)
            if not taken:
                self._take_next = False
                raise Empty()
            self._deliver_taken(*taken[0])
            return True
        finally:
            self._in_poll = None
            self._sent = None
            self._flush_brpop_reauth()

    def _deliver_taken(self, name: str, tag: str, raw: bytes) -> None:
        dest = queue_of_list(name)
        self._queue_cycle.rotate(dest)
        self.connection._deliver(_payload(raw, tag), dest)

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        taken = self._take()(self._lists([queue]), 1, 1, uuid.uuid4().hex)
        if not taken:
            raise Empty()
        _, tag, raw = taken[0]
        return _payload(raw, tag)

    def close(self) -> None:
        super().close()
        if self.holder is not None:
            holders().drop(self.holder)


def _payload(raw: bytes, tag: str) -> Any:
    payload = loads(bytes_to_str(raw))
    properties = payload.get("properties") if isinstance(payload, dict) else None
    if isinstance(properties, dict) and tag:
        # A message sent without a tag was recorded under the one the take gave it.
        properties.setdefault("delivery_tag", tag)
    return payload


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    from_transport_options = (*kombu_redis.SentinelChannel.from_transport_options, "held_ttl_s")


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel


def transport_for(url: str) -> str:
    """The broker transport (Celery's `broker_transport`) for a broker URL."""
    name = "SentinelTransport" if url.split("://", 1)[0] == "sentinel" else "Transport"
    return f"{__name__}:{name}"
