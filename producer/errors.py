"""One small hierarchy of errors, shared by producer and worker.

Task failures travel through the result backend as JSON
(`{"exc_type": "<class name>", "exc_message": ["<text>"], "exc_module": "producer.errors"}`),
so every class takes a single message string.

- `PermanentError`: the job itself is wrong (bad input); retrying cannot help.
- `TransientError`: the worker or a service it needs was not ready; the same job may succeed later.
- `StartupError`: a worker refuses to start (bad configuration, model or device).
"""

from __future__ import annotations


class InferenceError(Exception):
    """Base class of every error this project raises on purpose."""

    retryable: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class PermanentError(InferenceError):
    """The job cannot succeed as sent."""


class InvalidInput(PermanentError):
    """The job's arguments break the schema: wrong types, NaN/inf, empty, extra or missing keys."""


class FeatureCountMismatch(InvalidInput):
    """A row does not have as many features as the model expects."""


class TooManyRows(InvalidInput):
    """A batch has more rows than the configured maximum per job."""


class MessageTooLarge(InvalidInput):
    """The message body (decompressed) exceeds the worker's INFERENCE_MAX_MESSAGE_BYTES."""


class TransientError(InferenceError):
    """The job may succeed if sent again later."""

    retryable = True


class ModelNotReady(TransientError):
    """The worker process has no model loaded (yet)."""


class PredictionFailed(TransientError):
    """onnxruntime raised on the job's rows; another try, or another worker, may succeed."""


class StartupError(InferenceError):
    """The worker refuses to start."""


class ModelArtifactError(StartupError):
    """The model artifact is missing, unreadable, or does not match its manifest."""


class ProviderUnavailable(StartupError):
    """The requested execution provider (e.g. CUDA) is not available on this machine."""


class TaskFailed(InferenceError):
    """Raised by the producer client when a task failed for a reason outside this hierarchy."""
