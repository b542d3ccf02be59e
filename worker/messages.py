"""Checks of a task message's headers and body, before anything acts on them.

Shared by Celery's path (worker.guards.checked_strategy) and the single-row lane
(worker.lane), so a message is held to the same rules whichever way it comes.
"""

from __future__ import annotations

from typing import Any

from celery.utils.time import maybe_iso8601

MAX_ID_CHARS = 255

_STR = (str,)
_OPT_STR = (str, type(None))
# Headers Celery's worker reads, with the types it assumes. A message that breaks them
# makes Celery's Request raise a KeyError or TypeError in the consumer, which Celery
# takes for a lost connection: it reconnects, the message is redelivered, and the queue
# is stuck on it for good. (eta and expires Celery checks itself; timelimit is dropped.)
_HEADER_TYPES: dict[str, tuple[type, ...]] = {
    "id": _STR,
    "task": _STR,
    "root_id": _OPT_STR,
    "parent_id": _OPT_STR,
    "group": _OPT_STR,
    "shadow": _OPT_STR,
    "origin": _OPT_STR,
    "lang": _OPT_STR,
    "argsrepr": _OPT_STR,
    "kwargsrepr": _OPT_STR,
    "retries": (int,),
    "group_index": (int, type(None)),
    "replaced_task_nesting": (int,),
    "ignore_result": (bool, type(None)),
    "stamped_headers": (list, type(None)),
    "stamps": (dict, type(None)),
}

# The only embed (canvas) fields a Celery client sends; a predict job takes no part in a
# workflow, so each must be null. Any other key would overwrite the task's request.
_EMBED_KEYS = frozenset({"callbacks", "errbacks", "chain", "chord"})


def body_size(body: object) -> int:
    """Bytes in a message body as kombu hands it over (after base64 and decompression)."""
    if isinstance(body, bytes | bytearray | memoryview):
        return len(body)
    if isinstance(body, str):
        # isascii() is O(1) in CPython; only non-ASCII text pays for an encode.
        return len(body) if body.isascii() else len(body.encode("utf-8", "surrogatepass"))
    return 0


def envelope_problem(headers: dict[str, Any]) -> str | None:
    """Why Celery could not handle a message with these headers, or None."""
    task_id = headers.get("id")
    if not task_id:
        return "task message has no id header"
    if isinstance(task_id, str):
        # The id names the result's Redis key: it must encode, and not be a payload itself.
        if len(task_id) > MAX_ID_CHARS:
            return f"task message id is longer than {MAX_ID_CHARS} characters"
        try:
            task_id.encode("utf-8")
        except UnicodeEncodeError:
            return "task message id is not valid Unicode"
    for name, types in _HEADER_TYPES.items():
        if name in headers:
            value = headers[name]
            # bool is an int to isinstance(); as a count it is a mistake.
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                return f"task message header {name!r} is a {type(value).__name__}"
    stamped = headers.get("stamped_headers")
    if stamped and not all(isinstance(h, str) for h in stamped):
        # Looked up in a dict by Celery's revoked() check: an unhashable one is a TypeError.
        return "task message header 'stamped_headers' is not a list of strings"
    for name in ("eta", "expires"):
        # Celery refuses a bad one too, but drops the message without a result.
        value = headers.get(name)
        if value is not None:
            try:
                maybe_iso8601(value)
            except (AttributeError, ValueError, TypeError):
                return f"task message header {name!r} is not an ISO 8601 time"
    return None


def body_problem(payload: object) -> str | None:
    """Why a decoded body is not protocol 2's [args, kwargs, embed], or None."""
    if not isinstance(payload, list | tuple) or len(payload) != 3:
        return "task message body is not [args, kwargs, embed]"
    args, kwargs, embed = payload
    if not isinstance(args, list | tuple):
        return "task message args are not a list"
    if not isinstance(kwargs, dict):
        return "task message kwargs are not a mapping"
    if "self" in kwargs:
        # Celery calls the task as f(self, *args, **kwargs): a TypeError, not our schema's.
        return "kwarg 'self' is not accepted"
    if embed is None:
        return None
    if not isinstance(embed, dict):
        return "task message embed is not a mapping"
    if not _EMBED_KEYS.issuperset(embed) or any(v is not None for v in embed.values()):
        return "task message embed must be null callbacks, errbacks, chain and chord"
    return None
