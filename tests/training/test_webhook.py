"""The webhook receiver of `sync --listen`: MLflow's signatures checked as MLflow makes them,
only events about the model's aliases wake the sync."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from mlflow.webhooks.delivery import _generate_hmac_signature

from training.webhook import concerns, signature, start_receiver, verified

SECRET = "s3cret"
EVENT = {
    "entity": "model_version_alias",
    "action": "created",
    "timestamp": "2026-12-02T19:00:00+00:00",
    "data": {"name": "m", "alias": "champion", "version": "2"},
}


def test_signatures_are_mlflows() -> None:
    body = json.dumps(EVENT)
    assert signature(SECRET, "d-1", "1700000000", body) == _generate_hmac_signature(
        SECRET, "d-1", "1700000000", body
    )


def test_only_fresh_requests_signed_with_the_secret_pass() -> None:
    body = json.dumps(EVENT)
    now = 1_700_000_000.0
    good = signature(SECRET, "d-1", "1700000000", body)
    assert verified(SECRET, "d-1", "1700000000", good, body, now=now + 60)
    assert not verified(SECRET, "d-1", "1700000000", good, body + " ", now=now)
    assert not verified("other", "d-1", "1700000000", good, body, now=now)
    assert not verified(SECRET, "d-2", "1700000000", good, body, now=now)
    assert not verified(SECRET, "d-1", "1700000000", good, body, now=now + 301)  # a replay
    assert not verified(SECRET, "d-1", "", good, body, now=now)
    assert not verified(SECRET, "d-1", "1700000000", "", body, now=now)


def test_alias_events_of_the_model_concern_it() -> None:
    assert concerns(EVENT, "m")
    assert concerns({**EVENT, "action": "deleted"}, "m")
    assert not concerns(EVENT, "other")
    assert not concerns({**EVENT, "entity": "model_version"}, "m")
    assert not concerns({"entity": "model_version_alias", "data": []}, "m")
    assert not concerns([], "m")


@pytest.fixture
def receiver() -> Iterator[tuple[str, threading.Event]]:
    wake = threading.Event()
    server = start_receiver("127.0.0.1", 0, SECRET, "m", wake)
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", wake
    finally:
        server.shutdown()
        server.server_close()


def _post(url: str, body: str, secret: str = SECRET) -> int:
    stamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        "x-mlflow-delivery-id": "d-9",  # any case: HTTP header names are not case-sensitive
        "X-MLflow-Timestamp": stamp,
        "X-MLflow-Signature": signature(secret, "d-9", stamp, body),
    }
    request = urllib.request.Request(url, data=body.encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_the_receiver_wakes_the_sync_on_signed_events_only(
    receiver: tuple[str, threading.Event],
) -> None:
    url, wake = receiver
    assert _post(url, json.dumps(EVENT), secret="guess") == 401
    assert not wake.is_set()
    assert _post(url, json.dumps({**EVENT, "data": {"name": "other"}})) == 200
    assert not wake.is_set()
    assert _post(url, "not json") == 400
    assert _post(url, json.dumps(EVENT)) == 200
    assert wake.is_set()
