"""kombu's Redis layout, as the pinned kombu versions (pyproject.toml) keep it.

The priority lists are spelled in contract.names (the queue exporter reads them too); the
rest only here: a queue is a list named after it (a message
sent with a priority goes to a list of its own, `<queue>\\x06\\x16<priority>`); a delivered
message is held until acknowledged in the `unacked` hash (tag -> the JSON list
`[message, exchange, routing key]`) and the `unacked_index` sorted set (tag by delivery time),
from where kombu's own restore hands it back after the visibility timeout. tests/worker/
test_transport.py fails first if a kombu release changes any of it.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Sequence
from importlib import resources
from typing import Any

import redis

from contract.names import (
    PRIORITY_SEP,
    UNACKED_INDEX_KEY,
    UNACKED_KEY,
    held_key,
)


def queue_of_list(name: str) -> str:
    """The queue a priority list belongs to."""
    return name.rsplit(PRIORITY_SEP, 1)[0]


@functools.lru_cache(maxsize=4096)
def held_record_tail(exchange: str, routing_key: str) -> str:
    """What follows the message in its `unacked` record: `,"<exchange>","<routing key>"]`.
    Held messages are recorded under the default exchange with their queue as routing key,
    so kombu's restore puts each back on the queue it came from."""
    return "," + json.dumps([exchange, routing_key])[1:]


class Take:
    """The atomic take (take.lua), for one process's holder: messages popped off a queue's
    lists, recorded as held (kombu's `unacked` hash and index, and the holder's set) in the
    same step."""

    def __init__(self, client: redis.Redis, holder: str) -> None:
        script = resources.files(__package__).joinpath("take.lua").read_text()
        self._script = client.register_script(script)
        self.holder_key = held_key(holder)

    def keys_and_args(
        self, lists: Sequence[str], most: int, budget: int, fallback_tag: str = ""
    ) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of one take from `lists` (for sending the script by hand)."""
        keys = [UNACKED_KEY, UNACKED_INDEX_KEY, self.holder_key, *lists]
        tails = [held_record_tail("", queue_of_list(name)) for name in lists]
        return keys, [most, time.time(), budget, fallback_tag, *tails]

    def __call__(
        self, lists: Sequence[str], most: int, budget: int, fallback_tag: str = ""
    ) -> list[tuple[str, str, bytes]]:
        """Up to `most` messages as (list, delivery tag, raw message)."""
        keys, args = self.keys_and_args(lists, most, budget, fallback_tag)
        return parse_take(self._script(keys=keys, args=args), lists)

    @property
    def source(self) -> str:
        return str(self._script.script)

    @property
    def sha(self) -> str:
        """The script's SHA1, for EVALSHA sent by hand."""
        return str(self._script.sha)

    def load(self) -> None:
        """(Re)load the script into Redis: after NOSCRIPT (a restarted or flushed server)."""
        self._script.registered_client.script_load(self._script.script)


def parse_take(flat: Any, lists: Sequence[str]) -> list[tuple[str, str, bytes]]:
    """The script's flat reply (list index, tag, message, ...) as triples."""
    if not flat:
        return []
    return [
        (lists[int(flat[i]) - 1], _text(flat[i + 1]), flat[i + 2]) for i in range(0, len(flat), 3)
    ]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
