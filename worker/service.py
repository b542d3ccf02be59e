"""Task bodies, free of Celery: validate, predict, time, count."""

from __future__ import annotations

import time
from typing import Any, TypeVar

import numpy as np

from producer.contract import (
    BatchRequest,
    BatchResult,
    Latency,
    PredictRequest,
    PredictResult,
    encode_f32,
    parse_request,
)
from worker.runtime import Runtime

M = TypeVar("M", PredictRequest, BatchRequest)


def queue_wait_ms(enqueued_at: Any, started_at: float) -> float | None:
    """Milliseconds between the producer's enqueue and the task's start, if the header is sane."""
    if isinstance(enqueued_at, bool) or not isinstance(enqueued_at, int | float):
        return None
    if not np.isfinite(enqueued_at):
        return None
    return round(max(0.0, (started_at - float(enqueued_at)) * 1000.0), 3)


def _parse(rt: Runtime, model: type[M], args: tuple[Any, ...], kwargs: dict[str, Any]) -> M:
    # The shape is checked against the loaded model before any value is validated, so a
    # huge or ragged message costs O(rows), and the rows handed to _run have the right shape.
    return parse_request(
        model,
        args,
        kwargs,
        n_features=rt.model.n_features,
        max_rows=rt.settings.max_batch_rows,
    )


def _run(rt: Runtime, matrix: np.ndarray) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    out = rt.model.predict(matrix)
    return out, (time.perf_counter() - t0) * 1000.0


def _common(rt: Runtime, hostname: str) -> dict[str, Any]:
    manifest = rt.model.manifest
    return {
        "model_name": manifest.name,
        "model_version": manifest.version,
        "provider": rt.model.provider,
        "device": rt.model.device,
        "hostname": hostname,
    }


def predict_one(
    rt: Runtime, args: tuple[Any, ...], kwargs: dict[str, Any], enqueued_at: Any, hostname: str
) -> dict[str, Any]:
    started_wall, started = time.time(), time.perf_counter()
    try:
        request = _parse(rt, PredictRequest, args, kwargs)
        out, inference_ms = _run(rt, np.asarray([request.features], dtype=np.float32))
    except Exception:
        rt.stats.failed()
        raise
    task_ms = (time.perf_counter() - started) * 1000.0
    rt.stats.succeeded(task_ms, 1)
    result = PredictResult(
        prediction=float(out[0]),
        latency=Latency(
            queue_wait_ms=queue_wait_ms(enqueued_at, started_wall),
            inference_ms=round(inference_ms, 3),
            task_ms=round(task_ms, 3),
        ),
        **_common(rt, hostname),
    )
    return result.model_dump()


def predict_batch(
    rt: Runtime, args: tuple[Any, ...], kwargs: dict[str, Any], enqueued_at: Any, hostname: str
) -> dict[str, Any]:
    started_wall, started = time.time(), time.perf_counter()
    try:
        request = _parse(rt, BatchRequest, args, kwargs)
        # rows_f32 is decoded and checked whole (numpy), with no per-value validation.
        out, inference_ms = _run(rt, request.matrix())
    except Exception:
        rt.stats.failed()
        raise
    task_ms = (time.perf_counter() - started) * 1000.0
    rt.stats.succeeded(task_ms, len(out))
    # Predictions come back in the form the rows came in: float32 for rows_f32.
    compact = request.rows_f32 is not None
    result = BatchResult(
        predictions=None if compact else out.astype(np.float64).tolist(),
        predictions_f32=encode_f32(out) if compact else None,
        rows=len(out),
        latency=Latency(
            queue_wait_ms=queue_wait_ms(enqueued_at, started_wall),
            inference_ms=round(inference_ms, 3),
            task_ms=round(task_ms, 3),
        ),
        **_common(rt, hostname),
    )
    return result.model_dump(exclude={"predictions" if compact else "predictions_f32"})
