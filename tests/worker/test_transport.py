"""The row lane's transport spells kombu's Redis layout as kombu does (unit: no server).

The lane takes and holds messages in kombu's private layout; kombu is pinned in
pyproject.toml, and these fail first if a kombu release changes it. tests/worker/test_lane.py
checks the same against a real Redis, with kombu's own restore and a stock Celery client.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

from kombu.transport import redis as kombu_redis

from contract.envelope import task_message
from contract.names import TASK_PREDICT, UNACKED_INDEX_KEY, UNACKED_KEY
from worker.lane import transport


def test_key_names_and_priority_steps_are_kombus() -> None:
    assert kombu_redis.Channel.sep == transport.PRIORITY_SEP
    assert list(transport.PRIORITY_STEPS) == list(kombu_redis.Channel.priority_steps)
    assert kombu_redis.Channel.unacked_key == UNACKED_KEY
    assert kombu_redis.Channel.unacked_index_key == UNACKED_INDEX_KEY


def test_priority_lists_are_the_lists_kombu_pushes_to() -> None:
    channel = SimpleNamespace(
        sep=kombu_redis.Channel.sep, priority_steps=kombu_redis.PRIORITY_STEPS
    )
    channel.priority = lambda n: kombu_redis.Channel.priority(channel, n)
    kombus = [kombu_redis.Channel._q_for_pri(channel, "q.rows", p) for p in (0, 3, 6, 9)]
    assert transport.priority_lists("q.rows") == kombus
    assert kombus[0] == "q.rows"  # priority 0 is the queue's own list, served first


def test_the_held_record_is_what_kombus_restore_reads() -> None:
    """kombu's restore loads `[message, exchange, routing_key]` and republishes it."""
    _, raw = task_message(TASK_PREDICT, {"features": [1.0]}, "q.rows")
    record = "[" + raw + transport.held_record_tail("", "q.rows")
    message, exchange, routing_key = json.loads(record)
    assert message == json.loads(raw)
    assert (exchange, routing_key) == ("", "q.rows")


def test_a_task_id_is_found_at_either_end_of_a_message_too_large_to_decode() -> None:
    task_id, raw = task_message(TASK_PREDICT, {"features": [0.5] * 500_000}, "q.rows")
    assert transport.task_id_in_ends(raw.encode()) == task_id
    assert transport.task_id_in_ends(b'{"body": "' + b"x" * 10_000 + b'"}') is None
    # A stock kombu client writes the body first: the id and task name are at the end.
    stock = b'{"body": "' + b"x" * 100_000 + b'", "headers": {"task": "t.n", "id": "abc"}}'
    assert transport.task_id_in_ends(stock) == "abc"
    assert transport.task_name_in_ends(stock) == "t.n"
