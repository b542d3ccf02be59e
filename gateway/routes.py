"""The endpoints under /api/v1: the seed's predict and health, jobs, the model."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query, Request, Response, status
from pydantic import TypeAdapter, ValidationError

from contract.names import QUEUES
from contract.schemas import ModelInfo
from gateway.problems import Problem, error_responses, validation_problem
from gateway.schemas import (
    JOB_EXAMPLES,
    JOB_STATUS_EXAMPLES,
    BatchPredictRequest,
    BatchPredictResponse,
    ExplainRequest,
    ExplainResponse,
    HealthResponse,
    JobAccepted,
    JobRequest,
    ModelVersion,
    PredictRequest,
    PredictResponse,
    Queue,
    Routing,
    RoutingKey,
)
from gateway.service import Gateway
from producer import TaskStatus

PREFIX = "/api/v1"

router = APIRouter(prefix=PREFIX)


def gateway_of(request: Request) -> Gateway:
    """The app's Gateway. Looked up in the endpoint rather than injected with Depends:
    FastAPI's dependency resolution cost a tenth of a request's CPU."""
    gateway: Gateway = request.app.state.gateway
    return gateway


TaskId = Annotated[
    str,
    Path(
        max_length=255,
        # Visible ASCII: what any producer's ids are (ours are UUIDs), and what fits in a
        # Redis key and a URL path segment without surprises.
        pattern=r"^[!-~]+$",
        description="the job's id, as POST /api/v1/jobs answered it",
        examples=["5f0c6a3e-7d1b-4e0f-9a51-2f9d8c3b7e10"],
    ),
]


PIN_HEADER = "Inference-Model-Version"
ROUTING_KEY_HEADER = "Inference-Routing-Key"

_PIN = TypeAdapter(ModelVersion)
_ROUTING_KEY = TypeAdapter(RoutingKey)

# Read from the request rather than declared as FastAPI header parameters: those cost a fifth
# of a /predict request's CPU, looked for or not; so they are described in the schema here.
ROUTING_HEADERS: dict[str, Any] = {
    "parameters": [
        {
            "name": PIN_HEADER,
            "in": "header",
            "required": False,
            "description": "model_version, as a header: for a caller or a proxy that routes "
            "jobs without touching their bodies. With model_version in the body too, both "
            "must agree",
            "schema": _PIN.json_schema(),
        },
        {
            "name": ROUTING_KEY_HEADER,
            "in": "header",
            "required": False,
            "description": "routing_key, as a header (a proxy can set it from the caller's "
            "identity). With routing_key in the body too, both must agree",
            "schema": _ROUTING_KEY.json_schema(),
        },
    ]
}


def _header(request: Request, name: str, adapter: TypeAdapter[str]) -> str | None:
    value = request.headers.get(name)
    if value is None:
        return None
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        faults = [{**error, "loc": ("header", name)} for error in exc.errors()]
        raise validation_problem(faults) from None


def routing(request: Request, body: Routing) -> dict[str, str | None]:
    """The job's version pin and routing key, from its body or their headers (the client's
    keyword arguments). Sent both ways, they must agree: which one to trust is not ours to
    guess."""
    pin = _header(request, PIN_HEADER, _PIN)
    key = _header(request, ROUTING_KEY_HEADER, _ROUTING_KEY)
    faults = [
        {
            "loc": ("header", header),
            "msg": f"{given!r} is not the body's {field} {sent!r}: send one, or the same",
            "type": "value_error",
        }
        for field, header, given, sent in (
            ("model_version", PIN_HEADER, pin, body.model_version),
            ("routing_key", ROUTING_KEY_HEADER, key, body.routing_key),
        )
        if given is not None and sent is not None and given != sent
    ]
    if faults:
        raise validation_problem(faults)
    return {"model_version": body.model_version or pin, "routing_key": body.routing_key or key}


def status_url(request: Request, task_id: str) -> str:
    """The job's status path, behind whatever prefix the gateway is served under."""
    return f"{request.scope.get('root_path', '')}{PREFIX}/jobs/{task_id}"


def _elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


@router.post(
    "/predict",
    tags=["predict"],
    summary="Predict one row and wait for it (the seed's API)",
    response_model=PredictResponse,
    responses=error_responses(401, 413, 415, 422, 429, 500, 503, 504),
    openapi_extra=ROUTING_HEADERS,
)
async def predict(
    body: PredictRequest,
    request: Request,
) -> dict[str, Any]:
    started = time.perf_counter()
    gateway = gateway_of(request)
    task_id = await gateway.submit_row(body.data, body.queue, routing(request, body))
    result = await gateway.result(task_id, status_url(request, task_id))
    return {
        **result,
        "task_id": task_id,
        "latency_ms": result["latency"]["inference_ms"],
        "total_time_ms": _elapsed_ms(started),
        "model_format": "ONNX",
        "features_count": len(body.data),
    }


@router.post(
    "/predict/batch",
    tags=["predict"],
    summary="Predict rows in one job and wait for them",
    response_model=BatchPredictResponse,
    responses=error_responses(401, 413, 415, 422, 429, 500, 503, 504),
    openapi_extra=ROUTING_HEADERS,
)
async def predict_batch(
    body: BatchPredictRequest,
    request: Request,
) -> dict[str, Any]:
    started = time.perf_counter()
    gateway = gateway_of(request)
    task_id = await gateway.submit_rows(body.data, body.queue, routing(request, body))
    result = await gateway.result(task_id, status_url(request, task_id))
    return {**result, "task_id": task_id, "total_time_ms": _elapsed_ms(started)}


@router.post(
    "/explain",
    tags=["explain"],
    summary="Explain rows in one job: each row's prediction and SHAP contributions",
    response_model=ExplainResponse,
    responses=error_responses(401, 413, 415, 422, 429, 500, 503, 504),
    openapi_extra=ROUTING_HEADERS,
)
async def explain(
    body: ExplainRequest,
    request: Request,
) -> dict[str, Any]:
    started = time.perf_counter()
    gateway = gateway_of(request)
    task_id = await gateway.submit_explain(body.data, body.queue, routing(request, body))
    result = await gateway.result(task_id, status_url(request, task_id))
    return {**result, "task_id": task_id, "total_time_ms": _elapsed_ms(started)}


@router.get(
    "/predict/health",
    tags=["predict"],
    summary="The workers' latest health report",
    response_model=HealthResponse,
    responses={
        503: {
            "model": HealthResponse,
            "description": "down: no live worker; a problem document when there is no report",
        },
        **error_responses(401),
    },
)
async def health(request: Request, response: Response) -> dict[str, Any]:
    report = await gateway_of(request).client.health()
    if report is None:
        raise Problem(
            503,
            "no health report: is celery beat running, and a worker consuming the health queue?",
            retryable=True,
        )
    if report.get("status") == "down":
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    loaded = report.get("status") != "down" and bool(report.get("workers"))
    return {**report, "model_loaded": loaded, "model_format": "ONNX"}


@router.post(
    "/jobs",
    tags=["jobs"],
    summary="Enqueue a job; read its status at the Location it answers",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobAccepted,
    responses=error_responses(401, 413, 415, 422, 429, 503),
    openapi_extra=ROUTING_HEADERS,
)
async def submit_job(
    body: Annotated[JobRequest, Body(openapi_examples=JOB_EXAMPLES)],
    request: Request,
    response: Response,
) -> JobAccepted:
    gateway = gateway_of(request)
    route = routing(request, body)
    if body.features is not None:
        task_id = await gateway.submit_row(body.features, body.queue, route)
    elif body.rows is not None:
        task_id = await gateway.submit_rows(body.rows, body.queue, route)
    else:
        assert body.rows_f32 is not None and body.n_features is not None  # the validator
        task_id = await gateway.submit_f32(body.rows_f32, body.n_features, body.queue, route)
    url = status_url(request, task_id)
    response.headers["Location"] = url
    return JobAccepted(task_id=task_id, status_url=url)


@router.get(
    "/jobs/{task_id}",
    tags=["jobs"],
    summary="A job's status, as `python -m producer status` prints it",
    description=(
        "state is PENDING (unknown or queued), STARTED, RETRY, SUCCESS, FAILURE or REVOKED: "
        "an id nobody sent reads PENDING, as in Celery. With wait=S, answers as soon as the "
        "job is finished, or after S seconds (at most INFERENCE_GATEWAY_MAX_WAIT_S) with "
        "the state it is in."
    ),
    response_model=TaskStatus,
    response_model_exclude_none=True,
    responses={
        200: {
            "description": "The job's status; once it succeeded, its result",
            "content": {"application/json": {"examples": JOB_STATUS_EXAMPLES}},
        },
        **error_responses(401, 422, 503),
    },
)
async def job_status(
    task_id: TaskId,
    request: Request,
    wait: Annotated[
        float,
        Query(ge=0, allow_inf_nan=False, description="seconds to wait for the job to finish"),
    ] = 0,
) -> TaskStatus:
    return await gateway_of(request).status(task_id, wait)


@router.get(
    "/model",
    tags=["model"],
    summary="What the workers of a queue serve: model, version, features, row limit",
    response_model=ModelInfo,
    responses=error_responses(401, 404, 422, 503),
)
async def model(
    request: Request,
    queue: Annotated[Queue, Query(description="cpu or gpu")] = "cpu",
) -> ModelInfo:
    info = await gateway_of(request).model_info(queue, refresh=True)
    if info is None:
        raise Problem(
            404,
            f"no worker of {QUEUES[queue]} has published its model: none has started yet",
        )
    return info
