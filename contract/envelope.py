"""Celery task messages as kombu's Redis transport stores them, built and read without Celery.

A message is JSON: Celery's protocol 2 (headers, and a body of [args, kwargs, embed]) inside
kombu's envelope (properties, base64 body), pushed with LPUSH onto the list named after the
queue. Building it here costs ~20 us instead of ~800 us through `Celery.send_task`, and it is
what Celery sends, except that the body is plain JSON text rather than base64: a stock Celery
worker consumes it, and a client in any language can produce it from this description
(docs/contract.md, "The message").
"""

from __future__ import annotations

import base64
import json
import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any

from contract.errors import MessageRefused

# The embed Celery sends with a task that is part of no workflow.
_NO_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_ORIGIN = f"gen{os.getpid()}@{socket.gethostname()}"

CONTENT_TYPE = "application/json"
CONTENT_ENCODING = "utf-8"


def task_message(
    task: str,
    kwargs: dict[str, Any],
    queue: str,
    task_id: str | None = None,
    headers: dict[str, Any] | None = None,
) -> tuple[str, str]:
    """(task id, the message's JSON text) for a protocol-2 task message bound for `queue`."""
    task_id = task_id or str(uuid.uuid4())
    # NaN is written as Celery's JSON serializer writes it: the worker refuses it, with a
    # typed error in the result, rather than the producer failing to send.
    body = json.dumps([[], kwargs, _NO_EMBED], separators=(",", ":"))
    # Properties, then headers, then the body: the worker's take script finds the delivery
    # tag near the start without reading through a large body (worker/broker/take.lua).
    message = {
        "properties": {
            "correlation_id": task_id,
            "reply_to": "",
            "delivery_mode": 2,
            # The default exchange: kombu hands a redelivered message straight back to the
            # list named by routing_key.
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "delivery_tag": str(uuid.uuid4()),
        },
        "headers": {
            "lang": "py",
            "task": task,
            "id": task_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": task_id,
            "parent_id": None,
            # Celery logs these instead of the arguments: a row of features is not worth it.
            "argsrepr": "()",
            "kwargsrepr": "{...}",
            "origin": _ORIGIN,
            "ignore_result": None,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
            **(headers or {}),
        },
        "content-type": CONTENT_TYPE,
        "content-encoding": CONTENT_ENCODING,
        # The JSON body as text, not base64 (kombu's default for Redis): a batch of
        # rows_f32 is base64 already, and wrapping it again costs a third more bytes and a
        # decode in the worker's main process and again in its pool process. kombu reads a
        # message without `body_encoding` as it is.
        "body": body,
    }
    return task_id, json.dumps(message, separators=(",", ":"), allow_nan=False)


@dataclass(frozen=True)
class TaskMessage:
    """A task message read off a queue: its headers and its decoded body."""

    headers: dict[str, Any]
    body: Any

    @property
    def task_id(self) -> Any:
        return self.headers.get("id")

    @property
    def task(self) -> Any:
        return self.headers.get("task")


def read_task_message(raw: bytes | str) -> TaskMessage:
    """Decode what kombu's Redis transport stored; MessageRefused for anything else
    (another serializer, compression, a body that is not JSON)."""
    try:
        envelope = json.loads(raw)
    except ValueError as exc:
        raise MessageRefused(f"message is not JSON: {exc}") from None
    if not isinstance(envelope, dict):
        raise MessageRefused("message is not a JSON object")
    headers = envelope.get("headers")
    props = envelope.get("properties")
    if not isinstance(headers, dict) or not isinstance(props, dict):
        raise MessageRefused("message has no headers or properties")
    if envelope.get("content-type") != CONTENT_TYPE:
        raise MessageRefused(
            f"content type {envelope.get('content-type')!r} is not accepted; send JSON", headers
        )
    if headers.get("compression") is not None:
        raise MessageRefused("compressed messages are not accepted on this queue", headers)
    body = envelope.get("body")
    if not isinstance(body, str):
        raise MessageRefused("message body is not a string", headers)
    try:
        if props.get("body_encoding") == "base64":
            body = base64.b64decode(body, validate=True).decode("utf-8")
        payload = json.loads(body)
    except ValueError as exc:
        raise MessageRefused(f"message body is not JSON: {exc}", headers) from None
    return TaskMessage(headers=headers, body=payload)
