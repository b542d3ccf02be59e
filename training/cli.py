"""Command line of `python -m training`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import redis
from pydantic import ValidationError

from contract.errors import DataError, InferenceError, TrainingError

if TYPE_CHECKING:
    from training.train import TrainOutcome

EXIT_FAILED = 1
EXIT_USAGE = 2


def parse_depth(text: str) -> int | None:
    """A max_depth: a positive integer, or 0 / "none" for unpruned trees."""
    if text.strip().lower() in {"0", "none"}:
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer, 0 or 'none', got {text!r}"
        ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"max depth must not be negative, got {value}")
    return value


def parse_depths(text: str) -> list[int | None]:
    return [parse_depth(part) for part in text.split(",") if part.strip()]


def parse_ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    from training.config import DEFAULT_MAX_DEPTH, DEFAULT_MIN_SAMPLES_LEAF

    parser = argparse.ArgumentParser(
        prog="python -m training",
        description=(
            "Train StandardScaler + RandomForestRegressor, export it to ONNX (model.onnx for "
            "onnxruntime CPU, model_gemm.onnx in standard ops for CUDA), check both against "
            "scikit-learn on held-out rows, publish models/<name>/<version>/ and move CURRENT."
        ),
    )
    parser.add_argument(
        "--model-dir", type=Path, default=Path("models"), help="default: %(default)s"
    )
    parser.add_argument("--name", default="friedman1", help="model name (default: %(default)s)")
    data = parser.add_argument_group(
        "data (default: sklearn make_friedman1, 5 features, noise 1.0)"
    )
    data.add_argument(
        "--n-samples", type=int, default=20_000, help="make_friedman1 rows (default: %(default)s)"
    )
    data.add_argument("--csv", type=Path, help="train on this CSV file instead (needs --target)")
    data.add_argument(
        "--target", help="CSV column to predict; the other numeric columns are the features"
    )
    data.add_argument(
        "--seed", type=int, default=0, help="data, split and forest seed (default: %(default)s)"
    )
    data.add_argument(
        "--test-size", type=float, default=0.2, help="held-out fraction (default: %(default)s)"
    )
    model = parser.add_argument_group("model")
    model.add_argument("--n-estimators", type=int, default=50, help="trees (default: %(default)s)")
    model.add_argument(
        "--max-depth",
        type=parse_depth,
        default=DEFAULT_MAX_DEPTH,
        help=f"tree depth limit; 0 or 'none' for unpruned (default: {DEFAULT_MAX_DEPTH})",
    )
    model.add_argument(
        "--min-samples-leaf",
        type=int,
        default=DEFAULT_MIN_SAMPLES_LEAF,
        help="default: %(default)s",
    )
    model.add_argument("--no-gpu-model", action="store_true", help="do not build model_gemm.onnx")
    model.add_argument(
        "--no-explain-model",
        action="store_true",
        help="do not build explain.onnx (SHAP) nor compute the importances",
    )
    model.add_argument("--n-jobs", type=int, default=-1, help="cores used to fit (default: all)")
    run = parser.add_argument_group("run")
    run.add_argument(
        "--no-benchmark", action="store_true", help="skip the latency/throughput printout"
    )
    run.add_argument(
        "--register",
        action="store_true",
        help="log the run and register the version in the model registry (MLflow); "
        "implied by MLFLOW_TRACKING_URI",
    )
    run.add_argument(
        "--promote-if-better",
        action="store_true",
        help="register, then promote unless the champion scores better on the same held-out "
        "rows (INFERENCE_PROMOTE_TOLERANCE); otherwise make it the challenger",
    )
    run.add_argument(
        "--tradeoff",
        action="store_true",
        help="print size/accuracy/speed for several max_depth values; publish nothing",
    )
    run.add_argument(
        "--tradeoff-depths",
        type=parse_depths,
        default=None,
        metavar="LIST",
        help="comma-separated max_depth values for --tradeoff (default: none,8,10,12,14,16)",
    )
    run.add_argument(
        "--tradeoff-leaves",
        type=parse_ints,
        default=None,
        metavar="LIST",
        help="comma-separated min_samples_leaf values for --tradeoff (default: 1,5)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from training.registry_cli import COMMANDS

    if any(arg in COMMANDS for arg in argv):
        from training import registry_cli

        return registry_cli.main(argv)
    parser = build_parser()
    args = parser.parse_args(argv)

    from training.config import TrainConfig

    try:
        config = TrainConfig(
            model_dir=args.model_dir,
            name=args.name,
            n_samples=args.n_samples,
            seed=args.seed,
            test_size=args.test_size,
            csv=args.csv,
            target=args.target,
            n_estimators=args.n_estimators,
            max_depth=args.max_depth,
            min_samples_leaf=args.min_samples_leaf,
            gpu_model=not args.no_gpu_model,
            explain_model=not args.no_explain_model,
            n_jobs=args.n_jobs,
        )
    except ValidationError as exc:
        parser.error("; ".join(_describe(err) for err in exc.errors()))

    try:
        if args.tradeoff:
            from training.tradeoff import DEFAULT_DEPTHS, DEFAULT_LEAVES, run_tradeoff

            run_tradeoff(
                config,
                args.tradeoff_depths or DEFAULT_DEPTHS,
                args.tradeoff_leaves or DEFAULT_LEAVES,
            )
            return 0
        from training.train import run_training

        outcome = run_training(config, log=print)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED

    manifest = outcome.manifest
    metrics = manifest.metrics
    print(f"version {manifest.version}: R2 {metrics['r2']:.4f}, MAE {metrics['mae']:.4f}")
    for variant, entry in sorted(manifest.files.items()):
        diff = metrics.get(
            f"max_abs_diff_{variant}", metrics.get(f"max_abs_additivity_{variant}", float("nan"))
        )
        print(
            f"  {variant}: {entry.path} {entry.size_bytes / 1e6:.2f} MB, "
            f"max |ONNX - sklearn| {diff:.2g}, sha256 {entry.sha256[:12]}"
        )
    if manifest.base_value is not None:
        print(f"  explanations: base value {manifest.base_value:.6g}")
    for line in importance_lines(manifest.feature_names, manifest.importances):
        print(line)
    if args.register or args.promote_if_better or os.environ.get("MLFLOW_TRACKING_URI"):
        try:
            _register(outcome, args.model_dir, gate=args.promote_if_better)
        except (InferenceError, redis.RedisError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_FAILED
    if not args.no_benchmark:
        from training.bench import record_goals

        record_goals(config, outcome)
    return 0


def importance_lines(features: list[str], importances: dict[str, dict[str, float]]) -> list[str]:
    """The importances as a table, one line per feature, most important (mean |SHAP|) first."""
    if not importances:
        return []
    kinds = sorted(importances)
    key = "mean_abs_shap" if "mean_abs_shap" in importances else kinds[0]
    ordered = sorted(features, key=lambda f: -importances[key].get(f, 0.0))
    lines = ["  importances: " + "  ".join(f"{k:>24}" for k in kinds)]
    for feature in ordered:
        cells = "  ".join(f"{importances[k].get(feature, float('nan')):>24.4g}" for k in kinds)
        lines.append(f"  {feature:>11}: {cells}")
    return lines


def _register(outcome: TrainOutcome, model_dir: Path, *, gate: bool) -> None:
    from training.registry import Registry
    from training.settings import RegistrySettings

    settings = RegistrySettings()
    registry = Registry(settings, model_dir)
    if not gate:
        version = registry.register(outcome.version_dir, outcome.manifest)
        print(f"registered {outcome.manifest.name} version {version.number}")
        return
    from training.gate import run_gate

    client = redis.Redis.from_url(settings.decision_url)
    try:
        result = run_gate(registry, client, outcome, settings.promote_tolerance)
    finally:
        client.close()
    verdict = "promoted to champion" if result.promoted else "kept as challenger"
    print(f"version {result.candidate.number} {verdict}: {result.reason}")


def _describe(error: object) -> str:
    if isinstance(error, dict):
        where = ".".join(str(part) for part in error.get("loc", ()))
        message = str(error.get("msg", error))
        return f"{where}: {message}" if where else message
    return str(error)
