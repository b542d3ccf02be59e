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
from contract.schemas import ModelInfo, ServingDecision, WorkerState
from producer.connections import redis_client
from training.fetch import fetch_version
from worker.decisions import DecisionWatcher, read_decision
from worker.model import LoadedModel, load_model, load_version
from worker.serving import Serving
from worker.settings import WorkerSettings
from worker.stats import Heartbeat, ProcessStats

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: WorkerSettings
    model: LoadedModel
    """The champion: replaced (not changed) when a serving decision moves it."""
    stats: ProcessStats
    heartbeat: Heartbeat
    serving: Serving | None = None
    """The versions of the serving decision; None when decisions are off."""
    watcher: DecisionWatcher | None = None


_current: Runtime | None = None


def current() -> Runtime:
    if _current is None:
        raise ModelNotReady("this worker process has not loaded its model")
    return _current


def start(settings: WorkerSettings, hostname: str, queues: list[str], pool: str) -> Runtime:
    global _current
    if _current is not None and _current.heartbeat is not None:
        return _current
    client = redis_client(settings.backend, settings)
    decision = read_decision(client, settings.model_name) if settings.serving_decisions else None
    model = load_model(settings) if decision is None else load_champion(settings, decision)
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
    info = ModelInfo(
        name=model.manifest.name,
        version=model.manifest.version,
        n_features=model.manifest.n_features,
        feature_names=model.manifest.feature_names,
        max_batch_rows=settings.max_batch_rows,
    )
    for queue in queues:
        client.set(model_info_key(queue), info.model_dump_json())
    heartbeat = Heartbeat(client, stats, settings.heartbeat_s)
    rt = Runtime(settings, model, stats, heartbeat)
    if settings.serving_decisions:
        rt.serving = Serving(settings, model)
        if decision is not None:
            rt.serving.apply(decision)
        rt.watcher = DecisionWatcher(client, rt.serving, lambda: _follow(rt))
        _follow(rt)
    heartbeat.start()
    if rt.watcher is not None:
        rt.watcher.start()
    _current = rt
    return _current


def load_champion(settings: WorkerSettings, decision: ServingDecision) -> LoadedModel:
    """The champion of a serving decision, fetched, checked and loaded."""
    version_dir, manifest = fetch_version(
        decision.champion, settings.model_cache_dir, settings.model_name
    )
    return load_version(settings, version_dir, manifest)


def _follow(rt: Runtime) -> None:
    """Point the runtime and its published state at what the serving decision serves."""
    assert rt.serving is not None
    rt.model = rt.serving.arms.champion
    rt.stats.serving(rt.model.manifest.version, rt.serving.status())


def stop() -> None:
    global _current
    if _current is not None:
        if _current.watcher is not None:
            _current.watcher.stop()
        _current.heartbeat.stop()
        _current = None
