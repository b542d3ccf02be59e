"""Where the benchmark's workers are: a deployment's, or a private redis-server and CPU
worker started for the run (`--embedded`), with a model trained first if there is none."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from contract.errors import BenchError, TrainingError
from contract.schemas import ServedVersion, ServingDecision
from producer.client import resolve_queue
from producer.settings import ProducerSettings
from stack.bench.config import BenchConfig
from stack.bench.report import cpu_cores
from stack.embedded_redis import EmbeddedRedis
from stack.processes import celery_env, wait_ready, worker_process
from training import ensure as training_ensure
from training.artifact import load_manifest
from training.fetch import file_hashes
from training.promote import publish_decision

READY_TIMEOUT_S = 120.0


def ensure_model(model_dir: Path, name: str, say: Callable[[str], None]) -> float | None:
    """Seconds spent training, or None when a model was there already."""
    start = time.perf_counter()
    try:
        trained = training_ensure.ensure_model(model_dir, name, say)
    except TrainingError as exc:
        raise BenchError(f"{exc}; or pass --model-dir with a trained model") from None
    return time.perf_counter() - start if trained else None


@dataclass
class Deployment:
    settings: ProducerSettings
    mode: str
    worker: dict[str, Any]


@contextlib.contextmanager
def embedded(
    config: BenchConfig, model_dir: Path, log_dir: Path, say: Callable[[str], None]
) -> Iterator[Deployment]:
    """A private redis-server and one prefork CPU worker, stopped on the way out."""

    queue = resolve_queue(config.queue)
    processes = config.processes or cpu_cores()
    training_s = ensure_model(model_dir, config.model_name, say)
    with EmbeddedRedis() as server:
        say(f"private redis-server on {server.url}")
        env = celery_env(
            server.url,
            model_dir=model_dir.resolve(),
            model_name=config.model_name,
            intra_op_threads=1,
            model_cache_dir=(log_dir / "model-cache").resolve(),
        )
        # Overrides meant for a real deployment would point the worker elsewhere.
        for name in ("INFERENCE_BROKER_URL", "INFERENCE_RESULT_BACKEND", "INFERENCE_MODEL_VERSION"):
            env.pop(name, None)
        hostname = f"bench-{os.getpid()}@{socket.gethostname()}"
        log_path = log_dir / "bench-worker.log"
        worker = worker_process(
            env,
            log_path,
            queue=queue,
            name=hostname,
            concurrency=processes,
            loglevel=config.worker_loglevel,
        )
        say(f"starting a CPU worker ({processes} prefork processes); log {log_path}")
        probe = redis.Redis.from_url(server.url)
        if config.serving_decision:
            _publish_decision(probe, model_dir, config.model_name)
            say("serving decision published: the worker starts from it")
        start = time.perf_counter()
        worker.start()
        try:
            try:
                wait_ready(worker, probe, hostname, processes, timeout_s=READY_TIMEOUT_S)
            except (RuntimeError, TimeoutError) as exc:
                raise BenchError(str(exc)) from None
            finally:
                probe.close()
            ready_s = time.perf_counter() - start
            settings = ProducerSettings(redis_url=server.url, broker_url=None, result_backend=None)
            yield Deployment(
                settings,
                "embedded",
                {
                    "hostnames": [hostname],
                    "processes": processes,
                    "pool": "prefork",
                    "intra_op_threads": 1,
                    "loglevel": config.worker_loglevel,
                    "start_to_ready_s": ready_s,
                    "serving_decision": config.serving_decision,
                    "training_s": training_s,
                    "log": str(log_path),
                },
            )
        finally:
            worker.stop()


def _publish_decision(client: redis.Redis, model_dir: Path, name: str) -> None:
    version_dir, manifest = load_manifest(model_dir, name)
    champion = ServedVersion(
        version=manifest.version,
        location=str(version_dir.resolve()),
        sha256=file_hashes(str(version_dir.resolve())),
        n_features=manifest.n_features,
    )
    decision = ServingDecision(name=name, generation=0, champion=champion, decided_at=time.time())
    publish_decision(client, decision)
