"""Training data: the synthetic Friedman #1 set, or a numeric CSV file.

Features are rounded to float32 on load. The served model only ever sees
float32 inputs, so training and checking on float32-representable values makes
"ONNX vs scikit-learn" a comparison of the models, not of input rounding. The
arrays stay float64 (exact copies of those float32 values) because that is the
dtype on which scikit-learn's StandardScaler computes in double precision, the
path both ONNX graphs reproduce.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from contract.errors import DataError

FRIEDMAN_FEATURES = 5
FRIEDMAN_NOISE = 1.0
FRIEDMAN_TARGET = "y"

# Cells read as "missing" in a CSV file (compared lower-cased, stripped).
MISSING_TOKENS = frozenset({"", "na", "nan", "n/a", "null", "none"})

# Fewer rows than this cannot give both a training set and a useful test split.
MIN_ROWS = 10


@dataclass(frozen=True)
class Dataset:
    X: NDArray[np.float64]
    """(n_rows, n_features), every value exactly representable as float32."""
    y: NDArray[np.float64]
    feature_names: list[str]
    target: str
    source: str
    """Human-readable origin: "make_friedman1(...)" or the CSV path."""
    dropped_rows: int = 0
    """CSV rows dropped because a used cell was missing or not finite."""
    ignored_columns: list[str] = field(default_factory=list)
    """CSV columns left out because they are not numeric."""


def friedman1(n_samples: int, seed: int) -> Dataset:
    from sklearn.datasets import make_friedman1

    if n_samples < MIN_ROWS:
        raise DataError(f"n_samples must be at least {MIN_ROWS}, got {n_samples}")
    X, y = make_friedman1(
        n_samples=n_samples,
        n_features=FRIEDMAN_FEATURES,
        noise=FRIEDMAN_NOISE,
        random_state=seed,
    )
    return Dataset(
        X=_as_float32_values(X),
        y=np.asarray(y, dtype=np.float64),
        feature_names=[f"x{i}" for i in range(FRIEDMAN_FEATURES)],
        target=FRIEDMAN_TARGET,
        source=(
            f"make_friedman1(n_samples={n_samples}, n_features={FRIEDMAN_FEATURES}, "
            f"noise={FRIEDMAN_NOISE}, random_state={seed})"
        ),
    )


def from_csv(path: Path, target: str) -> Dataset:
    """Target column `target`; features: every other numeric column, in file order.

    A column is numeric when each of its non-missing cells parses as a number.
    Rows where the target or a feature is missing or not finite are dropped.
    """
    header, rows = _read_csv(path)
    if target not in header:
        raise DataError(
            f"target column {target!r} not found in {path}; columns: {', '.join(header)}"
        )
    if header.count(target) > 1:
        raise DataError(f"target column {target!r} appears more than once in {path}")

    columns = {name: _parse_column([row[i] for row in rows]) for i, name in enumerate(header)}
    if columns[target] is None:
        raise DataError(f"target column {target!r} in {path} is not numeric")
    features = [name for name in header if name != target and columns[name] is not None]
    ignored = [name for name in header if name != target and columns[name] is None]
    if not features:
        raise DataError(f"{path} has no numeric feature column besides the target {target!r}")
    if len(set(features)) != len(features):
        raise DataError(f"{path} has duplicate feature column names")

    y_all = np.asarray(columns[target], dtype=np.float64)
    X_all = np.column_stack([np.asarray(columns[name], dtype=np.float64) for name in features])
    # A value beyond float32's range would reach the model as inf: treat it as unusable.
    with np.errstate(over="ignore"):
        keep = np.isfinite(X_all.astype(np.float32)).all(axis=1) & np.isfinite(y_all)
    dropped = int((~keep).sum())
    if int(keep.sum()) < MIN_ROWS:
        raise DataError(
            f"{path}: only {int(keep.sum())} usable rows after dropping {dropped} with "
            f"missing or non-finite values; need at least {MIN_ROWS}"
        )
    return Dataset(
        X=_as_float32_values(X_all[keep]),
        y=y_all[keep],
        feature_names=features,
        target=target,
        source=str(path),
        dropped_rows=dropped,
        ignored_columns=ignored,
    )


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path} is empty")
            header = [name.strip() for name in header]
            rows = [row for row in reader if row and any(cell.strip() for cell in row)]
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    except (csv.Error, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not a readable CSV file: {exc}") from None
    for index, row in enumerate(rows, start=1):
        if len(row) != len(header):
            raise DataError(
                f"{path}: data row {index} has {len(row)} cells, the header has {len(header)}"
            )
    return header, rows


def _parse_column(cells: list[str]) -> list[float] | None:
    """The column's values (NaN where missing), or None when it is not numeric."""
    values: list[float] = []
    seen_number = False
    for cell in cells:
        text = cell.strip()
        if text.lower() in MISSING_TOKENS:
            values.append(math.nan)
            continue
        try:
            values.append(float(text))
        except ValueError:
            return None
        seen_number = True
    return values if seen_number else None


def _as_float32_values(X: NDArray[np.float64]) -> NDArray[np.float64]:
    return np.asarray(X, dtype=np.float32).astype(np.float64)
