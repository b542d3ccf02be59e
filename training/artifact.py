"""The model artifact: layout on disk, manifest schema, and integrity checks.

    <model_dir>/<name>/<version>/model.onnx        ai.onnx.ml graph (CPU)
    <model_dir>/<name>/<version>/model_gemm.onnx   same forest in standard tensor ops (GPU)
    <model_dir>/<name>/<version>/explain.onnx      exact TreeSHAP in standard tensor ops
    <model_dir>/<name>/<version>/manifest.json
    <model_dir>/<name>/CURRENT                     text: the version served by default

This module imports only the standard library and pydantic, so workers can use
it without the training dependencies.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from contract.errors import ModelArtifactError

MANIFEST_FILE = "manifest.json"
CURRENT_FILE = "CURRENT"
# Written beside the manifest by `python -m training` after publishing: what the model costs
# against scikit-learn, measured on the training machine. Not part of the artifact's checks.
BENCHMARK_FILE = "benchmark.json"
Variant = Literal["cpu", "gpu", "explain"]

# explain.onnx (training.explain) takes the manifest's input_name and returns
# CONTRIBUTIONS_NAME: float64 [batch, n_features], the base value not included.
CONTRIBUTIONS_NAME = "contributions"
EXPLAIN_BATCH_ROWS = 16
"""Rows per explain.onnx call: its intermediates take ~5 MB a row for the default model."""


class ModelFile(BaseModel):
    path: str
    """File name inside the version directory."""
    sha256: str
    size_bytes: int
    opset: dict[str, int] = Field(default_factory=dict)
    description: str = ""


class Manifest(BaseModel):
    name: str
    version: str
    created_at: str
    feature_names: list[str]
    n_features: int
    target: str
    input_name: str
    output_name: str
    files: dict[str, ModelFile]
    """Model files by variant: "cpu" (always), "gpu" (tensor-op graph) and "explain"
    (SHAP contributions, training.explain), when built."""
    metrics: dict[str, float]
    library_versions: dict[str, str]
    params: dict[str, Any]
    base_value: float | None = None
    """The explanation's base value (the forest's expected value over its training covers):
    prediction = base_value + sum of the contributions. None without an "explain" file."""
    importances: dict[str, dict[str, float]] = Field(default_factory=dict)
    """Per kind ("impurity", "permutation_r2_drop", "permutation_r2_drop_std",
    "mean_abs_shap"), a value per feature name."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def current_version(model_dir: Path, name: str) -> str:
    pointer = model_dir / name / CURRENT_FILE
    try:
        version = pointer.read_text().strip()
    except FileNotFoundError:
        raise ModelArtifactError(
            f"no model '{name}' under {model_dir}: {pointer} is missing "
            "(train one with `python -m training`)"
        ) from None
    if not version:
        raise ModelArtifactError(f"{pointer} is empty")
    return version


def load_manifest(model_dir: Path, name: str, version: str | None = None) -> tuple[Path, Manifest]:
    """The version directory and its manifest; `version=None` follows CURRENT."""
    version = version or current_version(model_dir, name)
    version_dir = model_dir / name / version
    path = version_dir / MANIFEST_FILE
    try:
        manifest = Manifest.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise ModelArtifactError(f"manifest not found: {path}") from None
    except ValueError as exc:
        raise ModelArtifactError(f"manifest {path} is invalid: {exc}") from None
    return version_dir, manifest


def verified_model_path(version_dir: Path, manifest: Manifest, variant: Variant) -> Path:
    """The model file of a variant, after checking its size and sha256 against the manifest."""
    entry = manifest.files.get(variant)
    if entry is None:
        raise ModelArtifactError(
            f"model {manifest.name}/{manifest.version} has no '{variant}' file "
            f"(it has: {', '.join(sorted(manifest.files))})"
        )
    path = version_dir / entry.path
    if not path.is_file():
        raise ModelArtifactError(f"model file missing: {path}")
    size = path.stat().st_size
    if size != entry.size_bytes:
        raise ModelArtifactError(
            f"model file {path} is {size} bytes, manifest says {entry.size_bytes}: "
            "truncated or replaced"
        )
    actual = sha256_of(path)
    if actual != entry.sha256:
        raise ModelArtifactError(
            f"model file {path} sha256 {actual[:12]}... does not match "
            f"manifest {entry.sha256[:12]}...: refusing to serve a tampered model"
        )
    return path


def write_current(model_dir: Path, name: str, version: str) -> None:
    """Point CURRENT at a version, atomically."""
    pointer = model_dir / name / CURRENT_FILE
    tmp = pointer.with_suffix(".tmp")
    tmp.write_text(version + "\n")
    tmp.replace(pointer)
