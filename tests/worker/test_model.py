"""Loading the ONNX session in-process: integrity, provider, placement, predictions."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from contract.errors import ModelArtifactError, ProviderUnavailable
from tests.support import TrainedModel
from worker.model import CPU, check_provider, load_model
from worker.settings import WorkerSettings


def settings_for(model_dir: Path, **kw: object) -> WorkerSettings:
    return WorkerSettings(model_dir=model_dir, warmup_runs=2, **kw)  # type: ignore[arg-type]


def test_loaded_model_predicts_like_the_file(trained_model: TrainedModel) -> None:
    model = load_model(settings_for(trained_model.model_dir))
    rows = trained_model.X_test[:100].astype(np.float32)
    np.testing.assert_allclose(model.predict(rows), trained_model.reference(rows), atol=1e-6)
    assert model.predict(rows[:1]).shape == (1,)
    assert (model.provider, model.device, model.variant) == (CPU, "cpu", "cpu")
    assert model.manifest.version == trained_model.manifest.version


def test_placement_counts_every_node_on_the_cpu(trained_model: TrainedModel) -> None:
    model = load_model(settings_for(trained_model.model_dir))
    assert set(model.placement) == {CPU}
    assert model.placement[CPU] >= 1


def test_explicit_version_and_missing_version(trained_model: TrainedModel) -> None:
    version = trained_model.manifest.version
    assert (
        load_model(settings_for(trained_model.model_dir, model_version=version)).manifest.version
        == version
    )
    with pytest.raises(ModelArtifactError, match="manifest not found"):
        load_model(settings_for(trained_model.model_dir, model_version="nope"))


def test_tampered_file_is_refused(trained_model: TrainedModel, tmp_path: Path) -> None:
    shutil.copytree(trained_model.model_dir, tmp_path / "m")
    model_file = (
        tmp_path / "m" / trained_model.manifest.name / trained_model.manifest.version / "model.onnx"
    )
    data = bytearray(model_file.read_bytes())
    data[100] ^= 0x01
    model_file.write_bytes(bytes(data))
    with pytest.raises(ModelArtifactError, match="does not match manifest"):
        load_model(settings_for(tmp_path / "m"))


def test_cuda_provider_check_without_a_gpu() -> None:
    with pytest.raises(ProviderUnavailable, match="INFERENCE_ALLOW_CPU_FALLBACK"):
        check_provider(WorkerSettings(provider="cuda"))
    assert check_provider(WorkerSettings(provider="cuda", allow_cpu_fallback=True)) == CPU
    assert check_provider(WorkerSettings(provider="cpu")) == CPU
