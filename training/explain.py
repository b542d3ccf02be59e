"""Exact path-dependent TreeSHAP for the fitted forest, as a graph of standard ONNX ops.

The explanation (explain.onnx) is built from the scikit-learn forest at training time, so
workers explain with onnxruntime alone, on CPU or CUDA, and never need scikit-learn.

Path-dependent TreeSHAP of one tree is a sum over its root-to-leaf paths (the GPUTreeShap
formulation, Mitchell et al. 2022). Along a path, the splits on each distinct feature j merge
into one interval; its zero fraction z_j is the product of the cover ratios
cover(child) / cover(parent) of those splits, and its one fraction o_j(x) is 1 iff x lies in
the interval. The path with leaf value v adds to feature i

    v * (o_i - z_i) * sum over S subset of D \\ {i} of |S|! (d-|S|-1)! / d!
                      * prod_{j in S} o_j * prod_{j in D \\ {i} \\ S} z_j,

which depends on x only through the bit pattern o (2^d patterns for d distinct features).
Every path's contribution is therefore tabulated here, for every pattern, and the graph only
compares each row with each path's intervals, forms the pattern index and gathers the
tabulated values: no recursion, the same fixed work for every row.

Layout: one slot per model feature (a feature off the path has the interval (-inf, inf)
and z = 1, so its bit is always 1 and it adds nothing). The comparisons are then plain
broadcasts of each feature against a row of per-path bounds, with no per-path gather of
x; the price is a table of paths x 2^features x features float32 values (45 MB for the
default model: 70,344 paths, 5 features), so models with more than MAX_FEATURES features
or a table above MAX_TABLE_BYTES are published without explain.onnx. The lookup runs
paths outermost, so the rows of a batch read each path's 640-byte block while it is in
cache.

Details that keep it exact (same values as shap.TreeExplainer on the scikit-learn forest):
- covers are weighted_n_node_samples, as shap reads scikit-learn trees (bootstrap counts);
- the scaler runs in the graph as in the prediction graphs (float64, then float32), and the
  thresholds are rounded down to float32, so each comparison decides as scikit-learn's does;
- each tree's leaf values are centred on the tree's expected value before tabulating: a
  constant has no SHAP value, so the result is unchanged, and the float32 table holds small
  numbers; sums run in float64.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper
from sklearn.ensemble import RandomForestRegressor
from sklearn.pipeline import Pipeline

from contract.errors import TrainingError
from training.artifact import CONTRIBUTIONS_NAME
from training.export import INPUT_NAME, OPSET, SCALED_NAME, pipeline_steps, scaler_nodes
from training.gemm import _round_down_to_float32

MAX_FEATURES = 10
"""Most features a model may have for explain.onnx: the table holds 2^features patterns."""

SUM_BLOCK = 64
"""Paths summed in float32 before the float64 sum."""

MAX_TABLE_BYTES = 512 * 1024 * 1024
"""Largest explanation table built (the default model's: ~45 MB)."""


class ExplainTooLarge(TrainingError):
    """The model is too wide or too large for the tabulated explanation; training publishes
    it without explain.onnx."""


@dataclass(frozen=True)
class Paths:
    """Every root-to-leaf path of the forest, one slot per feature (slot f is feature f).

    A feature the path does not split on has the interval (-inf, inf) and zero fraction 1:
    its one fraction is always 1 and it adds nothing, a null player in the path's game.
    """

    lower: NDArray[np.float32]
    """[paths, features]: x must be > lower (float32, scaled space)."""
    upper: NDArray[np.float32]
    """[paths, features]: x must be <= upper."""
    zero: NDArray[np.float64]
    """[paths, features]: the zero fraction of each feature on the path."""
    value: NDArray[np.float64]
    """[paths]: leaf value, centred on its tree's expected value, divided by the tree count."""
    base_value: float
    """Mean over trees of each tree's expected value: the explanation's starting point."""
    max_path_features: int
    """Most distinct features on one path."""

    @property
    def n_features(self) -> int:
        return int(self.lower.shape[1])

    @property
    def n_paths(self) -> int:
        return int(self.lower.shape[0])

    @property
    def table_bytes(self) -> int:
        """Size of the float32 table explain.onnx holds: paths x 2^features x features."""
        return self.n_paths * (1 << self.n_features) * self.n_features * 4


def forest_paths(forest: RandomForestRegressor, n_features: int) -> Paths:
    """The forest's paths with their merged intervals and zero fractions."""
    if getattr(forest, "n_outputs_", 1) != 1:
        raise ValueError("only single-output forests can be explained")
    lowers: list[NDArray[np.float32]] = []
    uppers: list[NDArray[np.float32]] = []
    zeros: list[NDArray[np.float64]] = []
    leaf_values: list[float] = []
    n_trees = len(forest.estimators_)
    expected_total = 0.0
    widest = 0
    for estimator in forest.estimators_:
        tree = estimator.tree_
        cover = np.asarray(tree.weighted_n_node_samples, dtype=np.float64)
        values = tree.value.reshape(tree.node_count, -1)[:, 0].astype(np.float64)
        left, right = tree.children_left, tree.children_right
        thresholds = _round_down_to_float32(np.asarray(tree.threshold, dtype=np.float64))
        leaves = np.flatnonzero(left < 0)
        expected = float(np.dot(cover[leaves], values[leaves]) / cover[0])
        expected_total += expected
        lower0 = np.full(n_features, -np.inf, dtype=np.float32)
        upper0 = np.full(n_features, np.inf, dtype=np.float32)
        zero0 = np.ones(n_features, dtype=np.float64)
        # Depth first; every node on the stack owns its arrays.
        stack = [(0, lower0, upper0, zero0)]
        while stack:
            node, lower, upper, zero = stack.pop()
            if left[node] < 0:
                lowers.append(lower)
                uppers.append(upper)
                zeros.append(zero)
                leaf_values.append((values[node] - expected) / n_trees)
                widest = max(widest, int(np.count_nonzero(zero < 1.0) or 0))
                continue
            feature = int(tree.feature[node])
            threshold = thresholds[node]
            for child, goes_left in ((int(left[node]), True), (int(right[node]), False)):
                lo, hi, z = lower.copy(), upper.copy(), zero.copy()
                if goes_left:
                    hi[feature] = min(hi[feature], threshold)
                else:
                    lo[feature] = max(lo[feature], threshold)
                z[feature] *= cover[child] / cover[node]
                stack.append((child, lo, hi, z))
    return Paths(
        lower=np.stack(lowers),
        upper=np.stack(uppers),
        zero=np.stack(zeros),
        value=np.asarray(leaf_values, dtype=np.float64),
        base_value=expected_total / n_trees,
        max_path_features=widest,
    )


def path_table(paths: Paths, block: int = 2048) -> NDArray[np.float64]:
    """[paths, 2^features, features]: each path's contribution to each feature, for every
    pattern of one fractions (bit f of the pattern index is feature f's o).

    The Shapley weight sum equals the integral over t in [0, 1] of
    prod_{j != i} (z_j (1 - t) + t o_j), a polynomial of degree < features, so
    Gauss-Legendre quadrature with `features` nodes computes it exactly. A feature off the
    path has z = o = 1: a factor 1, and a contribution (o - z) = 0.
    """
    width = paths.n_features
    patterns = (np.arange(1 << width)[:, None] >> np.arange(width)[None, :]) & 1  # [K, F]
    nodes, weights = np.polynomial.legendre.leggauss(width)
    t = (nodes + 1.0) / 2.0  # [Q] on [0, 1]
    w = weights / 2.0
    table = np.empty((paths.n_paths, 1 << width, width), dtype=np.float64)
    for start in range(0, paths.n_paths, block):
        z = paths.zero[start : start + block]  # [P, F]
        # factors[p, k, q, j] = z_j (1 - t_q) + t_q o_j, never 0 since z > 0 and t < 1.
        factors = (
            z[:, None, None, :] * (1.0 - t)[None, None, :, None]
            + t[None, None, :, None] * patterns[None, :, None, :]
        )
        product = factors.prod(axis=3, keepdims=True)
        weight_sum = np.einsum("pkqj,q->pkj", product / factors, w)
        table[start : start + block] = (
            paths.value[start : start + block, None, None]
            * (patterns[None, :, :] - z[:, None, :])
            * weight_sum
        )
    return table


def _padded(paths: Paths, multiple: int) -> Paths:
    """`paths` with paths of value 0 appended up to a multiple of `multiple`."""
    extra = -paths.n_paths % multiple
    if not extra:
        return paths
    f = paths.n_features
    return replace(
        paths,
        lower=np.vstack([paths.lower, np.full((extra, f), -np.inf, dtype=np.float32)]),
        upper=np.vstack([paths.upper, np.full((extra, f), np.inf, dtype=np.float32)]),
        zero=np.vstack([paths.zero, np.ones((extra, f))]),
        value=np.concatenate([paths.value, np.zeros(extra)]),
    )


def build_explain_model(pipeline: Pipeline, n_features: int) -> tuple[onnx.ModelProto, Paths]:
    """The explanation graph: INPUT_NAME [batch, n_features] float32 ->
    CONTRIBUTIONS_NAME [batch, n_features] float64 (the base value not included).

    ExplainTooLarge when the table would exceed MAX_TABLE_BYTES.
    """
    scaler, forest = pipeline_steps(pipeline)
    if n_features > MAX_FEATURES:
        raise ExplainTooLarge(
            f"{n_features} features: explain.onnx tabulates 2^features patterns a path and is "
            f"built for at most {MAX_FEATURES} features"
        )
    paths = forest_paths(forest, n_features)
    if paths.table_bytes > MAX_TABLE_BYTES:
        raise ExplainTooLarge(
            f"the explanation table would take {paths.table_bytes / 1e6:.0f} MB "
            f"({paths.n_paths} paths x 2^{n_features} patterns x {n_features} features), "
            f"above the limit of {MAX_TABLE_BYTES / 1e6:.0f} MB"
        )
    paths = _padded(paths, SUM_BLOCK)
    table = path_table(paths).astype(np.float32)
    n_paths, patterns = paths.n_paths, 1 << n_features

    nodes, initializers = scaler_nodes(scaler, n_features)

    def const(name: str, array: NDArray[np.generic]) -> None:
        initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))

    def node(op: str, inputs: list[str], output: str, **attrs: Any) -> None:
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))

    const("column_shape", np.array([-1, n_features, 1], dtype=np.int64))
    const("path_lower", paths.lower.T)  # [F, P]: rows broadcast along the paths
    const("path_upper", paths.upper.T)
    const("bit_values", (1 << np.arange(n_features)).astype(np.float32).reshape(1, n_features))
    const("index_shape", np.array([-1, n_paths], dtype=np.int64))
    const("path_offset", (np.arange(n_paths) * patterns).astype(np.int32).reshape(n_paths, 1))
    const("table", table.reshape(n_paths * patterns, n_features))
    const("path_axis", np.array([0], dtype=np.int64))
    const("block_axis", np.array([1], dtype=np.int64))
    const("block_shape", np.array([n_paths // SUM_BLOCK, SUM_BLOCK, -1], dtype=np.int64))
    const("output_shape", np.array([-1, n_features], dtype=np.int64))

    # inside[b, f, p]: row b's feature f lies in path p's interval for f.
    node("Reshape", [SCALED_NAME, "column_shape"], "scaled_column")
    node("Greater", ["scaled_column", "path_lower"], "above_lower")
    node("LessOrEqual", ["scaled_column", "path_upper"], "below_upper")
    node("And", ["above_lower", "below_upper"], "inside")
    node("Cast", ["inside"], "inside_f", to=TensorProto.FLOAT)
    # pattern[b, p] = sum_f inside[b, f, p] 2^f, exact in float32 (below 2^24).
    node("MatMul", ["bit_values", "inside_f"], "pattern_f")
    node("Cast", ["pattern_f"], "pattern_3d", to=TensorProto.INT32)
    node("Reshape", ["pattern_3d", "index_shape"], "pattern")
    # Paths outermost, so the rows of a batch read one path's table block in turn while
    # it is in cache, instead of every row sweeping the whole table.
    node("Transpose", ["pattern"], "pattern_by_path", perm=[1, 0])
    node("Add", ["pattern_by_path", "path_offset"], "table_row")
    node("Gather", ["table", "table_row"], "path_values", axis=0)  # [P, B, F]
    # Sums of SUM_BLOCK paths in float32, their sum in float64: a float32 sum over all
    # paths drifts by ~6e-5, casting every value to float64 first costs as much as the lookup.
    node("Reshape", ["path_values", "block_shape"], "path_blocks")  # [P / block, block, B * F]
    node("ReduceSum", ["path_blocks", "block_axis"], "block_sums", keepdims=0)
    node("Cast", ["block_sums"], "block_sums64", to=TensorProto.DOUBLE)
    node("ReduceSum", ["block_sums64", "path_axis"], "flat_contributions", keepdims=0)
    node("Reshape", ["flat_contributions", "output_shape"], CONTRIBUTIONS_NAME)

    graph = helper.make_graph(
        nodes,
        "forest_tree_shap",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [None, n_features])],
        [helper.make_tensor_value_info(CONTRIBUTIONS_NAME, TensorProto.DOUBLE, [None, n_features])],
        initializer=initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="training.explain",
        doc_string=(
            f"path-dependent TreeSHAP of StandardScaler + RandomForestRegressor: {n_paths} "
            f"paths (at most {paths.max_path_features} distinct features each), tabulated "
            f"over {patterns} patterns of {n_features} features"
        ),
    )
    model.ir_version = 8  # loadable by onnxruntime 1.18 and later, like model_gemm.onnx
    onnx.checker.check_model(model)
    return model, paths
