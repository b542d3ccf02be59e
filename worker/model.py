"""The ONNX inference session: loading, provider checks, warm-up and predict.

A LoadedModel is created inside the process that uses it (after fork), never at
import time: onnxruntime sessions and CUDA contexts do not survive fork.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from contract.errors import ModelArtifactError, ProviderUnavailable
from training.artifact import (
    MANIFEST_FILE,
    Manifest,
    Variant,
    load_manifest,
    sha256_of,
    verified_model_path,
)
from worker.explainer import Explainer
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


@dataclass
class LoadedModel:
    manifest: Manifest
    session: ort.InferenceSession
    provider: str
    device: str
    variant: str
    placement: dict[str, int] = field(default_factory=dict)
    """Graph nodes per execution provider, as onnxruntime's profiler saw them at start-up."""
    manifest_sha256: str = ""
    """sha256 of the manifest file loaded: what a serving decision naming this version must
    record for it to be served by this copy."""
    load_s: float = 0.0
    """Seconds the load took: checks, placement probe and session creation."""
    warmup_s: float = 0.0
    """Seconds the warm-up runs took."""
    explainer: Explainer | None = None
    """explain.onnx's session, when the model has one and the worker explains."""
    explain_refused: str | None = None
    """Why a model with explain.onnx is served without it (its placement failed on CUDA)."""
    explain_from: tuple[WorkerSettings, Path] | None = field(default=None, repr=False)
    """Where explain.onnx is loaded from on the first explain job, for versions loaded by a
    hot swap: their swap costs the jobs running beside it only the prediction model's load."""
    _explain_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def ready_explainer(self) -> Explainer | None:
        """The explainer, loaded now if it was deferred; None when this version can't explain
        here (explain_refused says why, if it has a reason)."""
        if self.explain_from is not None:
            with self._explain_lock:
                if self.explain_from is not None:
                    settings, version_dir = self.explain_from
                    _attach_explainer(self, settings, version_dir)
                    self.explain_from = None
        return self.explainer

    @property
    def explains(self) -> bool:
        """Whether explain jobs are served by this version (now or once deferred-loaded)."""
        return self.explainer is not None or self.explain_from is not None

    @property
    def n_features(self) -> int:
        return self.manifest.n_features

    def predict(self, rows: np.ndarray) -> np.ndarray:
        """Predictions (float32, one per row) for a (n, n_features) float32 array."""
        (out,) = self.session.run([self.manifest.output_name], {self.manifest.input_name: rows})
        return np.asarray(out, dtype=np.float32).reshape(-1)


def check_provider(settings: WorkerSettings) -> str:
    """The provider to serve with, or ProviderUnavailable; never creates a CUDA context."""
    if settings.provider == "cpu":
        return CPU
    available = ort.get_available_providers()
    if CUDA in available:
        return CUDA
    reason = (
        f"INFERENCE_PROVIDER=cuda but onnxruntime offers only {available} "
        f"(onnxruntime {ort.__version__}; the GPU worker needs the onnxruntime-gpu package, "
        "a CUDA 12 runtime with cuDNN 9, and a visible NVIDIA device)"
    )
    if settings.allow_cpu_fallback:
        log.warning("%s; INFERENCE_ALLOW_CPU_FALLBACK is set: serving on the CPU", reason)
        return CPU
    raise ProviderUnavailable(
        reason + "; set INFERENCE_ALLOW_CPU_FALLBACK=true to serve on the CPU"
    )


def resolve_artifact(settings: WorkerSettings, provider: str) -> tuple[Manifest, Path, Variant]:
    """Manifest, verified model path and variant for this provider (cheap; no session)."""
    version_dir, manifest = load_manifest(
        settings.model_dir, settings.model_name, settings.model_version
    )
    variant: Variant = "gpu" if provider == CUDA else "cpu"
    return manifest, verified_model_path(version_dir, manifest, variant), variant


def _session_options(
    settings: WorkerSettings, profile_dir: str | None = None
) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile_dir is not None:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(profile_dir, "placement")
    return options


def _providers(
    settings: WorkerSettings, provider: str
) -> list[str | tuple[str, dict[str, object]]]:
    if provider == CUDA:
        return [(CUDA, {"device_id": settings.cuda_device_id}), CPU]
    return [CPU]


def node_placement(
    session: ort.InferenceSession, sample: np.ndarray, input_name: str
) -> dict[str, int]:
    """Run once under the profiler and count graph nodes per execution provider."""
    session.run(None, {input_name: sample})
    trace = Path(session.end_profiling())
    try:
        events = json.loads(trace.read_text())
    finally:
        trace.unlink(missing_ok=True)
    counts: Counter[str] = Counter()
    seen: set[str] = set()
    for event in events:
        args = event.get("args") or {}
        name = event.get("name", "")
        is_kernel = event.get("cat") == "Node" and name.endswith("_kernel_time")
        if is_kernel and "provider" in args and name not in seen:
            seen.add(name)
            counts[args["provider"]] += 1
    return dict(counts)


def _checked_session(
    settings: WorkerSettings, provider: str, path: Path, sample: np.ndarray, input_name: str
) -> tuple[ort.InferenceSession, dict[str, int]]:
    """A session on `provider` for the model file at `path`, and its node placement;
    ProviderUnavailable when a CUDA session would run any node elsewhere.

    The placement comes from the session's own first run under the profiler: ending the
    profile turns profiling off for good, so one session is built rather than a probe and
    then the one served, which halves the load a hot swap costs the jobs running beside it.
    """
    with tempfile.TemporaryDirectory(prefix="ort-profile-") as profile_dir:
        session = ort.InferenceSession(
            str(path),
            _session_options(settings, profile_dir),
            providers=_providers(settings, provider),
        )
        placement = node_placement(session, sample, input_name)
    off_provider = {p: n for p, n in placement.items() if p != provider}
    if provider == CUDA and off_provider:
        raise ProviderUnavailable(
            f"the GPU model {path.name} placed {off_provider} node(s) off CUDAExecutionProvider "
            f"(placement: {placement}); refusing to report GPU inference that runs on the CPU"
        )
    actual = session.get_providers()[0]
    if actual != provider:
        raise ProviderUnavailable(f"onnxruntime created the session on {actual}, not {provider}")
    return session, placement


def _has_explainer(settings: WorkerSettings, manifest: Manifest) -> bool:
    return settings.explain and "explain" in manifest.files and manifest.base_value is not None


def _load_explainer(
    settings: WorkerSettings,
    provider: str,
    version_dir: Path,
    manifest: Manifest,
    sample: np.ndarray,
) -> Explainer | None:
    if not _has_explainer(settings, manifest) or manifest.base_value is None:
        return None
    path = verified_model_path(version_dir, manifest, "explain")
    session, placement = _checked_session(settings, provider, path, sample[:4], manifest.input_name)
    explainer = Explainer(
        session, manifest.input_name, manifest.base_value, manifest.feature_names, placement
    )
    explainer.explain(sample[:1])
    log.info("explanations from %s, placement %s", path, placement)
    return explainer


def load_model(settings: WorkerSettings) -> LoadedModel:
    """Verify, load, check placement and warm up the configured model (and its explainer)
    for this process."""
    provider = check_provider(settings)
    version_dir, manifest = load_manifest(
        settings.model_dir, settings.model_name, settings.model_version
    )
    return _load(settings, provider, version_dir, manifest)


def load_version(
    settings: WorkerSettings, version_dir: Path, manifest: Manifest, *, explain_now: bool = True
) -> LoadedModel:
    """load_model for a version directory other than the configured one (worker.serving):
    the same checks, and its own explainer, loaded now or (explain_now=False) on the first
    explain job."""
    return _load(settings, check_provider(settings), version_dir, manifest, explain_now)


def _attach_explainer(
    model: LoadedModel,
    settings: WorkerSettings,
    version_dir: Path,
    refusable: tuple[type[Exception], ...] = (ProviderUnavailable, ModelArtifactError),
) -> None:
    """Load the model's explainer, or record why it is refused: explain jobs then fail with
    that reason while predictions go on (what a GPU worker is for: explanations that would
    run on the CPU under a GPU label are refused)."""
    sample = np.random.default_rng(0).standard_normal((4, model.n_features)).astype(np.float32)
    try:
        model.explainer = _load_explainer(
            settings, model.provider, version_dir, model.manifest, sample
        )
    except refusable as exc:
        log.error("serving %s without explanations: %s", model.manifest.version, exc)
        model.explain_refused = f"explanations are off on this worker: {exc}"


def _load(
    settings: WorkerSettings,
    provider: str,
    version_dir: Path,
    manifest: Manifest,
    explain_now: bool = True,
) -> LoadedModel:
    began = time.perf_counter()
    variant: Variant = "gpu" if provider == CUDA else "cpu"
    path = verified_model_path(version_dir, manifest, variant)
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((64, manifest.n_features)).astype(np.float32)
    session, placement = _checked_session(settings, provider, path, sample, manifest.input_name)
    device = f"cuda:{settings.cuda_device_id}" if provider == CUDA else "cpu"
    model = LoadedModel(manifest, session, provider, device, variant, placement)
    model.manifest_sha256 = sha256_of(version_dir / MANIFEST_FILE)
    if explain_now:
        # At start a tampered explain.onnx stops the process, as a tampered model does.
        _attach_explainer(model, settings, version_dir, refusable=(ProviderUnavailable,))
    elif _has_explainer(settings, manifest):
        model.explain_from = (settings, version_dir)
    loaded = time.perf_counter()
    model.load_s = loaded - began

    for i in range(settings.warmup_runs):
        model.predict(sample[: 1 if i % 2 else len(sample)])
    model.warmup_s = time.perf_counter() - loaded
    if settings.provider == "cuda" and provider == CPU:
        model.device = "cpu (fallback: no CUDA)"
    log.info(
        "model %s/%s (%s) loaded from %s on %s, %d intra-op thread(s), placement %s "
        "(load %.3fs, warm-up %.3fs)",
        manifest.name,
        manifest.version,
        variant,
        path,
        model.device,
        settings.intra_op_threads,
        placement,
        model.load_s,
        model.warmup_s,
    )
    return model
