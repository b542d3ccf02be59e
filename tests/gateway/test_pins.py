"""Version pins and routing keys through the app, without a server: in the body or as headers,
checked, passed to the client as its keyword arguments; the version and arm that served a job
in its answer; a version the workers cannot serve as a problem."""

from __future__ import annotations

from typing import Any

import pytest

from contract import errors
from gateway.routes import PIN_HEADER, ROUTING_KEY_HEADER
from tests.gateway.fakes import RESULT, TASK_ID, FakeClient, http
from tests.gateway.support import problem

ROW = [0.1, 0.2, 0.3, 0.4, 0.5]

# Every route that enqueues a job, with a body for each kind of job it takes.
ENQUEUING: list[tuple[str, dict[str, Any], str]] = [
    ("/api/v1/predict", {"data": ROW}, "submit"),
    ("/api/v1/predict/batch", {"data": [ROW, ROW]}, "submit_batch"),
    ("/api/v1/explain", {"data": [ROW, ROW]}, "submit_explain"),
    ("/api/v1/jobs", {"features": ROW}, "submit"),
    ("/api/v1/jobs", {"rows": [ROW]}, "submit_batch"),
    ("/api/v1/jobs", {"rows_f32": "AACAPw==", "n_features": 1}, "submit_batch_f32"),
]
ROUTES = pytest.mark.parametrize(("path", "body", "method"), ENQUEUING)
NO_ROUTE = {"model_version": None, "routing_key": None}
ARMS = ("champion", "challenger", "pinned")
# A result every synchronous route can answer (each passes the others' fields through).
EITHER = {
    **RESULT,
    "predictions": [12.5, 12.5],
    "rows": 2,
    "feature_names": [f"x{i}" for i in range(5)],
    "base_value": 10.0,
    "contributions": [[0.5] * 5, [0.5] * 5],
}


def _fake() -> FakeClient:
    return FakeClient(result=dict(EITHER))


def _submitted(fake: FakeClient) -> list[str]:
    return [c[0] for c in fake.calls if c[0].startswith("submit")]


@ROUTES
def test_a_pin_and_a_key_in_the_body_reach_the_client(
    path: str, body: dict[str, Any], method: str
) -> None:
    fake = _fake()
    routed = {**body, "model_version": "challenger", "routing_key": "user-42"}
    response = http(fake).post(path, json=routed)
    assert response.status_code in (200, 202), response.text
    assert _submitted(fake) == [method]
    assert fake.routes == [{"model_version": "challenger", "routing_key": "user-42"}]


@ROUTES
def test_a_pin_and_a_key_as_headers_reach_the_client(
    path: str, body: dict[str, Any], method: str
) -> None:
    fake = _fake()
    headers = {PIN_HEADER: "20261128-001839-22b4fe", ROUTING_KEY_HEADER: "account 7"}
    response = http(fake).post(path, json=body, headers=headers)
    assert response.status_code in (200, 202), response.text
    assert fake.routes == [{"model_version": "20261128-001839-22b4fe", "routing_key": "account 7"}]


@ROUTES
def test_without_either_the_workers_choose(path: str, body: dict[str, Any], method: str) -> None:
    fake = _fake()
    assert http(fake).post(path, json=body).status_code in (200, 202)
    assert fake.routes == [NO_ROUTE]


def test_header_names_are_case_insensitive_and_may_repeat_the_body() -> None:
    fake = _fake()
    client = http(fake)
    same = {PIN_HEADER.lower(): "3", ROUTING_KEY_HEADER.upper(): "user-1"}
    body = {"features": ROW, "model_version": "3", "routing_key": "user-1"}
    assert client.post("/api/v1/jobs", json=body, headers=same).status_code == 202
    pin_only = {"features": ROW, "model_version": "3"}
    key_header = {ROUTING_KEY_HEADER: "user-1"}
    assert client.post("/api/v1/jobs", json=pin_only, headers=key_header).status_code == 202
    assert fake.routes == [{"model_version": "3", "routing_key": "user-1"}] * 2


@pytest.mark.parametrize(
    ("field", "header", "sent", "given"),
    [
        ("model_version", PIN_HEADER, "champion", "challenger"),
        ("routing_key", ROUTING_KEY_HEADER, "user-1", "user-2"),
    ],
)
def test_a_header_that_contradicts_the_body_is_refused_and_nothing_is_sent(
    field: str, header: str, sent: str, given: str
) -> None:
    fake = _fake()
    client = http(fake)
    for path, body, _ in ENQUEUING:
        response = client.post(path, json={**body, field: sent}, headers={header: given})
        doc = problem(response, 422, "InvalidInput")
        assert doc["errors"] == [{"field": header, "message": doc["detail"].split(": ", 1)[1]}]
        assert sent in doc["detail"] and given in doc["detail"]
    assert _submitted(fake) == []


BAD_PINS = [
    ("", "at least 1 character"),
    ("v" * 129, "at most 128 characters"),
    ("../20261128-001839-22b4fe", "letters, digits"),
    ("-rf", "starting with a letter or a digit"),
    ("a b", "letters, digits"),
    ("v1/../../etc", "letters, digits"),
    ("versión", "letters, digits"),
]
BAD_KEYS = [
    ("", "at least 1 character"),
    ("k" * 257, "at most 256 characters"),
    ("usér-42", "visible ASCII"),
    (" user-42", "visible ASCII"),
    ("user-42 ", "visible ASCII"),
    ("user\t42", "visible ASCII"),
    ("user\n42", "visible ASCII"),
]


@pytest.mark.parametrize(("value", "why"), BAD_PINS)
def test_a_malformed_pin_is_refused_before_it_is_enqueued(value: str, why: str) -> None:
    fake = _fake()
    client = http(fake)
    for path, body, _ in ENQUEUING:
        doc = problem(client.post(path, json={**body, "model_version": value}), 422, "InvalidInput")
        assert doc["errors"][0]["field"] == "model_version" and why in doc["detail"], doc
    assert _submitted(fake) == []


@pytest.mark.parametrize(("value", "why"), BAD_KEYS)
def test_a_malformed_routing_key_is_refused_before_it_is_enqueued(value: str, why: str) -> None:
    fake = _fake()
    client = http(fake)
    for path, body, _ in ENQUEUING:
        doc = problem(client.post(path, json={**body, "routing_key": value}), 422, "InvalidInput")
        assert doc["errors"][0]["field"] == "routing_key" and why in doc["detail"], doc
    assert _submitted(fake) == []


def test_malformed_headers_are_refused_by_name() -> None:
    fake = _fake()
    client = http(fake)
    for headers, field in [
        ({PIN_HEADER: "../x"}, PIN_HEADER),
        ({PIN_HEADER: "v" * 129}, PIN_HEADER),
        ({ROUTING_KEY_HEADER: "k" * 257}, ROUTING_KEY_HEADER),
        ({ROUTING_KEY_HEADER: "usér".encode()}, ROUTING_KEY_HEADER),
    ]:
        response = client.post("/api/v1/jobs", json={"features": ROW}, headers=headers)
        doc = problem(response, 422, "InvalidInput")
        assert [e["field"] for e in doc["errors"]] == [field], doc
    assert _submitted(fake) == []


@pytest.mark.parametrize(
    ("pin", "key"),
    [
        ("v" * 128, "k" * 256),
        ("champion", "user 42"),
        ("3", "~!#$%&'()*+,-./:;<=>?@[]^_`{|}"),
        ("20261128-001839-22b4fe", "a"),
        ("model_v2.1", "00000000-0000-0000-0000-000000000000"),
    ],
)
def test_the_longest_and_oddest_valid_values_are_accepted(pin: str, key: str) -> None:
    fake = _fake()
    body = {"features": ROW, "model_version": pin, "routing_key": key}
    assert http(fake).post("/api/v1/jobs", json=body).status_code == 202
    assert fake.routes == [{"model_version": pin, "routing_key": key}]


def test_the_answer_says_which_version_and_arm_served_the_job() -> None:
    result = {**RESULT, "model_version": "20261202-094512-9c01aa", "arm": "challenger"}
    client = http(FakeClient(result=result))
    body = client.post("/api/v1/predict", json={"data": ROW, "routing_key": "user-7"}).json()
    assert (body["model_version"], body["arm"]) == ("20261202-094512-9c01aa", "challenger")
    batch = {
        **{k: v for k, v in result.items() if k not in ("prediction", "batch_size")},
        "predictions": [1.5],
        "rows": 1,
        "arm": "pinned",
    }
    client = http(FakeClient(result=batch))
    answer = client.post("/api/v1/predict/batch", json={"data": [ROW], "model_version": "2"})
    assert answer.status_code == 200, answer.text
    assert (answer.json()["model_version"], answer.json()["arm"]) == (
        "20261202-094512-9c01aa",
        "pinned",
    )


def test_an_unknown_version_is_a_422_problem_naming_the_job() -> None:
    message = "model version '9' is not served here"
    client = http(FakeClient(wait_error=errors.UnknownModelVersion(message)))
    for path, body in [
        ("/api/v1/predict", {"data": ROW, "model_version": "9"}),
        ("/api/v1/predict/batch", {"data": [ROW], "model_version": "9"}),
        ("/api/v1/explain", {"data": [ROW], "model_version": "9"}),
    ]:
        response = client.post(path, json=body)
        doc = problem(response, 422, "UnknownModelVersion")
        assert doc["detail"] == message and doc["retryable"] is False
        assert doc["task_id"] == TASK_ID and "retry-after" not in response.headers


def test_the_schema_documents_the_fields_the_headers_and_the_served_arm() -> None:
    schema = http(_fake()).get("/openapi.json").json()
    components = schema["components"]["schemas"]
    for name in ("PredictRequest", "BatchPredictRequest", "ExplainRequest", "JobRequest"):
        properties = components[name]["properties"]
        assert {"model_version", "routing_key"} <= set(properties), name
        pin = properties["model_version"]["anyOf"][0]
        assert pin["maxLength"] == 128 and pin["pattern"].startswith("^[A-Za-z0-9]"), name
    for path in ("/api/v1/predict", "/api/v1/predict/batch", "/api/v1/explain", "/api/v1/jobs"):
        parameters = schema["paths"][path]["post"]["parameters"]
        assert {(p["name"], p["in"]) for p in parameters} == {
            (PIN_HEADER, "header"),
            (ROUTING_KEY_HEADER, "header"),
        }, path
    for name in ("PredictResponse", "BatchPredictResponse", "ExplainResponse"):
        (example,) = components[name]["examples"]
        assert example["model_version"] and example["arm"] in ARMS, name
    status = schema["paths"]["/api/v1/jobs/{task_id}"]["get"]["responses"]["200"]["content"]
    examples = status["application/json"]["examples"]
    assert examples["served"]["value"]["result"]["arm"] == "pinned"
    assert examples["unknown version"]["value"]["error"]["type"] == "UnknownModelVersion"


def test_explain_answers_the_explanation_document_and_the_job_id() -> None:
    fake = _fake()
    response = http(fake, gateway_predict_timeout_s=4).post(
        "/api/v1/explain", json={"data": [ROW, ROW], "queue": "gpu"}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert {k: body[k] for k in EITHER} == EITHER
    assert body["task_id"] == TASK_ID and body["total_time_ms"] >= 0
    assert ("submit_explain", [ROW, ROW], "gpu") in fake.calls
    assert ("wait", TASK_ID, 4) in fake.calls


def test_workers_that_cannot_explain_are_a_permanent_422() -> None:
    unavailable = errors.ExplainUnavailable("this worker's model has no explain.onnx")
    response = http(FakeClient(wait_error=unavailable)).post(
        "/api/v1/explain", json={"data": [ROW]}
    )
    doc = problem(response, 422, "ExplainUnavailable")
    assert doc["retryable"] is False and doc["task_id"] == TASK_ID
