"""Task messages built without Celery: the same bytes Celery would send, read back strictly."""

from __future__ import annotations

import base64
import json
import uuid

import pytest
import redis
from celery import Celery

from contract.envelope import MessageRefused, read_task_message, task_message
from contract.names import TASK_PREDICT


def test_a_message_reads_back_with_its_id_task_kwargs_and_headers() -> None:
    task_id, text = task_message(
        TASK_PREDICT, {"features": [1.0, 2.5]}, "q.rows", headers={"enqueued_at": 12.5}
    )
    message = read_task_message(text)
    assert message.task_id == task_id and message.task == TASK_PREDICT
    assert message.headers["enqueued_at"] == 12.5
    args, kwargs, embed = message.body
    assert (args, kwargs) == ([], {"features": [1.0, 2.5]})
    assert embed == {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    envelope = json.loads(text)
    assert envelope["properties"]["delivery_info"] == {"exchange": "", "routing_key": "q.rows"}
    # Every message gets its own delivery tag, the key kombu holds it under.
    assert (
        json.loads(task_message(TASK_PREDICT, {}, "q")[1])["properties"]["delivery_tag"]
        != (envelope["properties"]["delivery_tag"])
    )


@pytest.mark.integration  # Celery's own message, as its Redis transport writes it
def test_the_message_has_every_field_celery_itself_sends(
    celery_sender: Celery, redis_client: redis.Redis
) -> None:
    """Same keys as Celery's own send_task message, so a stock worker takes either."""
    queue = f"envelope-{uuid.uuid4().hex[:8]}"
    celery_sender.send_task(TASK_PREDICT, kwargs={"features": [1.0]}, queue=queue)
    (celery_raw,) = redis_client.lrange(queue, 0, -1)
    redis_client.delete(queue)
    ours = json.loads(task_message(TASK_PREDICT, {"features": [1.0]}, queue)[1])
    theirs = json.loads(celery_raw)
    assert set(ours) == set(theirs)
    assert set(ours["headers"]) == set(theirs["headers"])
    # Ours has no body_encoding: the body is the JSON text itself, not base64.
    assert set(ours["properties"]) == set(theirs["properties"]) - {"body_encoding"}
    assert json.loads(ours["body"])[1:] == json.loads(base64.b64decode(theirs["body"]))[1:]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xff\xfe", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"headers": {}}', "no headers or properties"),
        (
            '{"headers": {"id": "x"}, "properties": {}, "content-type": '
            '"application/x-python-serialize", "body": ""}',
            "content type",
        ),
        (
            '{"headers": {"compression": "application/x-gzip"}, "properties": {}, '
            '"content-type": "application/json", "body": ""}',
            "compressed",
        ),
        (
            '{"headers": {}, "properties": {"body_encoding": "base64"}, '
            '"content-type": "application/json", "body": "!!!"}',
            "not JSON",
        ),
    ],
)
def test_anything_but_a_json_task_message_is_refused_with_a_reason(
    raw: bytes | str, reason: str
) -> None:
    with pytest.raises(MessageRefused, match=reason):
        read_task_message(raw)
