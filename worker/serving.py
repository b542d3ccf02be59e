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
from contract.names import ALIAS_CHALLENGER, ALIAS_CHAMPION, VERSION_TEXT
from contract.schemas import ServedVersion, ServingDecision, ServingStatus
from training.artifact import load_manifest
from training.fetch import fetch_version
from worker.model import LoadedModel, load_version
from worker.settings import WorkerSettings

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
        self._pinned: OrderedDict[str, LoadedModel] = OrderedDict()
        self._pin_lock = threading.RLock()
        self._shadow_lock = threading.Lock()
        self._shadow_diffs: deque[float] = deque(maxlen=SHADOW_WINDOW)
        self._shadow_rows = 0
        self._shadow_sum = 0.0
        self._shadow_s = 0.0
        self._since = time.perf_counter()

    # -- applying a decision ---------------------------------------------------------------

    def apply(self, decision: ServingDecision) -> bool:
        """Serve `decision` if every version it names passes its checks; otherwise keep
        serving what serves now and record why. True when it was applied."""
        current = self.arms
        if decision.generation == current.generation:
            return False
        try:
            # One process of a host loads at a time: the others keep serving meanwhile, so
            # a swap never takes every process's CPU at once.
            with _host_lock(self.settings.model_cache_dir):
                champion = self._load(decision.champion, current)
                challenger = None
                if decision.challenger is not None:
                    challenger = self._load(decision.challenger, current)
        except (InferenceError, OSError, ValueError) as exc:
            self.error = f"generation {decision.generation} not served: {exc}"
            log.error("serving decision %s", self.error)
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
        log.info(
            "serving %s generation %d: champion %s, challenger %s (canary %g%%, shadow %s)",
            decision.name,
            decision.generation,
            champion.manifest.version,
            challenger.manifest.version if challenger else "-",
            self.arms.canary_percent,
            self.arms.shadow,
        )
        return True

    def _load(self, served: ServedVersion, current: Arms) -> LoadedModel:
        with self._pin_lock:  # the row lane adds pinned versions from its own thread
            pinned = list(self._pinned.values())
        for loaded in (current.champion, current.challenger, *pinned):
            if loaded is not None and loaded.manifest.version == served.version:
                return loaded
        version_dir, manifest = fetch_version(
            served, self.settings.model_cache_dir, self.settings.model_name
        )
        return self._checked(load_version(self.settings, version_dir, manifest))

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
        arms = self.arms
        if pin is not None:
            return self._pinned_model(pin, arms), ARM_PINNED
        if arms.challenger is not None and in_canary(routing_key or job_id, arms.canary_percent):
            return arms.challenger, ARM_CHALLENGER
        # Without a decision there are no roles: the model directory's version serves.
        return arms.champion, ARM_CHAMPION if arms.decision is not None else None

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
            return self._checked(load_version(self.settings, version_dir, manifest))
        except (InferenceError, OSError, ValueError) as exc:
            raise UnknownModelVersion(
                f"model version {pin!r} of {self.settings.model_name} cannot be served: {exc}"
            ) from None

    # -- shadow ----------------------------------------------------------------------------

    def shadow(self, rows: np.ndarray, served: np.ndarray) -> None:
        """Run the challenger on rows the champion served, if shadow is on and the time
        spent so stays under its share; record how far apart they are."""
        arms = self.arms
        if not arms.shadow or arms.challenger is None or len(rows) == 0:
            return
        elapsed = time.perf_counter() - self._since
        if self._shadow_s > self.settings.shadow_max_share * elapsed:
            return
        t0 = time.perf_counter()
        try:
            other = arms.challenger.predict(rows)
        except Exception:
            log.exception("shadow run of %s failed", arms.challenger.manifest.version)
            return
        finally:
            self._shadow_s += time.perf_counter() - t0
        diffs = np.abs(other.astype(np.float64) - served.astype(np.float64))
        with self._shadow_lock:
            self._shadow_rows += len(diffs)
            self._shadow_sum += float(diffs.sum())
            self._shadow_diffs.extend(diffs.tolist())

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
