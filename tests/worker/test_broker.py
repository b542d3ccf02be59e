"""The worker's atomic take on Celery's side, and dead holders' jobs handed back (real Redis).

Messages come from a stock Celery client; the consumer is kombu's own Consumer on the worker's
transport (worker.broker.transport), as Celery's consumer uses it.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from celery import Celery
from kombu import Connection, Consumer, Message, Queue

from contract.names import UNACKED_INDEX_KEY, UNACKED_KEY, alive_key, held_key
from worker.broker import holders
from worker.broker.layout import Take
from worker.broker.transport import SentinelTransport, Transport, transport_for

pytestmark = pytest.mark.integration

QUEUE = "broker-tests"
TRANSPORT = transport_for("redis://x")
# A database of its own, flushed per test: restore_visible hands back every held message in it.
BROKER_DB = 8


@pytest.fixture
def url(redis_url: str) -> Iterator[str]:
    parts = urlsplit(redis_url)
    db_url = urlunsplit(parts._replace(path=f"/{BROKER_DB}"))
    redis.Redis.from_url(db_url).flushdb()
    yield db_url


@pytest.fixture
def client(url: str) -> Iterator[redis.Redis]:
    conn = redis.Redis.from_url(url)
    yield conn
    conn.close()


def send(url: str, n: int, **options: Any) -> list[str]:
    app = Celery("stock-sender", broker=url)
    app.conf.update(task_serializer="json", accept_content=["json"])
    try:
        return [
            app.send_task("inference.predict", kwargs={"features": [i]}, queue=QUEUE, **options).id
            for i in range(n)
        ]
    finally:
        app.close()


def consume(conn: Connection, n: int, timeout_s: float = 5.0) -> list[Message]:
    got: list[Message] = []
    consumer = Consumer(
        conn.default_channel, [Queue(QUEUE)], callbacks=[lambda b, m: got.append(m)]
    )
    consumer.qos(prefetch_count=n)
    with consumer:
        deadline = time.monotonic() + timeout_s
        while len(got) < n and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=0.5)
    return got


def test_the_transport_is_chosen_by_url_scheme() -> None:
    assert transport_for("redis://h:6379/0").endswith(":Transport")
    assert transport_for("rediss://h:6380/0").endswith(":Transport")
    assert transport_for("sentinel://h:26379").endswith(":SentinelTransport")
    assert issubclass(SentinelTransport.Channel, Transport.Channel)


def test_a_taken_message_is_recorded_as_held_until_acknowledged(
    url: str, client: redis.Redis
) -> None:
    ids = send(url, 2)
    with Connection(url, transport=TRANSPORT) as conn:
        got = consume(conn, 2)
        assert [m.headers["id"] for m in got] == ids  # oldest first
        holder = conn.default_channel.holder  # type: ignore[attr-defined]
        for message in got:
            tag = message.delivery_tag
            record = json.loads(client.hget(UNACKED_KEY, tag) or b"null")
            # kombu's record, routed back to the queue the message came from.
            assert record[0]["headers"]["id"] == message.headers["id"]
            assert record[1:] == ["", QUEUE]
            assert client.zscore(UNACKED_INDEX_KEY, tag) is not None
            assert client.sismember(held_key(holder), tag)
        assert client.exists(alive_key(holder))
        got[0].ack()
        tag = got[0].delivery_tag
        assert client.hget(UNACKED_KEY, tag) is None
        assert client.zscore(UNACKED_INDEX_KEY, tag) is None
        assert not client.sismember(held_key(holder), tag)
        assert client.sismember(held_key(holder), got[1].delivery_tag)


def test_a_job_sent_with_a_priority_is_taken_while_the_queue_is_idle(url: str) -> None:
    with Connection(url, transport=TRANSPORT) as conn:
        [task_id] = send(url, 1, priority=6)
        got = consume(conn, 1)
    assert [m.headers["id"] for m in got] == [task_id]


def test_the_take_is_reloaded_after_redis_forgets_its_scripts(
    url: str, client: redis.Redis
) -> None:
    """The consumer sends the take by SHA: a server that forgot it (restarted, or SCRIPT
    FLUSH) answers NOSCRIPT, and the consumer loads it again and takes every job, once."""
    first = send(url, 2)
    with Connection(url, transport=TRANSPORT) as conn:
        got = consume(conn, 2)
        for message in got:
            message.ack()
        client.script_flush()
        sha = conn.default_channel._take().sha  # type: ignore[attr-defined]
        assert client.script_exists(sha) == [False]
        second = send(url, 3)
        got += consume(conn, 3)
        assert client.script_exists(sha) == [True]
        for message in got[2:]:
            message.ack()
    assert [m.headers["id"] for m in got] == first + second
    assert client.hlen(UNACKED_KEY) == 0 and client.llen(QUEUE) == 0


def test_a_dead_holders_jobs_go_back_and_a_live_ones_stay(url: str, client: redis.Redis) -> None:
    ids = send(url, 4)
    with Connection(url, transport=TRANSPORT) as conn:
        got = consume(conn, 3)
        holder = conn.default_channel.holder  # type: ignore[attr-defined]
        # A live holder elsewhere, holding the fourth.
        live = Take(client, "elsewhere:1:lane:live")
        client.set(alive_key("elsewhere:1:lane:live"), 1, ex=60)
        [(_, live_tag, _)] = live([QUEUE], 1, 1)
        assert holders.reap(client) == 0  # both alive: nothing moves

        # The consumer's process dies: its alive key is no longer refreshed.
        holders.holders().drop(holder, release=False)
        client.delete(alive_key(holder))
        assert holders.reap(client) == 3
        assert holders.reap(client) == 0  # once
        assert not client.exists(held_key(holder))
        assert all(client.zscore(UNACKED_INDEX_KEY, m.delivery_tag) == 0 for m in got)
        assert client.zscore(UNACKED_INDEX_KEY, live_tag) > 0  # type: ignore[operator]

    # Any worker's restore scan now hands them back, as after a visibility timeout.
    with Connection(url, transport_options={"visibility_timeout": 3600}) as plain:
        plain.default_channel.qos.restore_visible(num=100)  # type: ignore[attr-defined]
    back = [json.loads(raw) for raw in client.lrange(QUEUE, 0, -1)]
    assert sorted(m["headers"]["id"] for m in back) == sorted(ids[:3])
    assert all(m["headers"]["redelivered"] for m in back)
    assert client.hexists(UNACKED_KEY, live_tag)


def test_a_closed_connections_jobs_go_back_without_waiting_out_its_hold(
    url: str, client: redis.Redis
) -> None:
    """A connection closed cleanly hands back what it holds (kombu's own restore) and ends
    its hold at once."""
    ids = send(url, 2)
    with Connection(url, transport=TRANSPORT) as conn:
        consume(conn, 2)
        holder = conn.default_channel.holder  # type: ignore[attr-defined]
    assert not client.exists(alive_key(holder))
    assert client.hlen(UNACKED_KEY) == 0
    back = [json.loads(raw) for raw in client.lrange(QUEUE, 0, -1)]
    assert sorted(m["headers"]["id"] for m in back) == sorted(ids)


def test_the_sentinel_channel_reads_kombus_sentinel_options_and_ours() -> None:
    options = SentinelTransport.Channel.from_transport_options
    assert {"master_name", "sentinel_kwargs", "held_ttl_s"} <= set(options)
    assert "held_ttl_s" in Transport.Channel.from_transport_options
