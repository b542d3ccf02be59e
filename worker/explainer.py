"""The explanation session (explain.onnx, see training.explain). worker.model loads it beside
the prediction model, on the same provider, with the same placement check."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from contract.errors import ExplainUnavailable
from training.artifact import CONTRIBUTIONS_NAME, EXPLAIN_BATCH_ROWS, Manifest
from worker.settings import WorkerSettings


@dataclass
class Explainer:
    session: ort.InferenceSession
    input_name: str
    base_value: float
    feature_names: list[str]
    placement: dict[str, int] = field(default_factory=dict)

    def explain(self, rows: np.ndarray) -> np.ndarray:
        """SHAP contributions, float64 [rows, features], for a float32 (rows, features)
        array; run EXPLAIN_BATCH_ROWS rows at a time, which bounds the graph's memory."""
        step = EXPLAIN_BATCH_ROWS
        parts = [
            self.session.run([CONTRIBUTIONS_NAME], {self.input_name: rows[i : i + step]})[0]
            for i in range(0, len(rows), step)
        ]
        if not parts:
            return np.zeros((0, len(self.feature_names)), dtype=np.float64)
        return np.concatenate(parts).astype(np.float64, copy=False)


def unavailable(
    manifest: Manifest, settings: WorkerSettings, reason: str | None = None
) -> ExplainUnavailable:
    if reason is not None:
        return ExplainUnavailable(reason)
    if not settings.explain:
        return ExplainUnavailable("this worker was started with INFERENCE_EXPLAIN=false")
    return ExplainUnavailable(
        f"model {manifest.name}/{manifest.version} has no explain.onnx "
        "(trained with --no-explain-model, or too wide to tabulate)"
    )
