"""The benchmark's settings (full and --quick sizes) and its latency summary."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from contract.schemas import LatencySummary

FULL = {
    "single_jobs": 300,
    "sustained_jobs": 3_000,
    "window": 256,
    "batch_jobs": 20,
    "batch_rows": 5_000,
    "bulk_rows": 1_000_000,
    "inprocess_rows": 65_536,
    "client_jobs": 10_000,
}


QUICK = {
    "single_jobs": 30,
    "sustained_jobs": 300,
    "window": 32,
    "batch_jobs": 10,
    "batch_rows": 1_000,
    "bulk_rows": 20_000,
    "inprocess_rows": 8_192,
    "client_jobs": 1_000,
}


@dataclass(frozen=True)
class BenchConfig:
    embedded: bool = False
    model_dir: Path | None = None
    """Where the served model's files are (for the in-process reference; with --embedded,
    also where a model is trained if there is none)."""
    model_name: str = "friedman1"
    queue: str = "cpu"
    processes: int | None = None
    """Worker processes with --embedded; None: one per core."""
    single_jobs: int = FULL["single_jobs"]
    sustained_jobs: int = FULL["sustained_jobs"]
    window: int = FULL["window"]
    batch_jobs: int = FULL["batch_jobs"]
    batch_rows: int = FULL["batch_rows"]
    bulk_rows: int = FULL["bulk_rows"]
    chunk_rows: int | None = None
    """Rows per bulk chunk; None: the producer's setting (INFERENCE_CHUNK_ROWS)."""
    in_flight: int | None = None
    """Chunks (bulk) and batch jobs in flight; None: INFERENCE_MAX_IN_FLIGHT."""
    inprocess_rows: int = FULL["inprocess_rows"]
    client_jobs: int = FULL["client_jobs"]
    """Single-row jobs sent by the asyncio client and by the sync one, each."""
    json_out: Path = Path("out/bench.json")
    work_dir: Path | None = None
    """Worker log and the bulk files; None: a temporary directory (log beside the JSON)."""
    seed: int = 0
    noop_probe_s: float = 5.0
    worker_loglevel: str = "INFO"
    serving_decision: bool = False
    """With --embedded: publish a serving decision naming the trained version before the
    worker starts, so that it starts from the decision (fetch into an empty cache, check,
    load), as workers of a model registry do."""
    quick: bool = False


def latency_summary(seconds: Sequence[float]) -> dict[str, Any]:
    """Percentiles in ms (contract's LatencySummary, as the health report has them), with the
    mean and the maximum."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    summary = LatencySummary.of(ms.tolist()).model_dump()
    if not len(ms):
        return {**summary, "mean_ms": None}
    return {**summary, "mean_ms": float(ms.mean()), "max_ms": float(ms.max())}
