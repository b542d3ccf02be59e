"""The app without a server: what each answer and error of the client becomes in HTTP, the
OpenAPI schema, and an import that builds nothing."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import pytest

from contract import errors
from gateway.service import Gateway
from gateway.settings import GatewaySettings
from tests.gateway.fakes import INFO, RESULT, TASK_ID, FakeClient, http
from tests.gateway.support import REPO, problem

ROW = [0.1, 0.2, 0.3, 0.4, 0.5]


def report(status: str, workers: int = 1) -> dict[str, Any]:
    worker = {
        "hostname": "cpu1@host",
        "queues": ["inference.cpu", "inference.cpu.rows"],
        "pool": "prefork",
        "model_name": "friedman1",
        "model_version": "v1",
        "provider": "CPUExecutionProvider",
        "device": "cpu",
        "processes": 2,
        "latency": {"count": 0, "p50_ms": None, "p95_ms": None, "p99_ms": None},
        "uptime_s": 10.0,
        "last_seen_s": 0.5,
    }
    return {
        "status": status,
        "generated_at": time.time(),
        "workers": [worker] * workers,
        "queue_depths": {"inference.cpu": 0},
    }


# -- predict ---------------------------------------------------------------------------------


def test_predict_answers_the_result_document_and_the_seed_fields() -> None:
    fake = FakeClient(result={**RESULT, "a_field_of_tomorrow": 1})
    response = http(fake, gateway_predict_timeout_s=4).post("/api/v1/predict", json={"data": ROW})
    assert response.status_code == 200, response.text
    body = response.json()
    assert {k: body[k] for k in RESULT} == RESULT
    assert body["a_field_of_tomorrow"] == 1  # new result fields pass through
    assert body["task_id"] == TASK_ID and body["latency_ms"] == RESULT["latency"]["inference_ms"]
    assert body["model_format"] == "ONNX" and body["features_count"] == 5
    assert body["total_time_ms"] >= 0
    assert ("submit", ROW, "cpu") in fake.calls
    assert ("wait", TASK_ID, 4) in fake.calls


@pytest.mark.parametrize(
    ("error", "status", "title"),
    [
        (errors.FeatureCountMismatch("row 0 has 2 features; the model expects 5"), 422,
         "FeatureCountMismatch"),
        (errors.InvalidInput("rows_f32.0.1: Input should be a finite number"), 422,
         "InvalidInput"),
        (errors.ModelNotReady("no model loaded"), 503, "ModelNotReady"),
        (errors.PredictionFailed("onnxruntime raised"), 503, "PredictionFailed"),
        (errors.TaskFailed("TaskRevokedError: revoked"), 500, "TaskFailed"),
        (TimeoutError("not finished"), 504, "Gateway Timeout"),
    ],
)  # fmt: skip
def test_a_job_that_fails_or_is_late_is_a_problem_naming_it(
    error: Exception, status: int, title: str
) -> None:
    client = http(FakeClient(wait_error=error), root_path="/inference")
    for path, body in [
        ("/api/v1/predict", {"data": ROW}),
        ("/api/v1/predict/batch", {"data": [ROW]}),
    ]:
        doc = problem(client.post(path, json=body), status, title)
        assert doc["task_id"] == TASK_ID
        assert doc["status_url"] == f"/inference/api/v1/jobs/{TASK_ID}"


def test_a_full_queue_is_a_429_with_retry_after() -> None:
    fake = FakeClient(submit_error=errors.QueueFull("queue inference.cpu.rows is full"))
    client = http(fake, gateway_retry_after_s=9)
    for path, body in [
        ("/api/v1/predict", {"data": ROW}),
        ("/api/v1/predict/batch", {"data": [ROW]}),
        ("/api/v1/jobs", {"features": ROW}),
    ]:
        response = client.post(path, json=body)
        doc = problem(response, 429, "QueueFull")
        assert response.headers["retry-after"] == "9" and doc["retryable"] is True
        assert "task_id" not in doc  # nothing was enqueued


def test_an_unexpected_error_is_a_500_problem() -> None:
    doc = problem(
        http(FakeClient(submit_error=RuntimeError("internal"))).post(
            "/api/v1/predict", json={"data": ROW}
        ),
        500,
        "Internal Server Error",
    )
    assert "internal" not in doc["detail"].replace("internal error", "")


# -- jobs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "call"),
    [
        ({"features": ROW}, ("submit", ROW, "cpu")),
        ({"rows": [ROW, ROW], "queue": "gpu"}, ("submit_batch", [ROW, ROW], "gpu")),
        ({"rows_f32": "AACAPw==", "n_features": 1}, ("submit_batch_f32", "AACAPw==", 1, "cpu")),
    ],
)
def test_a_job_goes_to_the_submit_of_its_kind_and_is_located_behind_the_prefix(
    body: dict[str, Any], call: tuple[Any, ...]
) -> None:
    fake = FakeClient()
    response = http(fake, root_path="/inference").post("/api/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    assert response.headers["location"] == f"/inference/api/v1/jobs/{TASK_ID}"
    assert response.json() == {
        "task_id": TASK_ID,
        "state": "PENDING",
        "status_url": f"/inference/api/v1/jobs/{TASK_ID}",
    }
    assert call in fake.calls


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"features": ROW, "rows": [ROW]},
        {"rows_f32": "AACAPw=="},
        {"rows": [ROW], "n_features": 5},
        {"features": ROW, "queue": "tpu"},
        {"rows_f32": 12, "n_features": 1},
        {"rows_f32": "AACAPw==", "n_features": "1"},
    ],
)
def test_a_job_request_out_of_shape_is_refused_before_anything_is_sent(
    body: dict[str, Any],
) -> None:
    fake = FakeClient()
    problem(http(fake).post("/api/v1/jobs", json=body), 422, "InvalidInput")
    assert not [c for c in fake.calls if c[0].startswith("submit")]


def test_a_long_poll_is_cut_to_the_cap() -> None:
    fake = FakeClient(wait_error=TimeoutError("not finished"))
    client = http(fake, gateway_max_wait_s=0.2)
    response = client.get(f"/api/v1/jobs/{TASK_ID}", params={"wait": 3600})
    assert response.json() == {"task_id": TASK_ID, "state": "PENDING"}
    assert fake.calls == [("wait", TASK_ID, 0.2), ("status", TASK_ID)]
    # Without wait, the status as it is, at once.
    fake.calls.clear()
    client.get(f"/api/v1/jobs/{TASK_ID}")
    assert fake.calls == [("status", TASK_ID)]


@pytest.mark.parametrize("wait", ["-1", "nan", "inf", "soon"])
def test_a_wait_that_is_not_a_number_of_seconds_is_refused(wait: str) -> None:
    response = http(FakeClient()).get(f"/api/v1/jobs/{TASK_ID}", params={"wait": wait})
    assert problem(response, 422, "InvalidInput")["errors"][0]["field"] == "wait"


# -- health and model ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "workers", "status", "loaded"),
    [("ok", 1, 200, True), ("degraded", 1, 200, True), ("down", 0, 503, False)],
)
def test_health_answers_the_report_with_the_status_a_load_balancer_reads(
    state: str, workers: int, status: int, loaded: bool
) -> None:
    response = http(FakeClient(report=report(state, workers))).get("/api/v1/predict/health")
    assert response.status_code == status
    body = response.json()
    assert body["status"] == state and body["model_loaded"] is loaded
    assert body["model_format"] == "ONNX" and len(body["workers"]) == workers


def test_no_health_report_is_a_503_problem() -> None:
    doc = problem(http(FakeClient()).get("/api/v1/predict/health"), 503, "Service Unavailable")
    assert "celery beat" in doc["detail"] and doc["retryable"] is True


def test_model_answers_the_published_info_or_a_404_problem() -> None:
    assert http(FakeClient()).get("/api/v1/model").json() == INFO.model_dump()
    doc = problem(http(FakeClient(info=None)).get("/api/v1/model?queue=gpu"), 404, "Not Found")
    assert "inference.gpu" in doc["detail"]


def test_model_info_is_read_again_once_it_is_older_than_its_ttl() -> None:
    import asyncio

    fake = FakeClient()

    async def reads(ttl: float) -> list[bool]:
        settings = GatewaySettings(gateway_model_info_ttl_s=ttl)
        gateway = Gateway(settings, fake)  # type: ignore[arg-type]
        fake.calls.clear()
        await gateway.submit_row(ROW, "cpu", {})
        await gateway.submit_row(ROW, "cpu", {})
        await gateway.model_info("cpu", refresh=True)
        return [c[2] for c in fake.calls if c[0] == "model_info"]

    assert asyncio.run(reads(3600)) == [True, False, True]
    assert asyncio.run(reads(0)) == [True, True, True]


# -- the schema ------------------------------------------------------------------------------


def test_the_openapi_schema_describes_every_route_with_models_examples_and_problems() -> None:
    schema = http(FakeClient()).get("/openapi.json").json()
    paths = schema["paths"]
    assert set(paths) == {
        "/api/v1/predict",
        "/api/v1/predict/batch",
        "/api/v1/explain",
        "/api/v1/predict/health",
        "/api/v1/jobs",
        "/api/v1/jobs/{task_id}",
        "/api/v1/model",
    }
    components = schema["components"]["schemas"]
    # FastAPI's own validation-error shape is never answered, so never described.
    assert "HTTPValidationError" not in components
    for path, operations in paths.items():
        for method, operation in operations.items():
            where = f"{method.upper()} {path}"
            assert operation["security"] == [{"HTTPBearer": []}], where
            ok = next(v for k, v in operation["responses"].items() if k.startswith("2"))
            assert "$ref" in ok["content"]["application/json"]["schema"], where
            errors_ = {k: v for k, v in operation["responses"].items() if k >= "400"}
            assert "401" in errors_, where
            for code, response in errors_.items():
                media = response["content"]
                if "application/problem+json" not in media:
                    assert (path, code) == ("/api/v1/predict/health", "503"), where
                    continue
                assert media["application/problem+json"]["schema"]["$ref"].endswith(
                    "/ProblemDocument"
                ), where
    for name in ("PredictRequest", "BatchPredictRequest", "ExplainRequest", "PredictResponse"):
        assert components[name]["examples"], name
    job_examples = paths["/api/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]
    assert set(job_examples["examples"]) == {"one row", "rows", "rows_f32", "pinned", "sticky"}
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_the_examples_are_requests_the_gateway_accepts() -> None:
    schema = http(FakeClient()).get("/openapi.json").json()
    client = http(FakeClient())
    components = schema["components"]["schemas"]
    for predict in components["PredictRequest"]["examples"]:
        assert client.post("/api/v1/predict", json=predict).status_code == 200
    for batch in components["BatchPredictRequest"]["examples"]:
        assert client.post("/api/v1/predict/batch", json=batch).status_code != 422
    content = schema["paths"]["/api/v1/jobs"]["post"]["requestBody"]["content"]
    for example in content["application/json"]["examples"].values():
        assert client.post("/api/v1/jobs", json=example["value"]).status_code == 202


# -- import ----------------------------------------------------------------------------------

IMPORT_EVERY_MODULE = """
import importlib, pkgutil, sys
import gateway
names = [i.name for i in pkgutil.walk_packages(gateway.__path__, "gateway.")]
for name in names:
    if not name.endswith("__main__"):
        importlib.import_module(name)
for heavy in ("worker", "training", "stack", "onnxruntime", "sklearn", "uvicorn"):
    assert heavy not in sys.modules, heavy
import gc
from fastapi import FastAPI
assert not [o for o in gc.get_objects() if isinstance(o, FastAPI)], "an import built an app"
from gateway.app import create_app
try:
    create_app()
except Exception as exc:
    print(type(exc).__name__)
"""


def test_importing_the_gateway_builds_nothing_and_reads_no_settings() -> None:
    # Settings create_app refuses: importing must not notice them, building the app must.
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_EVERY_MODULE],
        cwd=REPO,
        env={"INFERENCE_GATEWAY_MAX_BODY_BYTES": "0", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ValidationError"
