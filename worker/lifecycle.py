"""Worker start-up and shutdown: check the model and device, then load it per process.

The main process only checks (artifact, sha256, provider): it never creates
an inference session, so nothing heavy crosses a fork. Prefork children load
the model in `worker_process_init`; solo and threads pools load it in
`worker_init`, in the one process that runs tasks. Either way the model is
loaded and warmed before the first job is taken. Then each process starts its row
lane (worker.lane) beside every queue the worker consumes.

Nothing is connected at import: the app module calls `connect()`, and the patches to
kombu (worker.guards.bound_decompression) is applied in `worker_init`,
in the worker's main process, before its pool forks.
"""

from __future__ import annotations

import gc
import logging
import os
from typing import Any

from celery import Celery
from celery.signals import (
    task_failure,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_shutdown,
)

from contract.errors import StartupError
from contract.names import QUEUE_CPU, row_queue
from producer.connections import RedisUnreachable, check_redis
from producer.settings import redact
from worker import heap, metrics, monitoring, observe, runtime
from worker.decisions import check_served_artifact
from worker.events import EventsSwitch
from worker.guards import MESSAGE_BYTES_HEADER, bound_decompression
from worker.lane.server import RowLane
from worker.model import CUDA, check_provider
from worker.observe import LaneObserver
from worker.settings import WorkerSettings, load

log = logging.getLogger(__name__)

# Filled in the main process by worker_init; prefork children inherit it.
_identity: dict[str, Any] = {
    "hostname": "", "queues": [QUEUE_CPU], "pool": "prefork", "lanes": [], "app": None,
    "events": None, "metrics_dir": None, "metrics_server": None,
}  # fmt: skip
_lanes: list[RowLane] = []


def connect(app: Celery) -> None:
    """Hook start-up, shutdown and failure clean-up onto Celery's signals, for `app`'s
    workers. Called once, by the app module."""
    _identity["app"] = app
    worker_init.connect(_check_and_maybe_load, weak=False)
    worker_process_init.connect(_load_in_child, weak=False)
    worker_process_shutdown.connect(_stop, weak=False)
    worker_shutdown.connect(_stop, weak=False)
    worker_shutdown.connect(_stop_monitoring, weak=False)
    task_failure.connect(_collect_failure_garbage, weak=False)
    observe.connect_celery_signals()
    monitoring.register_commands(_identity)


def lane_queues(consumed: list[str]) -> list[str]:
    """The single-row queues this worker's processes serve themselves: one beside each
    queue it consumes (a row queue named in -Q is left to Celery's consumer)."""
    return [row_queue(q) for q in consumed if row_queue(q) != q and row_queue(q) not in consumed]


def pool_name(pool_cls: Any) -> str:
    module = getattr(pool_cls, "__module__", None) or str(pool_cls)
    return module.rsplit(".", 1)[-1].split(":")[0]


def _refuse(reason: str) -> None:
    log.critical("worker refuses to start: %s", reason)
    raise SystemExit(f"worker refuses to start: {reason}")


def _check_and_maybe_load(sender: Any, **_: Any) -> None:
    """`sender` is the celery.apps.worker.Worker being started."""
    settings = load()
    heap.return_large_blocks()  # before the pool forks: its processes inherit it
    bound_decompression(settings.max_message_bytes)
    pool = pool_name(sender.pool_cls)
    consumed = sorted(sender.app.amqp.queues.consume_from or [QUEUE_CPU])
    lanes = lane_queues(consumed) if settings.row_lane else []
    queues = sorted({*consumed, *lanes})
    _identity.update(hostname=sender.hostname, queues=queues, pool=pool, lanes=lanes)
    log.info(
        "worker %s: queues %s, pool %s, broker %s",
        sender.hostname,
        queues,
        pool,
        redact(settings.broker),
    )
    _check_redis(settings)
    try:
        provider = check_provider(settings)
        # The serving decision's champion when there is one, else the model directory's.
        manifest = check_served_artifact(settings, provider)
    except StartupError as exc:
        _refuse(str(exc))
    _start_monitoring(sender, settings, manifest.name, manifest.version, provider)
    if settings.provider == "cuda" and pool == "prefork":
        _refuse(
            "INFERENCE_PROVIDER=cuda needs a CUDA-safe pool: start GPU workers with "
            "-P solo (one process per GPU) or -P threads"
        )
    processes = sender.concurrency if pool == "prefork" else 1
    cores = os.cpu_count() or 1
    if processes * settings.intra_op_threads > cores:
        log.warning(
            "%d process(es) x %d intra-op thread(s) > %d cores: inference threads will contend",
            processes,
            settings.intra_op_threads,
            cores,
        )
    if pool != "prefork":
        _start_runtime()


def _check_redis(settings: WorkerSettings) -> None:
    """Refuse to start on credentials or a certificate that Redis rejects: Celery would
    retry them 100 times with ever longer waits, and a prefork child would die loading its
    model. A server that does not answer only warns: it may come up later, and Celery's
    own connection retry waits for it."""
    broker = settings.broker_url or settings.redis_url
    backend = settings.result_backend or settings.redis_url
    targets = (
        {"broker and result backend": broker}
        if broker == backend
        else {"broker": broker, "result backend": backend}
    )
    for role, url in targets.items():
        try:
            check_redis(url, settings, role)
        except RedisUnreachable as exc:
            log.warning("%s: Celery will keep retrying", exc)
        except StartupError as exc:
            _refuse(str(exc))


def _start_monitoring(
    worker: Any, settings: WorkerSettings, model: str, version: str, provider: str
) -> None:
    """In the main process, before the pool forks: the events switch the row lanes read,
    and, with a metrics port, the metrics directory every process writes to and its server."""
    switch = EventsSwitch()
    switch.follow(worker)
    _identity["events"] = switch
    if settings.metrics_port is None:
        return
    path = metrics.prepare_directory(_identity["hostname"])
    device = f"cuda:{settings.cuda_device_id}" if provider == CUDA else "cpu"
    # This process counts what it refuses, revokes and fails itself; its children inherit
    # the recorder.
    metrics.start_recording(model, version, device)
    if _identity["pool"] == "prefork":
        observe.mark_pool_parent()
    _identity["metrics_dir"] = path
    try:
        _identity["metrics_server"] = metrics.serve(
            path, settings.metrics_port, settings.metrics_addr
        )
    except OSError as exc:
        metrics.remove_directory(path)
        _refuse(f"cannot serve metrics on port {settings.metrics_port}: {exc}")


def _stop_monitoring(**_: Any) -> None:
    switch = _identity.get("events")
    if switch is not None:
        switch.stop()
    server = _identity.get("metrics_server")
    if server is not None:
        server.shutdown()
        _identity["metrics_server"] = None
    path = _identity.get("metrics_dir")
    if path is not None:
        metrics.remove_directory(path)
        _identity["metrics_dir"] = None


def _load_in_child(**_: Any) -> None:
    _start_runtime()


def _start_runtime() -> None:
    settings = load()
    try:
        rt = runtime.start(settings, _identity["hostname"], _identity["queues"], _identity["pool"])
    except StartupError as exc:
        _refuse(str(exc))
    app, hostname = _identity["app"], _identity["hostname"]
    for queue in _identity["lanes"]:
        observer = LaneObserver(queue, hostname, app, _identity["events"])
        lane = RowLane(rt, app.backend, queue, hostname, observer=observer)
        lane.start()
        _lanes.append(lane)


def _stop(**_: Any) -> None:
    while _lanes:
        _lanes.pop().stop()
    runtime.stop()


# A failed task leaves ~75 KB of cyclic garbage (the exception, its traceback and the
# tracer's frames) that only a full collection frees, and CPython's full collections wait
# until long-lived objects grow by 25%: a pool process that fails jobs grew from ~100 to
# ~200 MB before one ran. A full collection every so many failures keeps it flat, for a
# few milliseconds each (measured: ~45 ms with the model loaded, amortized <0.5 ms/failure).
# The garbage of a failed job holds its arguments too: a batch of megabytes is collected at
# once, whatever the count, so a stream of large bad jobs cannot grow a process by their
# size each (one of 1,000,000 features held ~60 MB until the hundredth failure).
COLLECT_EVERY_FAILURES = 100
COLLECT_AFTER_BYTES = 1024 * 1024
_failures_since_collect = 0


def _collect_failure_garbage(sender: Any = None, **_: Any) -> None:
    global _failures_since_collect
    _failures_since_collect += 1
    size = getattr(getattr(sender, "request", None), MESSAGE_BYTES_HEADER, None)
    large = isinstance(size, int) and size >= COLLECT_AFTER_BYTES
    if large or _failures_since_collect >= COLLECT_EVERY_FAILURES:
        _failures_since_collect = 0
        gc.collect()
