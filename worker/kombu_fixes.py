"""A guard around kombu's Redis transport, applied when the worker's app is built.

When the broker connection drops, Celery closes it and kombu hands the worker's
unacknowledged jobs back to their queue. With Redis itself down (a restart),
kombu 5.x fails there with an AttributeError rather than a connection error,
which Celery treats as fatal: the whole worker exits. The jobs are still safe
in Redis's unacknowledged set, and any worker restores them once the visibility
timeout has passed, so the hand-back can be skipped instead.
"""

from __future__ import annotations

import logging
from typing import Any

from kombu.transport import redis as kombu_redis

log = logging.getLogger(__name__)

_original_restore_unacked = kombu_redis.QoS.restore_unacked


def _restore_unacked(self: Any, client: Any = None) -> Any:
    try:
        return _original_restore_unacked(self, client)
    except Exception as exc:
        log.warning(
            "could not hand %d unacknowledged job(s) back to Redis now (%r); "
            "they will be redelivered after the visibility timeout",
            len(self._delivered), exc,
        )  # fmt: skip
        return None


def apply() -> None:
    kombu_redis.QoS.restore_unacked = _restore_unacked  # type: ignore[method-assign]
