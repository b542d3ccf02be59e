"""The versions a worker process serves, and how each job picks one.

A serving decision (contract.schemas.ServingDecision, written by `python -m training
promote`) names a champion and perhaps a challenger, with a canary share and a shadow flag.
Applying one loads every new version beside the ones serving (fetched and checked by
training.fetch, then loaded, placement-checked and warmed up by worker.model), and only then
replaces the `Arms` snapshot in one assignment: a batch reads the snapshot once, so it runs
wholly on the old versions or wholly on the new, and an old onnxruntime session is freed
when the last batch holding it lets go. A version that fails any check is not served: the
previous snapshot stays, and the failure is in the process's state (the health report).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from contract.errors import InferenceError, ModelArtifactError, UnknownModelVersion
from contract.metrics import APPLIED, DECISION_REFUSED
from contract.names import ALIAS_CHALLENGER, ALIAS_CHAMPION, VERSION_TEXT
from contract.schemas import ServedVersion, ServingDecision, ServingStatus
from training.artifact import MANIFEST_FILE, load_manifest
from training.fetch import fetch_version
from worker import metrics
from worker.model import LoadedModel, load_version
from worker.settings import WorkerSettings
from worker.shadow import ShadowRunner, ShadowWork

log = logging.getLogger(__name__)

ARM_CHAMPION = ALIAS_CHAMPION
ARM_CHALLENGER = ALIAS_CHALLENGER
ARM_PINNED = "pinned"
# Canary shares are resolved to 1/100 of a percent.
BUCKETS = 10_000
SHADOW_WINDOW = 4096
"""Recent |challenger - champion| differences kept for the p99."""
LOAD_LOCK_FILE = ".load.lock"
_VERSION_TEXT = re.compile(VERSION_TEXT)


def in_canary(key: str, percent: float) -> bool:
    """Whether the job with routing key `key` goes to the challenger: a hash of the key, so
    the same key always gets the same answer, and keys spread evenly over the share."""
    if percent <= 0:
        return False
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS < round(percent * BUCKETS / 100)


@contextmanager
def _host_lock(cache_dir: Path) -> Iterator[None]:
    cache_dir.mkdir(parents=True, exist_ok=True)
    with (cache_dir / LOAD_LOCK_FILE).open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _count_decision(outcome: str) -> None:
    recorder = metrics.current()
    if recorder is not None:
        recorder.decided(outcome)


@dataclass(frozen=True)
class Arms:
    """What serves now; replaced whole, never changed in place."""

    generation: int
    champion: LoadedModel
    challenger: LoadedModel | None = None
    canary_percent: float = 0.0
    shadow: bool = False
    decision: ServingDecision | None = None


class Serving:
    """One process's versions: the arms of the current decision plus pinned ones (LRU)."""

    def __init__(self, settings: WorkerSettings, base: LoadedModel) -> None:
        self.settings = settings
        self.arms = Arms(generation=-1, champion=base)
        self.error: str | None = None
        self.refused_generation: int | None = None
        """The last decision refused because a version failed its checks."""
        self._pinned: OrderedDict[str, LoadedModel] = OrderedDict()
        self._pin_lock = threading.RLock()
        self._shadow_lock = threading.Lock()
        self._shadow_pair: tuple[str, str] | None = None
        self._shadow_diffs: deque[float] = deque(maxlen=SHADOW_WINDOW)
        self._shadow_rows = 0
        self._shadow_sum = 0.0
        self._runner: ShadowRunner | None = None

    # -- applying a decision ---------------------------------------------------------------

    def apply(self, decision: ServingDecision) -> bool:
        """Serve `decision` if every version it names passes its checks; otherwise keep
        serving what serves now and record why. True when it was applied."""
        current = self.arms
        if decision.generation in (current.generation, self.refused_generation):
            return False
        began = time.perf_counter()
        try:
            # One process of a host loads at a time: the others keep serving meanwhile, so
            # a swap never takes every process's CPU at once.
            with _host_lock(self.settings.model_cache_dir):
                locked = time.perf_counter()
                champion = self._load(decision.champion, current)
                challenger = None
                if decision.challenger is not None:
                    challenger = self._load(decision.challenger, current)
        except (InferenceError, OSError, ValueError) as exc:
            self.error = f"generation {decision.generation} not served: {exc}"
            if isinstance(exc, OSError) or getattr(exc, "retryable", False):
                # The artifact store or the disk failed, not the artifact: the next poll
                # tries again.
                log.warning("serving decision %s; retrying", self.error)
                return False
            log.error("serving decision %s", self.error)
            self.refuse(decision.generation, self.error)
            return False
        self.arms = Arms(
            decision.generation,
            champion,
            challenger,
            decision.canary_percent if challenger is not None else 0.0,
            decision.shadow and challenger is not None,
            decision,
        )
        self.error = None
        _count_decision(APPLIED)
        log.info(
            "serving %s generation %d: champion %s, challenger %s (canary %g%%, shadow %s) "
            "after %.3fs (lock wait %.3fs)",
            decision.name,
            decision.generation,
            champion.manifest.version,
            challenger.manifest.version if challenger else "-",
            self.arms.canary_percent,
            self.arms.shadow,
            time.perf_counter() - began,
            locked - began,
        )
        return True

    def refuse(self, generation: int, reason: str) -> None:
        """Record decision `generation` as refused: a version failed its checks, and would
        fail them again, so it is not retried (a new decision is) and is counted once."""
        self.error = reason
        self.refused_generation = generation
        _count_decision(DECISION_REFUSED)

    def _load(self, served: ServedVersion, current: Arms) -> LoadedModel:
        with self._pin_lock:  # the row lane adds pinned versions from its own thread
            pinned = list(self._pinned.values())
        for loaded in (current.champion, current.challenger, *pinned):
            if loaded is not None and loaded.manifest.version == served.version:
                if loaded.manifest_sha256 != served.sha256.get(MANIFEST_FILE):
                    raise ModelArtifactError(
                        f"the serving decision's manifest of {served.version} differs from "
                        "the one this process loaded: not served"
                    )
                return loaded
        version_dir, manifest = fetch_version(
            served,
            self.settings.model_cache_dir,
            self.settings.model_name,
            self.settings.artifact_auth,
            check_files=False,
        )
        return self._checked(load_version(self.settings, version_dir, manifest, explain_now=False))

    def _checked(self, model: LoadedModel) -> LoadedModel:
        expected = self.arms.champion.n_features
        if model.n_features != expected:
            raise ModelArtifactError(
                f"version {model.manifest.version} takes {model.n_features} features, "
                f"the served one {expected}"
            )
        return model

    # -- choosing a version per job --------------------------------------------------------

    def choose(
        self, pin: str | None, routing_key: str | None, job_id: str
    ) -> tuple[LoadedModel, str | None]:
        """The version that serves a job, and its arm (None before any decision)."""
        model, arm, _ = self.pick(pin, routing_key, job_id)
        return model, arm

    def pick(
        self, pin: str | None, routing_key: str | None, job_id: str
    ) -> tuple[LoadedModel, str | None, LoadedModel | None]:
        """choose(), and the challenger to shadow the job with: the one of the same arms
        as its champion, so a swap before the shadow run cannot pair it with another."""
        arms = self.arms
        if pin is not None:
            return self._pinned_model(pin, arms), ARM_PINNED, None
        if arms.challenger is not None and in_canary(routing_key or job_id, arms.canary_percent):
            return arms.challenger, ARM_CHALLENGER, None
        if arms.decision is None:
            # Without a decision there are no roles: the model directory's version serves.
            return arms.champion, None, None
        return arms.champion, ARM_CHAMPION, arms.challenger if arms.shadow else None

    def _pinned_model(self, pin: str, arms: Arms) -> LoadedModel:
        if pin == ALIAS_CHAMPION:
            return arms.champion
        if pin == ALIAS_CHALLENGER:
            if arms.challenger is None:
                raise UnknownModelVersion("no challenger is being served: pin a version instead")
            return arms.challenger
        decision = arms.decision
        for model, served in (
            (arms.champion, decision.champion if decision else None),
            (arms.challenger, decision.challenger if decision else None),
        ):
            if model is not None and pin in (
                model.manifest.version,
                served.registry_version if served else None,
            ):
                return model
        with self._pin_lock:
            if pin in self._pinned:
                self._pinned.move_to_end(pin)
                return self._pinned[pin]
            model = self._load_pinned(pin, decision)
            self._pinned[pin] = model
            while len(self._pinned) > self.settings.max_pinned_versions:
                self._pinned.popitem(last=False)
            return model

    def _load_pinned(self, pin: str, decision: ServingDecision | None) -> LoadedModel:
        if self.settings.max_pinned_versions == 0 or not _VERSION_TEXT.fullmatch(pin):
            raise UnknownModelVersion(f"model version {pin[:128]!r} is not served here")
        previous = decision.previous if decision else None
        try:
            if previous is not None and pin in (previous.version, previous.registry_version):
                return self._load(previous, self.arms)
            version_dir, manifest = load_manifest(
                self.settings.model_dir, self.settings.model_name, pin
            )
            return self._checked(
                load_version(self.settings, version_dir, manifest, explain_now=False)
            )
        except (InferenceError, OSError, ValueError) as exc:
            raise UnknownModelVersion(
                f"model version {pin!r} of {self.settings.model_name} cannot be served: {exc}"
            ) from None

    # -- shadow ----------------------------------------------------------------------------

    def shadow(
        self,
        rows: np.ndarray,
        served: np.ndarray,
        champion: LoadedModel,
        challenger: LoadedModel | None,
    ) -> None:
        """Hand rows `champion` served (and its predictions) to the shadow thread, to be run
        by `challenger` (pick()'s); returns at once, the work queued or skipped. The arrays
        are the runner's from here on: the caller must not change them."""
        if challenger is None or len(rows) == 0:
            return
        runner = self._runner
        if runner is None:
            with self._shadow_lock:
                if self._runner is None:
                    self._runner = ShadowRunner(
                        self.settings.shadow_max_share,
                        self.settings.shadow_queue_rows,
                        self._compared,
                        self._skipped,
                    )
                runner = self._runner
        runner.submit(ShadowWork(rows, served, champion.manifest.version, challenger))

    def _compared(self, work: ShadowWork, diffs: np.ndarray) -> None:
        recorder = metrics.current()
        if recorder is not None:
            recorder.shadowed(work.champion, work.challenger.manifest.version, diffs.tolist())
        arms = self.arms
        if arms.challenger is None or work.pair != self._pair(arms):
            return  # the health report speaks of the pair serving now
        with self._shadow_lock:
            self._reset_for(work.pair)
            self._shadow_rows += len(diffs)
            self._shadow_sum += float(diffs.sum())
            self._shadow_diffs.extend(diffs.tolist())

    def _skipped(self, work: ShadowWork, reason: str) -> None:
        recorder = metrics.current()
        if recorder is not None:
            version = work.challenger.manifest.version
            recorder.shadow_skipped(work.champion, version, reason, len(work.rows))

    @staticmethod
    def _pair(arms: Arms) -> tuple[str, str] | None:
        if arms.challenger is None:
            return None
        return arms.champion.manifest.version, arms.challenger.manifest.version

    def _reset_for(self, pair: tuple[str, str] | None) -> None:
        """The shadow statistics start again for a new champion and challenger."""
        if pair != self._shadow_pair:
            self._shadow_pair = pair
            self._shadow_diffs.clear()
            self._shadow_rows = 0
            self._shadow_sum = 0.0

    def drain_shadow(self, timeout: float = 10.0) -> bool:
        """Wait until the shadow work queued so far has run (tests, shutdown)."""
        return self._runner is None or self._runner.drain(timeout)

    def close(self) -> None:
        """Stop the shadow thread, dropping the work it has not run."""
        if self._runner is not None:
            self._runner.stop()

    def loaded(self) -> dict[str, LoadedModel]:
        """Every version this process holds now, by version: the arms and the pinned."""
        arms = self.arms
        with self._pin_lock:
            held = dict(self._pinned)
        if arms.challenger is not None:
            held[arms.challenger.manifest.version] = arms.challenger
        held[arms.champion.manifest.version] = arms.champion
        return held

    def status(self) -> ServingStatus:
        arms = self.arms
        with self._shadow_lock:
            if self._shadow_pair is not None:
                self._reset_for(self._pair(arms))
            recent = list(self._shadow_diffs)
            rows, total = self._shadow_rows, self._shadow_sum
        with self._pin_lock:
            loaded = {arms.champion.manifest.version, *self._pinned}
        if arms.challenger is not None:
            loaded.add(arms.challenger.manifest.version)
        return ServingStatus(
            generation=arms.generation,
            challenger_version=arms.challenger.manifest.version if arms.challenger else None,
            canary_percent=arms.canary_percent,
            shadow=arms.shadow,
            loaded_versions=sorted(loaded),
            error=self.error,
            shadow_rows=rows,
            shadow_mean_abs_diff=round(total / rows, 6) if rows else None,
            shadow_p99_abs_diff=round(float(np.percentile(recent, 99)), 6) if recent else None,
        )
