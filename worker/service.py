"""Task bodies, free of Celery: validate, predict, time, count, and build the result.

Celery's path (worker.tasks) and the row lane (worker.lane.server) both call these, so a
job's result is built the same way whichever path served it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from contract.errors import InferenceError, PredictionFailed, UnknownModelVersion
from contract.schemas import (
    BatchRequest,
    BatchResult,
    ExplainRequest,
    ExplainResult,
    Latency,
    PredictRequest,
    PredictResult,
    encode_f32,
    parse_request,
)
from worker.explainer import unavailable
from worker.model import LoadedModel
from worker.runtime import Runtime

log = logging.getLogger(__name__)

M = TypeVar("M", PredictRequest, BatchRequest, ExplainRequest)


@dataclass(frozen=True)
class Started:
    """When serving a job (or a batch of jobs taken together) began."""

    wall: float
    """Unix seconds: compared with the producer's enqueued_at header."""
    perf: float
    """time.perf_counter(): the start of task_ms."""

    @classmethod
    def now(cls) -> Started:
        return cls(time.time(), time.perf_counter())


@dataclass(frozen=True)
class Job:
    """One task message's arguments, as either path received them."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    enqueued_at: Any
    """The producer's enqueued_at header, if any (checked here, not trusted)."""
    hostname: str
    """The worker's name, for the result."""
    task_id: str = ""
    pin: Any = None
    """The model_version header, if any (a kwarg of that name wins)."""
    routing_key: Any = None
    """The routing_key header, if any (a kwarg of that name wins)."""


def queue_wait_ms(enqueued_at: Any, started_at: float) -> float | None:
    """Milliseconds between the producer's enqueue and the task's start, if the header is sane."""
    if isinstance(enqueued_at, bool) or not isinstance(enqueued_at, int | float):
        return None
    if not np.isfinite(enqueued_at):
        return None
    return round(max(0.0, (started_at - float(enqueued_at)) * 1000.0), 3)


def parse(rt: Runtime, model: type[M], args: tuple[Any, ...], kwargs: dict[str, Any]) -> M:
    """The request, InvalidInput if it breaks the schema. The shape is checked against the
    loaded model before any value is validated, so a huge or ragged message costs O(rows)."""
    return parse_request(
        model,
        args,
        kwargs,
        n_features=rt.model.n_features,
        max_rows=1 if model is PredictRequest else rt.settings.max_batch_rows,
    )


Choice = tuple[LoadedModel, str | None, LoadedModel | None]
"""The version that serves a job, its arm, and the challenger to shadow it with (if any)."""


def choose(rt: Runtime, pin: Any, routing_key: Any, job_id: str) -> Choice:
    """The version that serves a job, its arm (None without serving decisions), and the
    challenger that runs on its rows in shadow. Read once per job (or batch of rows): a
    swap between two reads cannot mix versions."""
    if rt.serving is None:
        if pin is not None and pin != rt.model.manifest.version:
            raise UnknownModelVersion(
                f"model version {str(pin)[:128]!r} is not served here "
                f"(this worker serves {rt.model.manifest.version} only)"
            )
        return rt.model, None, None
    pin = pin if isinstance(pin, str) and pin else None
    key = routing_key if isinstance(routing_key, str) and routing_key else None
    return rt.serving.pick(pin, key, job_id)


def shadow(
    rt: Runtime,
    rows: np.ndarray,
    served: np.ndarray,
    model: LoadedModel,
    challenger: LoadedModel | None,
) -> None:
    """Queue the shadow run of rows `model` served, if `challenger` shadows it; never
    waits for the run (worker.shadow), so a job's result can be returned at once."""
    if challenger is not None and rt.serving is not None:
        rt.serving.shadow(rows, served, model, challenger)


def _model_fields(model: LoadedModel, arm: str | None, hostname: str) -> dict[str, Any]:
    """What every result carries besides its predictions and latency."""
    manifest = model.manifest
    return {
        "model_name": manifest.name,
        "model_version": manifest.version,
        "provider": model.provider,
        "device": model.device,
        "hostname": hostname,
        "arm": arm,
    }


def _latency(enqueued_at: Any, started: Started, inference_ms: float) -> Latency:
    """The job's latencies, its task_ms up to now."""
    return Latency(
        queue_wait_ms=queue_wait_ms(enqueued_at, started.wall),
        inference_ms=round(inference_ms, 3),
        task_ms=round((time.perf_counter() - started.perf) * 1000.0, 3),
    )


def predict_rows(
    rt: Runtime,
    rows: Sequence[Sequence[float]],
    enqueued_at: Sequence[Any],
    hostname: str,
    started: Started,
    model: LoadedModel | None = None,
    arm: str | None = None,
) -> list[dict[str, Any] | InferenceError]:
    """Single-row jobs predicted together, with one onnxruntime call: each job's result
    document, or its error. Should that call raise, each row is run alone, so a row the model
    fails on fails alone (PredictionFailed) and the others are served."""
    model = model or rt.model
    matrix = np.asarray(rows, dtype=np.float32)
    t0 = time.perf_counter()
    outcome: list[float | InferenceError]
    try:
        outcome = list(model.predict(matrix).astype(np.float64).tolist())
    except Exception:
        if len(rows) > 1:
            log.exception("a batch of %d rows failed; running them one by one", len(rows))
        outcome = [_predict_alone(model, row) for row in matrix]
    inference_ms = (time.perf_counter() - t0) * 1000.0
    served = sum(1 for o in outcome if not isinstance(o, InferenceError))
    fields = _model_fields(model, arm, hostname)
    results: list[dict[str, Any] | InferenceError] = []
    for value, enqueued in zip(outcome, enqueued_at, strict=True):
        if isinstance(value, InferenceError):
            rt.stats.failed()
            results.append(value)
            continue
        latency = _latency(enqueued, started, inference_ms)
        rt.stats.succeeded(latency.task_ms, 1)
        result = PredictResult(prediction=value, batch_size=served, latency=latency, **fields)
        results.append(result.model_dump())
    return results


def _predict_alone(model: LoadedModel, row: np.ndarray) -> float | InferenceError:
    try:
        return float(model.predict(row[None, :])[0])
    except Exception as exc:
        return PredictionFailed(f"inference failed: {exc}")


def _choose_for(rt: Runtime, request: PredictRequest | BatchRequest, job: Job) -> Choice:
    pin = request.model_version or job.pin
    return choose(rt, pin, request.routing_key or job.routing_key, job.task_id)


def predict_one(rt: Runtime, job: Job) -> dict[str, Any]:
    """inference.predict on Celery's path: the result document, or the job's error raised."""
    started = Started.now()
    try:
        request = parse(rt, PredictRequest, job.args, job.kwargs)
        model, arm, challenger = _choose_for(rt, request, job)
    except Exception:
        rt.stats.failed()
        raise
    (result,) = predict_rows(
        rt, [request.features], [job.enqueued_at], job.hostname, started, model, arm
    )
    if isinstance(result, InferenceError):
        raise result
    if challenger is not None:
        rows = np.asarray([request.features], dtype=np.float32)
        shadow(rt, rows, np.asarray([result["prediction"]]), model, challenger)
    return result


def predict_batch(rt: Runtime, job: Job) -> dict[str, Any]:
    """inference.predict_batch, on either path: the result document, or the error raised."""
    started = Started.now()
    try:
        request = parse(rt, BatchRequest, job.args, job.kwargs)
        model, arm, challenger = _choose_for(rt, request, job)
        # rows_f32 is decoded and checked whole (numpy), with no per-value validation.
        matrix = request.matrix()
        t0 = time.perf_counter()
        out = model.predict(matrix)
        inference_ms = (time.perf_counter() - t0) * 1000.0
    except Exception:
        rt.stats.failed()
        raise
    latency = _latency(job.enqueued_at, started, inference_ms)
    rt.stats.succeeded(latency.task_ms, len(out))
    # Queued, not run: the result goes back at once. Nothing changes the rows or the
    # predictions after this point, so the shadow thread reads them without a copy.
    shadow(rt, matrix, out, model, challenger)
    # Predictions come back in the form the rows came in: float32 for rows_f32.
    compact = request.rows_f32 is not None
    result = BatchResult(
        predictions=None if compact else out.astype(np.float64).tolist(),
        predictions_f32=encode_f32(out) if compact else None,
        rows=len(out),
        latency=latency,
        **_model_fields(model, arm, job.hostname),
    )
    return result.model_dump(exclude={"predictions" if compact else "predictions_f32"})


def explain(rt: Runtime, job: Job) -> dict[str, Any]:
    """inference.explain on Celery's path: the result document, or the job's error raised."""
    (outcome,) = explain_many(rt, [job])
    if isinstance(outcome, InferenceError):
        raise outcome
    return outcome


def explain_many(rt: Runtime, jobs: Sequence[Job]) -> list[dict[str, Any] | InferenceError]:
    """inference.explain jobs explained together: each job served by the version it is
    routed to (as a batch job is), with one pass of that version's explanation graph over
    all its jobs' rows (it costs ~1 ms a row, far more per call than the model): each job's
    result document, or its error."""
    started = Started.now()
    outcomes: list[Any] = []
    groups: dict[int, tuple[LoadedModel, str | None, list[int]]] = {}
    for i, job in enumerate(jobs):
        try:
            request = parse(rt, ExplainRequest, job.args, job.kwargs)
            # Explain jobs get no shadow run: they are for reading, not serving traffic.
            model, arm, _ = _choose_for(rt, request, job)
            if model.ready_explainer() is None:
                raise unavailable(model.manifest, rt.settings, model.explain_refused)
            outcomes.append(request.matrix())
        except InferenceError as exc:
            rt.stats.failed()
            outcomes.append(exc)
            continue
        groups.setdefault(id(model), (model, arm, []))[2].append(i)
    hostname = jobs[0].hostname if jobs else ""
    for model, arm, members in groups.values():
        _explain_group(
            rt, model, arm, hostname, started, [jobs[i] for i in members], members, outcomes
        )
    return outcomes


def _explain_group(
    rt: Runtime,
    model: LoadedModel,
    arm: str | None,
    hostname: str,
    started: Started,
    jobs: Sequence[Job],
    members: Sequence[int],
    outcomes: list[Any],
) -> None:
    """The jobs at `members` of `outcomes` (their row matrices), explained by `model`;
    their outcomes replaced by result documents or errors."""
    explainer = model.explainer
    assert explainer is not None
    rows = np.concatenate([outcomes[i] for i in members])
    t0 = time.perf_counter()
    try:
        predictions = model.predict(rows).astype(np.float64)
        contributions = explainer.explain(rows)
    except Exception as exc:
        log.exception("explaining %d row(s) of %d job(s) failed", len(rows), len(members))
        failed = PredictionFailed(f"explanation failed: {exc}")
        for i in members:
            rt.stats.failed()
            outcomes[i] = failed
        return
    inference_ms = (time.perf_counter() - t0) * 1000.0
    fields = _model_fields(model, arm, hostname)
    offset = 0
    for i, job in zip(members, jobs, strict=True):
        n = len(outcomes[i])
        latency = _latency(job.enqueued_at, started, inference_ms)
        rt.stats.succeeded(latency.task_ms, n)
        result = ExplainResult(
            feature_names=explainer.feature_names,
            base_value=explainer.base_value,
            predictions=predictions[offset : offset + n].tolist(),
            contributions=contributions[offset : offset + n].tolist(),
            rows=n,
            latency=latency,
            **fields,
        )
        outcomes[i] = result.model_dump()
        offset += n
