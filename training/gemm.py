"""The fitted pipeline as a graph of standard ONNX tensor ops (the "gpu" variant).

onnxruntime's CUDA execution provider has no kernels for the ai.onnx.ml ops
(Scaler, TreeEnsembleRegressor) that skl2onnx emits, so on a GPU those nodes
would fall back to the CPU. This module compiles the same forest with the
tree-traversal (TT) strategy of Hummingbird (Nakandala et al., OSDI'20): all
trees' nodes are flattened into global arrays, every (row, tree) pair holds a
current node index, and one unrolled step per tree level moves all of them down
at once with Gather / GatherElements / LessOrEqual / Where. Leaves point to
themselves, so trees shallower than the deepest one simply stay put.

hummingbird-ml itself is not used: it needs torch (a multi-GB CUDA build) and pins
onnx<=1.16.1, and its ONNX extra pins skl2onnx<=1.16 and onnxruntime<1.18, all
below this project's versions. The graph is built with onnx.helper instead.

Each op and type used here has a CUDAExecutionProvider kernel in onnxruntime's
docs/OperatorKernels.md: Cast, Sub/Div (double), Gather (float, double, int32
data; int32 indices), GatherElements (float; int32 indices), LessOrEqual
(float, opset 16+), Where (int32), ReduceMean (double, opset 18 axes input).

Bit-exactness with scikit-learn, which the published check relies on:
- scaling runs in float64 like StandardScaler on float64 input, then is cast to
  float32 like the trees' own input cast;
- scikit-learn compares float32 x <= float64 threshold t. For float32 x that is
  the same as x <= the largest float32 not above t, so thresholds are stored as
  float32 rounded down (skl2onnx does the same) and the comparison runs in float32;
- leaf values stay float64 and are averaged in float64, then cast to float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper
from sklearn.ensemble import RandomForestRegressor
from sklearn.pipeline import Pipeline

from training.export import (
    INPUT_NAME,
    OPSET,
    OUTPUT_NAME,
    SCALED_NAME,
    pipeline_steps,
    scaler_nodes,
)


@dataclass(frozen=True)
class FlatForest:
    """All trees' nodes in global arrays; node ids are offsets into them."""

    roots: NDArray[np.int32]
    feature: NDArray[np.int32]
    threshold: NDArray[np.float32]
    left: NDArray[np.int32]
    right: NDArray[np.int32]
    value: NDArray[np.float64]
    depth: int
    """Depth of the deepest tree: the number of traversal steps."""

    @property
    def n_nodes(self) -> int:
        return int(self.feature.size)


def flatten_forest(forest: RandomForestRegressor) -> FlatForest:
    if getattr(forest, "n_outputs_", 1) != 1:
        raise ValueError("only single-output forests can be compiled to tensor ops")
    roots, features, thresholds, lefts, rights, values = [], [], [], [], [], []
    offset = 0
    depth = 0
    for estimator in forest.estimators_:
        tree = estimator.tree_
        n = int(tree.node_count)
        ids = np.arange(n, dtype=np.int64)
        is_leaf = tree.children_left < 0
        roots.append(offset)
        features.append(np.where(is_leaf, 0, tree.feature))
        thresholds.append(np.where(is_leaf, np.float32(0), _round_down_to_float32(tree.threshold)))
        lefts.append(np.where(is_leaf, ids, tree.children_left) + offset)
        rights.append(np.where(is_leaf, ids, tree.children_right) + offset)
        values.append(tree.value.reshape(n, -1)[:, 0])
        depth = max(depth, int(tree.max_depth))
        offset += n
    if offset >= np.iinfo(np.int32).max:
        raise ValueError(f"forest has {offset} nodes, too many for int32 node ids")
    return FlatForest(
        roots=np.asarray(roots, dtype=np.int32),
        feature=np.concatenate(features).astype(np.int32),
        threshold=np.concatenate(thresholds).astype(np.float32),
        left=np.concatenate(lefts).astype(np.int32),
        right=np.concatenate(rights).astype(np.int32),
        value=np.concatenate(values).astype(np.float64),
        depth=depth,
    )


def build_gemm_model(pipeline: Pipeline, n_features: int) -> onnx.ModelProto:
    scaler, forest = pipeline_steps(pipeline)
    flat = flatten_forest(forest)
    if int(flat.feature.max(initial=0)) >= n_features:
        raise ValueError("forest uses a feature index beyond n_features")

    g = _GraphBuilder()
    # SCALED_NAME: [N, F] float32, the values scikit-learn's trees compare.
    g.nodes, g.initializers = scaler_nodes(scaler, n_features)
    for name in ("feature", "threshold", "left", "right", "value"):
        g.const(name, getattr(flat, name))
    g.const("reduce_axes", np.array([1], dtype=np.int64))

    # Level 0: every row starts at the same root of each tree, so the root arrays
    # are constants and a plain Gather along the feature axis yields [N, T].
    roots = flat.roots
    g.const("root_feature", flat.feature[roots])
    g.const("root_threshold", flat.threshold[roots])
    g.const("root_left", flat.left[roots])
    g.const("root_right", flat.right[roots])
    g.node("Gather", [SCALED_NAME, "root_feature"], "x_0", axis=1)
    g.node("LessOrEqual", ["x_0", "root_threshold"], "go_left_0")
    g.node("Where", ["go_left_0", "root_left", "root_right"], "node_1")

    # A one-leaf forest has depth 0: the single level above already keeps it in place.
    for level in range(1, max(flat.depth, 1)):
        node = f"node_{level}"
        g.node("Gather", ["feature", node], f"feat_{level}", axis=0)
        g.node("GatherElements", [SCALED_NAME, f"feat_{level}"], f"x_{level}", axis=1)
        g.node("Gather", ["threshold", node], f"thr_{level}", axis=0)
        g.node("LessOrEqual", [f"x_{level}", f"thr_{level}"], f"go_left_{level}")
        g.node("Gather", ["left", node], f"left_{level}", axis=0)
        g.node("Gather", ["right", node], f"right_{level}", axis=0)
        g.node(
            "Where", [f"go_left_{level}", f"left_{level}", f"right_{level}"], f"node_{level + 1}"
        )

    leaf = f"node_{max(flat.depth, 1)}"
    g.node("Gather", ["value", leaf], "leaf_values", axis=0)  # [N, T] float64
    g.node("ReduceMean", ["leaf_values", "reduce_axes"], "mean64", keepdims=1)
    g.node("Cast", ["mean64"], OUTPUT_NAME, to=TensorProto.FLOAT)

    graph = helper.make_graph(
        g.nodes,
        "forest_tree_traversal",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [None, n_features])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [None, 1])],
        initializer=g.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="training.gemm",
        doc_string=(
            f"StandardScaler + RandomForestRegressor ({len(roots)} trees, {flat.n_nodes} nodes, "
            f"depth {flat.depth}) as tree traversal in standard ONNX ops"
        ),
    )
    # IR version 8 keeps the file loadable by onnxruntime 1.18 and later.
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _round_down_to_float32(threshold: NDArray[np.float64]) -> NDArray[np.float32]:
    """The largest float32 <= t, elementwise: float32 x <= t  <=>  x <= result."""
    t32 = threshold.astype(np.float32)
    above = t32.astype(np.float64) > threshold
    t32[above] = np.nextafter(t32[above], np.float32(-np.inf))
    return t32


class _GraphBuilder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def const(self, name: str, array: NDArray[np.generic]) -> None:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))

    def node(self, op: str, inputs: list[str], output: str, **attrs: int) -> None:
        node = helper.make_node(op, inputs, [output], name=output)
        node.attribute.extend(helper.make_attribute(key, value) for key, value in attrs.items())
        self.nodes.append(node)
