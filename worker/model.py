"""The ONNX inference session: loading, provider checks, warm-up and predict.

A LoadedModel is created inside the process that uses it (after fork), never at
import time: onnxruntime sessions and CUDA contexts do not survive fork.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from contract.errors import ProviderUnavailable
from training.artifact import Manifest, Variant, load_manifest, verified_model_path
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


def load_model(settings: WorkerSettings) -> LoadedModel:
    """Verify, load, check placement and warm up the model for this process."""
    provider = check_provider(settings)
    manifest, path, variant = resolve_artifact(settings, provider)
    return load_path(settings, provider, manifest, path, variant)


def load_version(settings: WorkerSettings, version_dir: Path, manifest: Manifest) -> LoadedModel:
    """load_model for a version directory other than the configured one (worker.serving)."""
    provider = check_provider(settings)
    variant: Variant = "gpu" if provider == CUDA else "cpu"
    path = verified_model_path(version_dir, manifest, variant)
    return load_path(settings, provider, manifest, path, variant)


def load_path(
    settings: WorkerSettings, provider: str, manifest: Manifest, path: Path, variant: Variant
) -> LoadedModel:
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((64, manifest.n_features)).astype(np.float32)

    with tempfile.TemporaryDirectory(prefix="ort-profile-") as profile_dir:
        probe = ort.InferenceSession(
            str(path),
            _session_options(settings, profile_dir),
            providers=_providers(settings, provider),
        )
        placement = node_placement(probe, sample, manifest.input_name)
        del probe
    off_provider = {p: n for p, n in placement.items() if p != provider}
    if provider == CUDA and off_provider:
        raise ProviderUnavailable(
            f"the GPU model {path.name} placed {off_provider} node(s) off CUDAExecutionProvider "
            f"(placement: {placement}); refusing to report GPU inference that runs on the CPU"
        )

    session = ort.InferenceSession(
        str(path), _session_options(settings), providers=_providers(settings, provider)
    )
    actual = session.get_providers()[0]
    if actual != provider:
        raise ProviderUnavailable(f"onnxruntime created the session on {actual}, not {provider}")
    device = f"cuda:{settings.cuda_device_id}" if provider == CUDA else "cpu"
    model = LoadedModel(manifest, session, provider, device, variant, placement)

    for i in range(settings.warmup_runs):
        model.predict(sample[: 1 if i % 2 else len(sample)])
    if settings.provider == "cuda" and provider == CPU:
        model.device = "cpu (fallback: no CUDA)"
    log.info(
        "model %s/%s (%s) loaded from %s on %s, %d intra-op thread(s), placement %s",
        manifest.name,
        manifest.version,
        variant,
        path,
        model.device,
        settings.intra_op_threads,
        placement,
    )
    return model
