"""What a training run is told: the CLI's options as a validated model.

Kept free of scikit-learn and onnx imports so that `python -m training --help` and
argument errors answer without loading them.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Chosen from `python -m training --tradeoff` on the default data (seeds 0, 1, 2):
# depth alone cannot reach both goals (depth 10: 3.0 MB but test R2 0.031 below the
# fully grown forest; depth 12: 0.012 below at 8.1 MB). Depth 14 with leaves of at
# least 5 rows gives model.onnx ~4.5 MB (fully grown: ~33 MB) at R2 0.0067-0.0077
# below, and keeps the GPU graph at 14 traversal steps instead of ~35.
DEFAULT_MAX_DEPTH: int | None = 14
DEFAULT_MIN_SAMPLES_LEAF = 5

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class TrainConfig(BaseModel):
    """Everything `python -m training` can be told; the defaults are the CLI's."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_dir: Path = Path("models")
    name: str = "friedman1"
    n_samples: int = Field(default=20_000, ge=10)
    """Rows of make_friedman1 (ignored with `csv`)."""
    seed: int = 0
    test_size: float = Field(default=0.2, gt=0.0, lt=1.0)
    csv: Path | None = None
    target: str | None = None
    n_estimators: int = Field(default=50, ge=1)
    max_depth: int | None = Field(default=DEFAULT_MAX_DEPTH, ge=1)
    """None grows the trees until their leaves are pure (unpruned)."""
    min_samples_leaf: int = Field(default=DEFAULT_MIN_SAMPLES_LEAF, ge=1)
    gpu_model: bool = True
    """Also build, check and publish model_gemm.onnx."""
    explain_model: bool = True
    """Also build, check and publish explain.onnx (SHAP contributions) and the importances."""
    permutation_repeats: int = Field(default=5, ge=1)
    """Shuffles of each feature for the permutation importance."""
    n_jobs: int = -1
    """Cores scikit-learn uses to fit; -1 means all."""

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if not _NAME.match(self.name):
            raise ValueError(f"model name {self.name!r} must match {_NAME.pattern}")
        if (self.csv is None) != (self.target is None):
            raise ValueError("csv and target go together: give both or neither")
        return self
