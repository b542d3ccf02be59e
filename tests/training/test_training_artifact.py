"""The published artifact: layout, manifest, CURRENT, and integrity checks on load."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import onnx
import pytest

from contract.errors import ModelArtifactError
from training.artifact import (
    CURRENT_FILE,
    MANIFEST_FILE,
    current_version,
    load_manifest,
    sha256_of,
    verified_model_path,
)
from training.train import TrainOutcome

VERSION = re.compile(r"^(\d{8}-\d{6})-([0-9a-f]{6})$")


def test_layout_and_current(trained: TrainOutcome) -> None:
    version_dir = trained.version_dir
    model_dir = version_dir.parent.parent
    name_dir = model_dir / trained.manifest.name
    assert version_dir.parent == name_dir
    assert sorted(p.name for p in version_dir.iterdir()) == [
        "explain.onnx",
        MANIFEST_FILE,
        "model.onnx",
        "model_gemm.onnx",
    ]
    # Nothing but the version and CURRENT: no staging directory left behind.
    assert sorted(p.name for p in name_dir.iterdir()) == sorted([version_dir.name, CURRENT_FILE])
    assert current_version(model_dir, trained.manifest.name) == version_dir.name


def test_version_name_and_timestamp(trained: TrainOutcome) -> None:
    manifest = trained.manifest
    match = VERSION.match(manifest.version)
    assert match, manifest.version
    assert match.group(2) == manifest.files["cpu"].sha256[:6]
    created = datetime.fromisoformat(manifest.created_at)
    offset = created.utcoffset()
    assert offset is not None and offset.total_seconds() == 0
    assert created.astimezone(UTC).strftime("%Y%m%d-%H%M%S") == match.group(1)


def test_manifest_fields(trained: TrainOutcome) -> None:
    version_dir, manifest = load_manifest(trained.version_dir.parent.parent, trained.manifest.name)
    assert version_dir == trained.version_dir
    assert manifest == trained.manifest
    assert manifest.feature_names == ["x0", "x1", "x2", "x3", "x4"]
    assert manifest.n_features == 5
    assert manifest.target == "y"
    assert (manifest.input_name, manifest.output_name) == ("features", "prediction")
    assert set(manifest.files) == {"cpu", "gpu", "explain"}
    assert manifest.files["cpu"].path == "model.onnx"
    assert manifest.files["gpu"].path == "model_gemm.onnx"
    assert manifest.files["cpu"].opset.get("ai.onnx.ml", 0) >= 1
    assert set(manifest.files["gpu"].opset) == {"ai.onnx"}
    assert set(manifest.library_versions) == {
        "scikit-learn",
        "skl2onnx",
        "onnx",
        "onnxruntime",
        "numpy",
        "python",
    }
    metrics = manifest.metrics
    assert 0.5 < metrics["r2"] <= 1.0
    assert metrics["mae"] > 0
    assert 0 <= metrics["max_abs_diff_cpu"] <= 1e-4
    assert 0 <= metrics["max_abs_diff_gpu"] <= 1e-4
    params = manifest.params
    assert params["n_estimators"] == 10
    assert params["n_train"] + params["n_test"] == 1500
    assert params["n_test"] == len(trained.y_test) == len(trained.X_test)
    assert params["max_depth"] == trained.pipeline.named_steps["forest"].max_depth


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_files_match_manifest(trained: TrainOutcome, variant: str) -> None:
    entry = trained.manifest.files[variant]
    path = verified_model_path(trained.version_dir, trained.manifest, variant)  # type: ignore[arg-type]
    assert path == trained.version_dir / entry.path
    assert sha256_of(path) == entry.sha256
    assert path.stat().st_size == entry.size_bytes
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert {imp.domain or "ai.onnx": imp.version for imp in model.opset_import} == entry.opset
    (inp,) = model.graph.input
    (out,) = model.graph.output
    assert inp.name == "features" and out.name == "prediction"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    in_dims = inp.type.tensor_type.shape.dim
    assert len(in_dims) == 2 and not in_dims[0].HasField("dim_value")
    assert in_dims[1].dim_value == 5
    assert [d.dim_value for d in out.type.tensor_type.shape.dim][1:] == [1]


@pytest.fixture
def copied(trained: TrainOutcome, tmp_path: Path) -> Path:
    """A private copy of the published model directory, safe to damage."""
    source = trained.version_dir.parent.parent
    shutil.copytree(source, tmp_path / "models")
    return tmp_path / "models"


@pytest.mark.parametrize("variant", ["cpu", "gpu", "explain"])
def test_flipped_byte_is_refused(copied: Path, trained: TrainOutcome, variant: str) -> None:
    version_dir, manifest = load_manifest(copied, trained.manifest.name)
    path = version_dir / manifest.files[variant].path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ModelArtifactError, match="sha256"):
        verified_model_path(version_dir, manifest, variant)  # type: ignore[arg-type]


def test_truncated_file_is_refused(copied: Path, trained: TrainOutcome) -> None:
    version_dir, manifest = load_manifest(copied, trained.manifest.name)
    path = version_dir / manifest.files["cpu"].path
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ModelArtifactError, match="truncated"):
        verified_model_path(version_dir, manifest, "cpu")


def test_missing_file_is_refused(copied: Path, trained: TrainOutcome) -> None:
    version_dir, manifest = load_manifest(copied, trained.manifest.name)
    (version_dir / manifest.files["gpu"].path).unlink()
    with pytest.raises(ModelArtifactError, match="missing"):
        verified_model_path(version_dir, manifest, "gpu")


def test_truncated_or_missing_manifest_is_refused(copied: Path, trained: TrainOutcome) -> None:
    name = trained.manifest.name
    manifest_path = copied / name / trained.manifest.version / MANIFEST_FILE
    manifest_path.write_bytes(manifest_path.read_bytes()[:-20])
    with pytest.raises(ModelArtifactError, match="invalid"):
        load_manifest(copied, name)
    manifest_path.unlink()
    with pytest.raises(ModelArtifactError, match="not found"):
        load_manifest(copied, name)


def test_missing_current_is_refused(copied: Path, trained: TrainOutcome) -> None:
    (copied / trained.manifest.name / CURRENT_FILE).unlink()
    with pytest.raises(ModelArtifactError, match="python -m training"):
        load_manifest(copied, trained.manifest.name)


def test_artifact_module_needs_no_training_dependencies() -> None:
    """Workers import training.artifact without scikit-learn, skl2onnx or onnx installed."""
    code = (
        "import sys, training.artifact\n"
        # numpy is a base dependency (the contract's float32 encoding); these are not.
        "loaded = {'sklearn', 'skl2onnx', 'onnx', 'onnxruntime'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
