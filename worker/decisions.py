"""A thread in each worker process that applies serving decisions as they change.

It listens on SERVING_CHANNEL (promote and rollback publish the model's name there) and
reads the decision at least every serving_poll_s as a backstop, so a notice missed while
Redis was away still arrives. Applying one (worker.serving.Serving.apply) loads the new
versions on this thread: jobs keep being served by the old ones meanwhile.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import redis
from pydantic import ValidationError

from contract.errors import ModelArtifactError
from contract.names import SERVING_CHANNEL, serving_key
from contract.schemas import ServingDecision
from producer.connections import redis_client
from training.artifact import Manifest
from training.fetch import fetch_version
from worker.model import resolve_artifact
from worker.serving import Serving
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)


def read_decision(client: redis.Redis, name: str) -> ServingDecision | None:
    raw = client.get(serving_key(name))
    if raw is None:
        return None
    try:
        return ServingDecision.model_validate_json(raw)
    except ValidationError as exc:
        log.error("the serving decision of %s is unreadable: %s", name, exc)
        return None


def check_served_artifact(settings: WorkerSettings, provider: str) -> Manifest:
    """The worker's start-up check, in its main process: the serving decision's champion
    fetched and checked when there is a decision, else the model directory's version; the
    manifest of the version checked, which the processes will serve at start."""
    decision = None
    if settings.serving_decisions:
        client = redis_client(settings.backend, settings, retries=0)
        try:
            decision = read_decision(client, settings.model_name)
        except redis.RedisError as exc:
            log.warning("cannot read the serving decision (%s): checking the model directory", exc)
        finally:
            client.close()
    if decision is None:
        return resolve_artifact(settings, provider)[0]
    try:
        return fetch_version(
            decision.champion, settings.model_cache_dir, settings.model_name, settings.artifact_auth
        )[1]
    except ModelArtifactError as exc:
        # As each process does (worker.runtime): serve what the running workers keep serving.
        if exc.retryable or decision.previous is None:
            raise
        log.error(
            "generation %d not served: %s; starting on the previous champion %s",
            decision.generation,
            exc,
            decision.previous.version,
        )
        return fetch_version(
            decision.previous, settings.model_cache_dir, settings.model_name, settings.artifact_auth
        )[1]


class DecisionWatcher:
    def __init__(
        self,
        client: redis.Redis,
        serving: Serving,
        on_change: Callable[[], None],
    ) -> None:
        self.client = client
        self.serving = serving
        self.name = serving.settings.model_name
        self.poll_s = serving.settings.serving_poll_s
        self._on_change = on_change
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="inference-serving-watch", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def check(self) -> None:
        """Read the decision, apply it if it is new, and publish the serving status."""
        decision = read_decision(self.client, self.name)
        generation = self.serving.arms.generation
        if decision is not None and decision.generation != generation:
            self.serving.apply(decision)
        # Also when nothing changed: the shadow statistics move on.
        self._on_change()

    def _run(self) -> None:
        backoff = self.poll_s
        while not self._stop.is_set():
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(SERVING_CHANNEL)
                while not self._stop.is_set():
                    # A notice, or the poll's timeout: either way the decision is read.
                    pubsub.get_message(timeout=self.poll_s)
                    self.check()
                    backoff = self.poll_s
            except redis.RedisError as exc:
                log.warning("serving decisions: Redis error, retrying in %.1fs: %s", backoff, exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
            except Exception:
                log.exception("serving decisions: unexpected error")
                self._stop.wait(backoff)
            finally:
                pubsub.close()
