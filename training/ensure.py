"""Train a model with the defaults if there is none: what the demo and the benchmark do
before they start a worker."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from contract.errors import TrainingError
from training.artifact import CURRENT_FILE


def ensure_model(model_dir: Path, name: str, log: Callable[[str], None] = print) -> bool:
    """Train and publish `name` under `model_dir` with `python -m training`'s defaults, and
    record its model goals beside it, unless a version is published already. True when it
    trained one. TrainingError when the training extra is not installed."""
    if (model_dir / name / CURRENT_FILE).exists():
        return False
    log(f"no model under {model_dir}/{name}: training one (python -m training defaults)")
    try:
        from training.bench import record_goals
        from training.train import TrainConfig, run_training
    except ImportError as exc:
        raise TrainingError(
            f"cannot train a model: {exc} (install the `training` extra, or point at a "
            "trained model)"
        ) from None
    config = TrainConfig(model_dir=model_dir, name=name)
    outcome = run_training(config, log=log)
    m = outcome.manifest
    r2, mae = m.metrics.get("r2"), m.metrics.get("mae")
    log(f"trained {m.name}/{m.version}: R2={r2:.4f} MAE={mae:.4f}")
    # The model goals beside the manifest, as `python -m training` writes them (P4 of the bench).
    record_goals(config, outcome, out=log)
    return True
