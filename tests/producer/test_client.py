"""Reading task states from the result backend's JSON documents (fakeredis: no server needed)."""

from __future__ import annotations

import json

import fakeredis
import pytest

from contract.errors import FeatureCountMismatch, ModelNotReady, TaskFailed, TooManyRows
from contract.names import HEALTH_REPORT_KEY, QUEUE_CPU, model_info_key, result_key
from contract.schemas import ModelInfo
from producer.client import Client, raise_for, resolve_queue, status_from_meta
from producer.settings import ProducerSettings


@pytest.fixture
def client() -> Client:
    c = Client(ProducerSettings(redis_url="redis://127.0.0.1:1/0", wait_timeout_s=0.2))
    c.redis = fakeredis.FakeRedis()
    return c


def meta(status: str, result: object) -> bytes:
    return json.dumps({"status": status, "result": result, "task_id": "t"}).encode()


def failure(exc_type: str, message: str, module: str = "producer.errors") -> bytes:
    return meta("FAILURE", {"exc_type": exc_type, "exc_message": [message], "exc_module": module})


def test_states() -> None:
    assert status_from_meta("t", None).state == "PENDING"
    assert status_from_meta("t", meta("STARTED", {"pid": 1})).ready is False
    done = status_from_meta("t", meta("SUCCESS", {"prediction": 1.5}))
    assert done.ready and done.result == {"prediction": 1.5}


def test_failures_become_typed_errors() -> None:
    status = status_from_meta("t", failure("FeatureCountMismatch", "row 0 has 3 features"))
    assert status.error is not None
    assert (status.error.type, status.error.retryable) == ("FeatureCountMismatch", False)
    with pytest.raises(FeatureCountMismatch, match="row 0 has 3 features"):
        raise_for(status)
    transient = status_from_meta("t", failure("ModelNotReady", "not loaded"))
    assert transient.error is not None and transient.error.retryable
    with pytest.raises(ModelNotReady):
        raise_for(transient)


def test_foreign_failures_are_reported_not_imported() -> None:
    status = status_from_meta("t", failure("TimeLimitExceeded", "90.0", "billiard.exceptions"))
    with pytest.raises(TaskFailed, match=r"TimeLimitExceeded: 90\.0"):
        raise_for(status)
    # A class name that is not ours is never looked up elsewhere.
    status = status_from_meta("t", failure("SystemExit", "0", "builtins"))
    with pytest.raises(TaskFailed):
        raise_for(status)


def test_statuses_and_wait_read_the_backend_keys(client: Client) -> None:
    client.redis.set(result_key("a"), meta("SUCCESS", {"prediction": 2.0}))
    client.redis.set(result_key("b"), failure("TooManyRows", "too many"))
    states = client.statuses(["a", "b", "c"])
    assert [s.state for s in states] == ["SUCCESS", "FAILURE", "PENDING"]
    assert client.wait("a") == {"prediction": 2.0}
    with pytest.raises(TooManyRows):
        client.wait("b")
    with pytest.raises(TimeoutError, match="1 task"):
        client.wait("c", timeout=0.05)
    finished = [s.task_id for s in client.iter_finished(["a", "b"])]
    assert sorted(finished) == ["a", "b"]


def test_model_info_drives_early_validation(client: Client) -> None:
    client.validate_rows([[1.0]])  # nothing known yet: the worker decides
    info = ModelInfo(
        name="m", version="v", n_features=2, feature_names=["a", "b"], max_batch_rows=2
    )
    client.redis.set(model_info_key(QUEUE_CPU), info.model_dump_json())
    with pytest.raises(FeatureCountMismatch):
        client.validate_rows([[1.0]])  # read as soon as a worker has published it
    client.model_info(refresh=True)
    with pytest.raises(TooManyRows):
        client.validate_rows([[1.0, 2.0]] * 3)
    # Another queue's workers published nothing: they are not held to these limits.
    client.validate_rows([[1.0]] * 3, queue="gpu")
    assert client.model_info("gpu") is None and client.model_info("cpu") == info


def test_health_reads_the_stored_report(client: Client) -> None:
    assert client.health() is None
    client.redis.set(HEALTH_REPORT_KEY, json.dumps({"status": "ok", "workers": []}))
    assert client.health() == {"status": "ok", "workers": []}


def test_queue_aliases() -> None:
    assert resolve_queue("cpu") == "inference.cpu"
    assert resolve_queue("gpu") == "inference.gpu"
    assert resolve_queue("custom.queue") == "custom.queue"
