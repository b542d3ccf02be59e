"""The gateway as its users call it: a real `python -m gateway` (uvicorn), a real httpx client,
the shared prefork worker behind it, and answers checked against the model itself."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import httpx
import numpy as np
import pytest

from contract.names import TASK_HEALTH
from contract.schemas import decode_f32, encode_f32
from producer import Client
from producer.settings import ProducerSettings
from tests.gateway.support import MAX_WAIT_S, assert_serves, problem
from tests.support import TEST_MAX_BATCH_ROWS, RunningWorker, TrainedModel

pytestmark = pytest.mark.integration


def poll(http: httpx.Client, url: str, timeout_s: float = 30) -> dict[str, Any]:
    """The job's status once it is finished."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = http.get(url)
        assert response.status_code == 200, response.text
        status = response.json()
        if status["state"] in ("SUCCESS", "FAILURE", "REVOKED") or time.monotonic() > deadline:
            return status
        time.sleep(0.02)


# -- the seed's API ----------------------------------------------------------------------------


def test_predict_answers_the_model_prediction_with_the_seed_fields_and_the_workers(
    http: httpx.Client, trained_model: TrainedModel, cpu_worker: RunningWorker
) -> None:
    rows = trained_model.X_test[:5]
    expected = trained_model.reference(rows)
    for row, want in zip(rows, expected, strict=True):
        response = http.post("/api/v1/predict", json={"data": row.tolist()})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
        body = response.json()
        assert body["prediction"] == pytest.approx(float(want), abs=1e-6)

    # The seed's fields, the result document's, and the job's id.
    assert {"prediction", "latency_ms", "total_time_ms", "model_format", "features_count"} <= set(
        body
    )
    assert body["model_format"] == "ONNX" and body["features_count"] == rows.shape[1]
    assert body["model_name"] == trained_model.manifest.name
    assert body["model_version"] == trained_model.manifest.version
    assert body["provider"] == "CPUExecutionProvider" and body["device"] == "cpu"
    assert body["hostname"] == cpu_worker.hostname and body["batch_size"] >= 1
    assert body["latency_ms"] == body["latency"]["inference_ms"]
    assert body["total_time_ms"] >= body["latency"]["task_ms"] > 0
    # The job is an ordinary one: its status is there to read, with the same answer.
    status = http.get(f"/api/v1/jobs/{body['task_id']}").json()
    assert status["state"] == "SUCCESS"
    assert status["result"]["prediction"] == body["prediction"]


def test_batch_predict_answers_every_row_in_order(
    http: httpx.Client, trained_model: TrainedModel
) -> None:
    rows = trained_model.X_test[:200]
    response = http.post("/api/v1/predict/batch", json={"data": rows.tolist()})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["rows"] == 200 and body["task_id"]
    np.testing.assert_allclose(body["predictions"], trained_model.reference(rows), atol=1e-6)


def test_explain_answers_each_rows_contributions_summing_to_its_prediction(
    http: httpx.Client, trained_model: TrainedModel
) -> None:
    rows = trained_model.X_test[:20]
    response = http.post("/api/v1/explain", json={"data": rows.tolist()})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["rows"] == 20 and body["task_id"] and body["total_time_ms"] > 0
    assert body["feature_names"] == trained_model.manifest.feature_names
    assert body["model_version"] == trained_model.manifest.version
    np.testing.assert_allclose(body["predictions"], trained_model.reference(rows), atol=1e-5)
    sums = body["base_value"] + np.asarray(body["contributions"]).sum(axis=1)
    np.testing.assert_allclose(sums, body["predictions"], atol=1e-4)
    # Checked against the model before it is enqueued, as a batch is.
    problem(http.post("/api/v1/explain", json={"data": [[1.0, 2.0]]}), 422, "FeatureCountMismatch")


def test_health_answers_the_report_of_the_live_worker(
    http: httpx.Client, producer_settings: ProducerSettings, cpu_worker: RunningWorker
) -> None:
    # The report beat would ask for, asked for now, from the worker itself.
    started = time.time()
    with Client(producer_settings) as client:
        client.send(TASK_HEALTH, {}, "cpu")
    deadline = time.monotonic() + 30
    while True:
        response = http.get("/api/v1/predict/health")
        body = response.json()
        fresh = response.status_code == 200 and body["generated_at"] >= started
        if fresh or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert response.status_code == 200, response.text
    assert body["status"] in ("ok", "degraded")
    assert body["model_loaded"] is True and body["model_format"] == "ONNX"
    assert cpu_worker.hostname in [w["hostname"] for w in body["workers"]]


def test_model_answers_what_the_workers_published(
    http: httpx.Client, trained_model: TrainedModel
) -> None:
    response = http.get("/api/v1/model")
    assert response.status_code == 200, response.text
    info = response.json()
    assert info["name"] == trained_model.manifest.name
    assert info["version"] == trained_model.manifest.version
    assert info["n_features"] == trained_model.X_test.shape[1]
    assert info["max_batch_rows"] == TEST_MAX_BATCH_ROWS


# -- jobs ----------------------------------------------------------------------------------


def test_a_job_is_accepted_located_and_read_as_the_producer_reads_it(
    http: httpx.Client, trained_model: TrainedModel, producer_settings: ProducerSettings
) -> None:
    row = trained_model.X_test[3]
    response = http.post("/api/v1/jobs", json={"features": row.tolist()})
    assert response.status_code == 202, response.text
    accepted = response.json()
    task_id = accepted["task_id"]
    assert accepted == {
        "task_id": task_id,
        "state": "PENDING",
        "status_url": f"/api/v1/jobs/{task_id}",
    }
    assert response.headers["location"] == accepted["status_url"]

    status = poll(http, response.headers["location"])
    assert status["state"] == "SUCCESS", status
    expected = float(trained_model.reference(row[None])[0])
    assert status["result"]["prediction"] == pytest.approx(expected, abs=1e-6)
    # Exactly what `python -m producer status TASK_ID` prints.
    with Client(producer_settings) as client:
        assert status == client.status(task_id).model_dump(exclude_none=True)


def test_a_long_poll_answers_once_the_job_is_finished(
    http: httpx.Client, trained_model: TrainedModel
) -> None:
    rows = trained_model.X_test[:100]
    task_id = http.post("/api/v1/jobs", json={"rows": rows.tolist()}).json()["task_id"]
    response = http.get(f"/api/v1/jobs/{task_id}", params={"wait": 30})
    assert response.status_code == 200, response.text
    status = response.json()
    assert status["state"] == "SUCCESS", status
    np.testing.assert_allclose(
        status["result"]["predictions"], trained_model.reference(rows), atol=1e-6
    )


def test_a_long_poll_of_an_unfinished_job_answers_its_state_at_the_cap(
    http: httpx.Client, trained_model: TrainedModel
) -> None:
    # An id nobody sent: PENDING, as Celery reads it, at once or at the end of a long poll
    # (cut from 30 s to the gateway's cap).
    unknown = f"never-sent-{uuid.uuid4()}"
    response = http.get(f"/api/v1/jobs/{unknown}")
    assert response.status_code == 200 and response.json() == {
        "task_id": unknown,
        "state": "PENDING",
    }
    started = time.monotonic()
    response = http.get(f"/api/v1/jobs/{unknown}", params={"wait": 30})
    elapsed = time.monotonic() - started
    assert response.status_code == 200 and response.json()["state"] == "PENDING"
    assert MAX_WAIT_S * 0.9 <= elapsed < MAX_WAIT_S + 5
    assert_serves(http, trained_model)


def test_a_float32_job_answers_float32_predictions(
    http: httpx.Client, trained_model: TrainedModel
) -> None:
    rows = trained_model.X_test[:64]
    body = {"rows_f32": encode_f32(rows), "n_features": rows.shape[1], "queue": "cpu"}
    response = http.post("/api/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    status = http.get(response.headers["location"], params={"wait": MAX_WAIT_S}).json()
    assert status["state"] == "SUCCESS", status
    predictions = decode_f32(status["result"]["predictions_f32"])
    np.testing.assert_allclose(predictions, trained_model.reference(rows), atol=1e-6)


def test_a_job_the_worker_refuses_reads_failure_with_the_contract_error(
    http: httpx.Client, trained_model: TrainedModel
) -> None:
    # The gateway checks the shape of float32 rows; their values are the worker's to check.
    rows = trained_model.X_test[:2].copy()
    rows[0, 1] = np.nan
    body = {"rows_f32": encode_f32(rows), "n_features": rows.shape[1]}
    response = http.post("/api/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    status = poll(http, response.headers["location"])
    assert status["state"] == "FAILURE"
    assert status["error"] == {
        "type": "InvalidInput",
        "message": "rows_f32.0.1: Input should be a finite number",
        "retryable": False,
    }
    assert_serves(http, trained_model)


# -- bad requests: each answered with a problem document, and the next one served ----------


def test_malformed_json_is_a_422_problem(http: httpx.Client, trained_model: TrainedModel) -> None:
    response = http.post(
        "/api/v1/predict",
        content=b'{"data": [0.1, 0.2,',
        headers={"content-type": "application/json"},
    )
    doc = problem(response, 422, "InvalidInput")
    assert doc["detail"].startswith("body: not JSON")
    assert_serves(http, trained_model)


def test_a_body_not_sent_as_json_is_a_415_problem(
    http: httpx.Client, trained_model: TrainedModel
) -> None:
    response = http.post(
        "/api/v1/predict", content=b"data=1", headers={"content-type": "text/plain"}
    )
    problem(response, 415, "Unsupported Media Type")
    assert_serves(http, trained_model)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/v1/predict", {"data": [0.1, 0.2]}),
        ("/api/v1/predict/batch", {"data": [[0.1, 0.2, 0.3, 0.4, 0.5], [0.1]]}),
        ("/api/v1/jobs", {"rows": [[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]]}),
        ("/api/v1/jobs", {"rows_f32": encode_f32([[1.0, 2.0]]), "n_features": 2}),
    ],
)
def test_a_wrong_feature_count_is_a_422_feature_count_mismatch(
    http: httpx.Client, trained_model: TrainedModel, path: str, body: dict[str, Any]
) -> None:
    doc = problem(http.post(path, json=body), 422, "FeatureCountMismatch")
    assert doc["type"] == "https://queue-inference/errors/FeatureCountMismatch"
    assert "the model expects 5" in doc["detail"] and doc["retryable"] is False
    assert_serves(http, trained_model)


@pytest.mark.parametrize(
    ("text", "field", "message"),
    [
        ('{"data": [0.1, NaN, 0.3, 0.4, 0.5]}', "data.1", "finite number"),
        ('{"data": [0.1, 0.2, Infinity, 0.4, 0.5]}', "data.2", "finite number"),
        ('{"data": [0.1, "0.2", 0.3, 0.4, 0.5]}', "data.1", "valid number"),
        ('{"data": [0.1, 0.2, 0.3, true, 0.5]}', "data.3", "valid number"),
        ('{"data": [0.1, 0.2, 0.3, 0.4, null]}', "data.4", "valid number"),
        ('{"data": []}', "data", "at least 1 item"),
        ('{"rows": [[0.1, 0.2, 0.3, 0.4, 0.5]], "features": [1]}', "body", "exactly one"),
        ('{"data": [0.1, 0.2, 0.3, 0.4, 0.5], "extra": 1}', "extra", "not permitted"),
    ],
)
def test_values_the_contract_refuses_are_a_422_naming_the_field(
    http: httpx.Client, trained_model: TrainedModel, text: str, field: str, message: str
) -> None:
    path = "/api/v1/jobs" if '"rows"' in text else "/api/v1/predict"
    response = http.post(path, content=text, headers={"content-type": "application/json"})
    doc = problem(response, 422, "InvalidInput")
    assert doc["detail"].startswith(f"{field}: ") and message in doc["detail"], doc
    assert doc["errors"][0]["field"] == field
    assert_serves(http, trained_model)


def test_too_many_rows_is_a_422_too_many_rows(
    http: httpx.Client, trained_model: TrainedModel
) -> None:
    rows = [[0.1, 0.2, 0.3, 0.4, 0.5]] * (TEST_MAX_BATCH_ROWS + 1)
    doc = problem(http.post("/api/v1/predict/batch", json={"data": rows}), 422, "TooManyRows")
    assert str(TEST_MAX_BATCH_ROWS) in doc["detail"]
    assert_serves(http, trained_model)


def test_a_100_mb_body_is_a_413_and_the_server_serves_on(
    gateway: Any, http: httpx.Client, trained_model: TrainedModel
) -> None:
    body = b'{"data": [' + b"0.1, " * (20 << 20) + b"0.1]}"
    assert len(body) > 100_000_000
    response = http.post(
        "/api/v1/predict/batch", content=body, headers={"content-type": "application/json"}
    )
    doc = problem(response, 413)
    assert "INFERENCE_GATEWAY_MAX_BODY_BYTES" in doc["detail"]
    assert gateway.running
    assert_serves(http, trained_model)

    # Sent without a length (chunked): refused once the count passes the limit.
    def chunks() -> Any:
        for _ in range(100):
            yield b" " * (1 << 20)

    response = http.post(
        "/api/v1/predict/batch", content=chunks(), headers={"content-type": "application/json"}
    )
    problem(response, 413)
    assert_serves(http, trained_model)


@pytest.mark.parametrize("task_id", ["x" * 256, "a%20b", "caf%C3%A9", "tab%09"])
def test_a_malformed_job_id_is_a_422(
    http: httpx.Client, trained_model: TrainedModel, task_id: str
) -> None:
    doc = problem(http.get(f"/api/v1/jobs/{task_id}"), 422, "InvalidInput")
    assert doc["errors"][0]["field"] == "task_id"
    assert_serves(http, trained_model)


def test_an_unknown_path_or_method_is_a_problem(
    http: httpx.Client, trained_model: TrainedModel
) -> None:
    problem(http.get("/api/v1/nothing-here"), 404, "Not Found")
    response = http.delete("/api/v1/model")
    problem(response, 405, "Method Not Allowed")
    assert response.headers["allow"] == "GET"
    assert_serves(http, trained_model)


def test_the_openapi_schema_and_the_docs_page_are_served(http: httpx.Client) -> None:
    schema = http.get("/openapi.json").json()
    assert {"/api/v1/predict", "/api/v1/jobs", "/api/v1/jobs/{task_id}"} <= set(schema["paths"])
    docs = http.get("/docs")
    assert docs.status_code == 200 and "swagger-ui" in docs.text and "/openapi.json" in docs.text
    json.dumps(schema)  # plain JSON through and through
