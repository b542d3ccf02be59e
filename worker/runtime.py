"""What one worker process holds: its model, its counters and its heartbeat.

`start()` runs once per process, after fork (prefork children) or in the
worker's own process (solo/threads pools), before the first job is taken.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from contract.errors import ModelNotReady
from contract.names import model_info_key
from contract.schemas import ModelInfo, WorkerState
from producer.connections import redis_client
from worker import metrics
from worker.model import LoadedModel, load_model
from worker.settings import WorkerSettings
from worker.stats import Heartbeat, ProcessStats

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: WorkerSettings
    model: LoadedModel
    stats: ProcessStats
    heartbeat: Heartbeat


_current: Runtime | None = None


def current() -> Runtime:
    if _current is None:
        raise ModelNotReady("this worker process has not loaded its model")
    return _current


def start(settings: WorkerSettings, hostname: str, queues: list[str], pool: str) -> Runtime:
    global _current
    if _current is not None and _current.heartbeat is not None:
        return _current
    model = load_model(settings)
    recorder = metrics.start_recording(model.manifest.name, model.manifest.version, model.device)
    if recorder is not None:
        recorder.loaded(model.provider, hostname, model.load_s, model.warmup_s)
    now = time.time()
    stats = ProcessStats(
        WorkerState(
            hostname=hostname,
            pid=os.getpid(),
            queues=queues,
            pool=pool,
            model_name=model.manifest.name,
            model_version=model.manifest.version,
            provider=model.provider,
            device=model.device,
            started_at=now,
            updated_at=now,
        )
    )
    client = redis_client(settings.backend, settings)
    info = ModelInfo(
        name=model.manifest.name,
        version=model.manifest.version,
        n_features=model.manifest.n_features,
        feature_names=model.manifest.feature_names,
        max_batch_rows=settings.max_batch_rows,
        target=model.manifest.target,
        metrics=model.manifest.metrics,
        importances=model.manifest.importances,
        base_value=None if model.explainer is None else model.explainer.base_value,
    )
    for queue in queues:
        client.set(model_info_key(queue), info.model_dump_json())
    heartbeat = Heartbeat(client, stats, settings.heartbeat_s)
    heartbeat.start()
    _current = Runtime(settings, model, stats, heartbeat)
    return _current


def stop() -> None:
    global _current
    if _current is not None:
        _current.heartbeat.stop()
        _current = None
