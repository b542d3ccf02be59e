"""The fitted pipeline as ONNX for onnxruntime's CPU provider (the "cpu" variant: the
forest converted by skl2onnx), and the check that any exported graph reproduces
scikit-learn's predictions before it may be published."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper
from sklearn.ensemble import RandomForestRegressor
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from contract.errors import ConversionMismatch

# Part of the artifact contract (recorded in the manifest): workers feed
# INPUT_NAME as float32 [batch, n_features] and read OUTPUT_NAME as float32 [batch, 1].
INPUT_NAME = "features"
OUTPUT_NAME = "prediction"

# Opsets every onnxruntime allowed by pyproject (>= 1.18, CPU and CUDA builds) can load.
# ai.onnx.ml 3 keeps the classic TreeEnsembleRegressor; 5 would switch to TreeEnsemble.
OPSET = 18
ML_OPSET = 3

MAX_ABS_DIFF = 1e-4
"""Largest |ONNX - scikit-learn| accepted on the held-out rows, in target units."""


SCALED_NAME = "scaled"
"""The scaler's float32 output, the trees' input, inside both graphs."""


def scaler_nodes(
    scaler: StandardScaler, n_features: int
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """INPUT_NAME -> SCALED_NAME exactly as scikit-learn computes it on float64 input.

    StandardScaler computes (x - mean) / scale in float64 and the trees cast the
    result to float32. skl2onnx cannot be used for this step: its Scaler op works
    in float32 ((x - mean) * (1/scale)), and its "div_cast" option still rounds the
    mean to float32. A scaled value one ulp off can fall on the other side of a
    split threshold and move a whole leaf (seen in tests: 0.7 off on such rows).
    """
    mean = scaler.mean_ if scaler.with_mean else np.zeros(n_features)
    scale = scaler.scale_ if scaler.with_std else np.ones(n_features)
    initializers = [
        numpy_helper.from_array(np.asarray(mean, dtype=np.float64), "scaler_mean"),
        numpy_helper.from_array(np.asarray(scale, dtype=np.float64), "scaler_scale"),
    ]
    nodes = [
        helper.make_node(
            "Cast", [INPUT_NAME], ["scaler_x64"], name="scaler_to_double", to=TensorProto.DOUBLE
        ),
        helper.make_node(
            "Sub", ["scaler_x64", "scaler_mean"], ["scaler_centered"], name="scaler_sub"
        ),
        helper.make_node(
            "Div", ["scaler_centered", "scaler_scale"], ["scaler_scaled64"], name="scaler_div"
        ),
        helper.make_node(
            "Cast", ["scaler_scaled64"], [SCALED_NAME], name="scaler_to_float", to=TensorProto.FLOAT
        ),
    ]
    return nodes, initializers


def pipeline_steps(pipeline: Pipeline) -> tuple[StandardScaler, RandomForestRegressor]:
    scaler = pipeline.named_steps.get("scaler")
    forest = pipeline.named_steps.get("forest")
    if not isinstance(scaler, StandardScaler) or not isinstance(forest, RandomForestRegressor):
        raise TypeError(
            "expected Pipeline([('scaler', StandardScaler()), ('forest', RandomForestRegressor())])"
        )
    return scaler, forest


def to_cpu_onnx(pipeline: Pipeline, n_features: int) -> onnx.ModelProto:
    """The scaler (see scaler_nodes) followed by skl2onnx's conversion of the forest."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    scaler, forest = pipeline_steps(pipeline)
    model = convert_sklearn(
        forest,
        initial_types=[(SCALED_NAME, FloatTensorType([None, n_features]))],
        final_types=[(OUTPUT_NAME, FloatTensorType([None, 1]))],
        target_opset={"": OPSET, "ai.onnx.ml": ML_OPSET},
    )
    nodes, initializers = scaler_nodes(scaler, n_features)
    graph = model.graph
    (graph_input,) = graph.input
    graph_input.name = INPUT_NAME
    forest_nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + forest_nodes)
    graph.initializer.extend(initializers)
    if not any(imp.domain in ("", "ai.onnx") for imp in model.opset_import):
        model.opset_import.append(helper.make_opsetid("", OPSET))
    model.doc_string = "StandardScaler (float64) + RandomForestRegressor converted by skl2onnx"
    _drop_default_tree_attributes(model)
    onnx.checker.check_model(model)
    return model


def _drop_default_tree_attributes(model: onnx.ModelProto) -> None:
    """Remove per-node tree attributes that only restate the operator's defaults.

    skl2onnx writes nodes_hitrates (all 1.0, unused by onnxruntime) and
    nodes_missing_value_tracks_true (all 0 for data without NaN) for every node:
    ~7 of ~39 bytes per node, ~18% of model.onnx. Both are optional in the
    TreeEnsembleRegressor spec with exactly these defaults, and the published
    check against scikit-learn runs on the stripped graph.
    """
    for node in model.graph.node:
        if node.op_type != "TreeEnsembleRegressor":
            continue
        kept = [
            attr
            for attr in node.attribute
            if not (attr.name == "nodes_hitrates" and all(v == 1.0 for v in attr.floats))
            and not (attr.name == "nodes_missing_value_tracks_true" and not any(attr.ints))
        ]
        del node.attribute[:]
        node.attribute.extend(kept)


def opsets_of(model: onnx.ModelProto) -> dict[str, int]:
    return {imp.domain or "ai.onnx": int(imp.version) for imp in model.opset_import}


def cpu_session(model: onnx.ModelProto | bytes, threads: int = 1) -> Any:
    """An onnxruntime CPU session; `threads=0` lets onnxruntime use every core."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def onnx_predict(session: Any, X: NDArray[np.floating]) -> NDArray[np.float32]:
    (out,) = session.run([OUTPUT_NAME], {INPUT_NAME: np.asarray(X, dtype=np.float32)})
    return np.asarray(out, dtype=np.float32)


def check_against_sklearn(
    label: str, model: onnx.ModelProto, pipeline: Pipeline, X: NDArray[np.float64]
) -> float:
    """Max |ONNX - scikit-learn| over the rows X; raises ConversionMismatch above MAX_ABS_DIFF.

    X must hold float32-representable values (see training.data), so that ONNX's
    float32 input and scikit-learn's float64 input describe the same rows.
    """
    expected = np.asarray(pipeline.predict(X), dtype=np.float64)
    got = onnx_predict(cpu_session(model), X)
    if got.shape != (len(X), 1):
        raise ConversionMismatch(
            f"{label} ONNX model returned shape {got.shape}, expected ({len(X)}, 1)"
        )
    diff = np.abs(got[:, 0].astype(np.float64) - expected)
    worst = float(diff.max()) if diff.size else 0.0
    if not worst <= MAX_ABS_DIFF:  # also catches NaN
        bad = int((~(diff <= MAX_ABS_DIFF)).sum())
        raise ConversionMismatch(
            f"{label} ONNX model disagrees with scikit-learn on {bad} of {len(X)} held-out rows: "
            f"max |diff| = {worst:.3g} > tolerance {MAX_ABS_DIFF:g}; nothing was published"
        )
    return worst
