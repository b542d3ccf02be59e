"""What one worker process holds: its model, its counters and its heartbeat.

`start()` runs once per process, after fork (prefork children) or in the
worker's own process (solo/threads pools), before the first job is taken.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import redis

from contract.errors import ModelArtifactError, ModelNotReady
from contract.names import model_info_key
from contract.schemas import ModelInfo, ServedVersion, ServingDecision, WorkerState
from producer.connections import redis_client
from training.fetch import fetch_version
from worker import metrics
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
    hostname: str = ""
    queues: list[str] = field(default_factory=list)
    client: redis.Redis | None = None
    recorded: set[str] = field(default_factory=set)
    """The versions whose load the metrics have recorded as held by this process."""


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
    model, refused = _start_model(settings, decision)
    metrics.start_recording(model.manifest.name, model.manifest.version, model.device)
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
    _publish_info(client, settings, model, queues)
    heartbeat = Heartbeat(client, stats, settings.heartbeat_s)
    rt = Runtime(settings, model, stats, heartbeat, hostname=hostname, queues=queues, client=client)
    _record_loaded(rt)
    if settings.serving_decisions:
        rt.serving = Serving(settings, model)
        if decision is not None and refused is not None:
            rt.serving.refuse(decision.generation, refused)
        elif decision is not None:
            rt.serving.apply(decision)
        rt.watcher = DecisionWatcher(client, rt.serving, lambda: _follow(rt))
        _follow(rt)
    heartbeat.start()
    if rt.watcher is not None:
        rt.watcher.start()
    _current = rt
    return _current


def _start_model(
    settings: WorkerSettings, decision: ServingDecision | None
) -> tuple[LoadedModel, str | None]:
    """The model a process starts with, and why the decision is refused when it is.

    A champion that fails its checks (a tampered or half-copied artifact) is refused here as
    the running processes refuse it: the process starts on the decision's previous champion,
    which they keep serving, rather than failing (a prefork pool would restart it forever,
    and a worker scaled up meanwhile would never start)."""
    if decision is None:
        return load_model(settings), None
    try:
        return load_served(settings, decision.champion), None
    except ModelArtifactError as exc:
        if exc.retryable or decision.previous is None:
            raise
        reason = f"generation {decision.generation} not served: {exc}"
        log.error("%s; starting on the previous champion %s", reason, decision.previous.version)
        return load_served(settings, decision.previous), reason


def load_served(settings: WorkerSettings, served: ServedVersion) -> LoadedModel:
    """A version named by a serving decision, fetched, checked and loaded."""
    version_dir, manifest = fetch_version(
        served,
        settings.model_cache_dir,
        settings.model_name,
        settings.artifact_auth,
        check_files=False,
    )
    return load_version(settings, version_dir, manifest)


def _publish_info(
    client: redis.Redis, settings: WorkerSettings, model: LoadedModel, queues: list[str]
) -> None:
    """The champion's description (`python -m producer model-info`), on every queue served."""
    info = ModelInfo(
        name=model.manifest.name,
        version=model.manifest.version,
        n_features=model.manifest.n_features,
        feature_names=model.manifest.feature_names,
        max_batch_rows=settings.max_batch_rows,
        target=model.manifest.target,
        metrics=model.manifest.metrics,
        importances=model.manifest.importances,
        base_value=model.manifest.base_value if model.explains else None,
    )
    for queue in queues:
        client.set(model_info_key(queue), info.model_dump_json())


def _record_loaded(rt: Runtime) -> None:
    """The metrics' model info, load and warm-up times follow the versions this process
    holds: each newly loaded one recorded once, each one let go of marked gone."""
    recorder = metrics.current()
    if recorder is None:
        return
    held = {rt.model.manifest.version: rt.model}
    if rt.serving is not None:
        held.update(rt.serving.loaded())
    recorder.serve(rt.model.manifest.version)
    for version, model in held.items():
        if version not in rt.recorded:
            recorder.loaded(version, model.provider, rt.hostname, model.load_s, model.warmup_s)
    for version in rt.recorded - held.keys():
        recorder.unloaded(version, rt.model.provider, rt.hostname)
    rt.recorded = set(held)


def _follow(rt: Runtime) -> None:
    """Point the runtime and its published state at what the serving decision serves."""
    assert rt.serving is not None
    champion = rt.serving.arms.champion
    if champion is not rt.model:
        rt.model = champion
        try:
            if rt.client is not None:
                _publish_info(rt.client, rt.settings, champion, rt.queues)
        except redis.RedisError as exc:
            log.warning("cannot publish the model info of %s: %s", champion.manifest.version, exc)
    rt.stats.serving(rt.model.manifest.version, rt.serving.status())
    _record_loaded(rt)


def stop() -> None:
    global _current
    if _current is not None:
        if _current.watcher is not None:
            _current.watcher.stop()
        if _current.serving is not None:
            _current.serving.close()
        _current.heartbeat.stop()
        _current = None
