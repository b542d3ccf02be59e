"""A run that fails its checks, or crashes while publishing, leaves the published model alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from contract.errors import ConversionMismatch, TrainingError
from training import export, gemm, publish
from training.artifact import CURRENT_FILE, ModelFile, load_manifest
from training.train import TrainConfig, run_training


def snapshot(model_dir: Path, name: str) -> tuple[str, list[str]]:
    """CURRENT's text and every entry under models/<name>/."""
    parent = model_dir / name
    return (parent / CURRENT_FILE).read_text(), sorted(p.name for p in parent.iterdir())


@pytest.fixture
def published(small_config: TrainConfig) -> TrainConfig:
    """small_config with one version already published."""
    run_training(small_config.model_copy(update={"gpu_model": False}))
    return small_config


def test_tolerance_breach_raises_and_publishes_nothing(published: TrainConfig, monkeypatch) -> None:
    before = snapshot(published.model_dir, published.name)
    monkeypatch.setattr(export, "MAX_ABS_DIFF", -1.0)
    with pytest.raises(ConversionMismatch, match=r"cpu ONNX model disagrees .* tolerance -1"):
        run_training(published)
    assert snapshot(published.model_dir, published.name) == before


def test_corrupted_gpu_graph_is_caught(published: TrainConfig, monkeypatch) -> None:
    real_build = gemm.build_gemm_model

    def off_by_a_bit(*args, **kwargs) -> onnx.ModelProto:
        model = real_build(*args, **kwargs)
        for i, init in enumerate(model.graph.initializer):
            if init.name == "value":
                values = numpy_helper.to_array(init) + 1e-3
                model.graph.initializer[i].CopyFrom(numpy_helper.from_array(values, "value"))
        return model

    before = snapshot(published.model_dir, published.name)
    monkeypatch.setattr(gemm, "build_gemm_model", off_by_a_bit)
    with pytest.raises(
        ConversionMismatch, match=r"gpu ONNX model disagrees .* max \|diff\| = 0.001"
    ):
        run_training(published)
    assert snapshot(published.model_dir, published.name) == before


def test_check_rejects_nan_predictions(published: TrainConfig, monkeypatch) -> None:
    def nan_predict(session, X) -> np.ndarray:
        return np.full((len(X), 1), np.nan, dtype=np.float32)

    monkeypatch.setattr(export, "onnx_predict", nan_predict)
    with pytest.raises(ConversionMismatch):
        run_training(published)


def test_crash_while_writing_leaves_no_partial_version(published: TrainConfig, monkeypatch) -> None:
    before = snapshot(published.model_dir, published.name)
    real_write = publish._write_durably

    def crash_on_manifest(path: Path, data: bytes) -> None:
        if path.name == "manifest.json":
            raise OSError("disk full")
        real_write(path, data)

    monkeypatch.setattr(publish, "_write_durably", crash_on_manifest)
    with pytest.raises(OSError, match="disk full"):
        run_training(published)
    assert snapshot(published.model_dir, published.name) == before


def test_new_version_moves_current(published: TrainConfig) -> None:
    first = (published.model_dir / published.name / CURRENT_FILE).read_text().strip()
    outcome = run_training(published.model_copy(update={"seed": 1}))
    assert outcome.manifest.version != first
    version_dir, manifest = load_manifest(published.model_dir, published.name)
    assert manifest.version == outcome.manifest.version and version_dir == outcome.version_dir
    assert (published.model_dir / published.name / first).is_dir()  # old versions stay


def fake_file(data: bytes = b"not really onnx") -> publish.PendingFile:
    return publish.PendingFile("cpu", "model.onnx", data, {}, "")


def fake_manifest(version: str, created_at: str, files: dict[str, ModelFile]):
    from training.artifact import Manifest

    return Manifest(
        name="m",
        version=version,
        created_at=created_at,
        feature_names=["x0"],
        n_features=1,
        target="y",
        input_name="features",
        output_name="prediction",
        files=files,
        metrics={},
        library_versions={},
        params={},
    )


def test_same_model_twice_in_one_second_gets_two_versions(tmp_path: Path) -> None:
    first, _ = publish.publish(tmp_path, "m", [fake_file()], fake_manifest)
    second, manifest = publish.publish(tmp_path, "m", [fake_file()], fake_manifest)
    assert first != second and first.is_dir() and second.is_dir()
    assert first.name[-6:] == second.name[-6:]  # same content hash, different second
    assert (tmp_path / "m" / CURRENT_FILE).read_text().strip() == manifest.version


def test_publish_needs_a_cpu_file(tmp_path: Path) -> None:
    gpu_only = publish.PendingFile("gpu", "model_gemm.onnx", b"x", {}, "")
    with pytest.raises(TrainingError, match="'cpu'"):
        publish.publish(tmp_path, "m", [gpu_only], fake_manifest)
