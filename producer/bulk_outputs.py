"""What a bulk scoring run appends to each row: the prediction, or with `--explain` the
prediction, one SHAP contribution per feature (shap_<feature>) and the base value
(shap_base). Each row's values travel as float32, in the journal and to the output."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from contract.errors import ExplainUnavailable, InvalidInput
from contract.names import TASK_EXPLAIN, TASK_PREDICT_BATCH
from contract.schemas import ExplainResult, ModelInfo, decode_f32
from producer.csv_chunks import PREDICTION_COLUMN

SHAP_PREFIX = "shap_"
SHAP_BASE_COLUMN = "shap_base"

EXPLAIN_CHUNK_ROWS = 2_000
"""Most rows in one explain chunk: explaining costs ~1 ms a row on one core, so a chunk of
the default 20,000 rows would hold a worker process, and the progress, for tens of seconds."""


@dataclass(frozen=True)
class Outputs:
    task: str
    columns: list[str]
    """Appended to the header, in order."""

    @property
    def width(self) -> int:
        return len(self.columns)

    @property
    def explain(self) -> bool:
        return self.task == TASK_EXPLAIN

    @classmethod
    def choose(cls, explain: bool, info: ModelInfo | None) -> Outputs:
        if not explain:
            return cls(TASK_PREDICT_BATCH, [PREDICTION_COLUMN])
        if info is None:
            raise ExplainUnavailable(
                "no worker of this queue has published its model: --explain names its "
                "columns after the model's features"
            )
        if info.base_value is None:
            raise ExplainUnavailable(
                f"the workers serving model {info.name}/{info.version} do not explain "
                "(no explain.onnx, or INFERENCE_EXPLAIN=false)"
            )
        shap = [f"{SHAP_PREFIX}{name}" for name in info.feature_names]
        return cls(TASK_EXPLAIN, [PREDICTION_COLUMN, *shap, SHAP_BASE_COLUMN])

    def values(self, result: dict[str, Any], rows: int) -> NDArray[np.float32]:
        """A chunk's result as float32 [rows, width]; InvalidInput when it does not fit."""
        if self.explain:
            explained = ExplainResult.model_validate(result)
            values = np.empty((explained.rows, self.width), dtype=np.float32)
            values[:, 0] = explained.predictions
            values[:, 1:-1] = np.asarray(explained.contributions).reshape(explained.rows, -1)
            values[:, -1] = explained.base_value
        elif result.get("predictions_f32") is not None:
            values = decode_f32(result["predictions_f32"], name="predictions_f32")
        else:
            # A worker that predates rows_f32 answers float32 values as JSON numbers.
            values = np.asarray(result["predictions"], dtype=np.float32)
        values = values.reshape(-1, self.width)
        if len(values) != rows:
            raise InvalidInput(f"{len(values)} rows back for {rows} sent")
        return values
