"""Fixtures of the training tests: one small model, trained and published once per session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from numpy.typing import NDArray

from training.train import TrainConfig, TrainOutcome, run_training


def small(model_dir: Path) -> TrainConfig:
    """The default configuration, small enough to train, convert and check in about a second."""
    return TrainConfig(model_dir=model_dir, n_samples=1500, n_estimators=10, n_jobs=1)


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainOutcome:
    """A published default-configuration model (fewer rows and trees). Do not modify its files."""
    model_dir = tmp_path_factory.mktemp("models")
    return run_training(small(model_dir))


@pytest.fixture
def small_config(tmp_path: Path) -> TrainConfig:
    return small(tmp_path / "models")


OrtPredict = Callable[[Path | bytes, NDArray[np.float64]], NDArray[np.float32]]


def _ort_predict(model: Path | bytes, X: NDArray[np.float64]) -> NDArray[np.float32]:
    data = model.read_bytes() if isinstance(model, Path) else model
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    (out,) = session.run(["prediction"], {"features": X.astype(np.float32)})
    assert out.shape == (len(X), 1)
    return np.asarray(out[:, 0])


@pytest.fixture(scope="session")
def ort_predict() -> OrtPredict:
    """Predictions of an ONNX model on onnxruntime's CPU provider, independent of training.export:
    feeds "features" as float32, reads "prediction" [N, 1], returns a flat float32 array."""
    return _ort_predict
