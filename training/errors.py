"""Errors of the training pipeline.

They are not part of the producer/worker hierarchy in `producer.errors`: they
never cross the queue, they stop a training run before anything is published.
"""

from __future__ import annotations


class TrainingError(Exception):
    """A training run refused to publish a model."""


class DataError(TrainingError):
    """The training data cannot be used as given (missing column, no numeric features...)."""


class ConversionMismatch(TrainingError):
    """An exported ONNX graph does not reproduce scikit-learn's predictions."""
