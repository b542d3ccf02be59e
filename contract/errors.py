"""Every error this project raises on purpose: one tree, rooted at InferenceError.

    InferenceError
    ├── PermanentError            the job cannot succeed as sent: never retried
    │   ├── InvalidInput          ├── FeatureCountMismatch, TooManyRows, MessageTooLarge
    │   │                         └── MessageRefused (not a task message; never on the wire)
    │   ├── ExplainUnavailable    the served model has no explanation graph
    │   └── UnknownModelVersion   the job pinned a version the worker cannot serve
    ├── TransientError            the same job may succeed later: retried
    │   ├── ModelNotReady, PredictionFailed
    │   └── RedisUnreachable, QueueFull
    ├── TaskFailed                a job failed for a reason outside this tree
    ├── StartupError              a worker refuses to start
    │   └── ModelArtifactError, ProviderUnavailable, RedisAuthFailed, RedisTlsFailed
    ├── JournalError              a scoring run cannot resume from its journal
    ├── TrainingError             a training run refuses to publish
    │   └── DataError, ConversionMismatch, RegistryError
    └── ToolError                 the demo or the benchmark cannot run here
        └── RedisServerExited, TlsUnsupported, BenchError

Task failures travel through the result backend as JSON, as Celery writes them:
`{"exc_type": "<class name>", "exc_message": ["<text>"], "exc_module": "producer.errors"}`.
`producer.errors` is the public module a Python client imports them from, so every class
here carries that module name (WIRE_MODULE) and takes a single message string.
"""

from __future__ import annotations

from typing import Any

WIRE_MODULE = "producer.errors"
"""The `exc_module` of every error in a result document: where Python clients import it."""


class InferenceError(Exception):
    """Root of every error this project raises on purpose."""

    retryable: bool = False
    """Whether sending the same job again may succeed."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # The name Celery writes as exc_module, and looks the class up by when it reads one.
        cls.__module__ = WIRE_MODULE

    def __str__(self) -> str:
        return self.message


InferenceError.__module__ = WIRE_MODULE


# -- the job ---------------------------------------------------------------------------------


class PermanentError(InferenceError):
    """The job cannot succeed as sent; retrying cannot help."""


class InvalidInput(PermanentError):
    """The job's arguments break the schema: wrong types, NaN/inf, empty, extra or missing keys."""


class FeatureCountMismatch(InvalidInput):
    """A row does not have as many features as the model expects."""


class TooManyRows(InvalidInput):
    """A batch has more rows than the configured maximum per job."""


class MessageTooLarge(InvalidInput):
    """The message body (decompressed) exceeds the worker's INFERENCE_MAX_MESSAGE_BYTES."""


class UnknownModelVersion(PermanentError):
    """The job pinned a version (or alias) that this worker cannot serve."""


class MessageRefused(InvalidInput):
    """Raw bytes off a queue that are not a JSON task message. `headers` holds what could be
    read of it; the job, if it has an id, fails with InvalidInput (this type stays local)."""

    def __init__(self, message: str, headers: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.headers = headers or {}


class ExplainUnavailable(PermanentError):
    """inference.explain reached a worker whose model has no explain.onnx (trained with
    --no-explain-model, or too wide to tabulate), or that was started with INFERENCE_EXPLAIN
    off: that worker can never serve it."""


class TransientError(InferenceError):
    """The worker, or a service it needs, was not ready: the same job may succeed later."""

    retryable = True


class ModelNotReady(TransientError):
    """The worker process has no model loaded (yet)."""


class PredictionFailed(TransientError):
    """onnxruntime raised on the job's rows; another try, or another worker, may succeed."""


class RedisUnreachable(TransientError):
    """Redis did not answer; it may come up later."""


class QueueFull(TransientError):
    """The queue holds as many jobs as its limit allows (INFERENCE_MAX_QUEUE_DEPTH): nothing
    was enqueued; send again once workers have drained it."""


class NotReplicated(TransientError):
    """A write reached the Redis primary, but fewer replicas than asked confirmed it in time:
    a failover now could lose it. Sending again under the same task id is safe."""


class TaskFailed(InferenceError):
    """A job failed for a reason outside this tree: the producer client raises it for an
    error type it does not know, and a worker stores it for a job it could not serve
    (its own fault, not the job's)."""


# -- start-up --------------------------------------------------------------------------------


class StartupError(InferenceError):
    """A worker refuses to start: bad configuration, model or device."""


class ModelArtifactError(StartupError):
    """The model artifact is missing, unreadable, or does not match its manifest."""


class ArtifactUnreachable(ModelArtifactError):
    """The artifact store (a shared folder, MLflow's artifact API) could not be read: the
    artifact may be fine, so fetching it again later may succeed."""

    retryable = True


class ProviderUnavailable(StartupError):
    """The requested execution provider (e.g. CUDA) is not available on this machine."""


class RedisAuthFailed(StartupError):
    """Redis refused the credentials."""


class RedisTlsFailed(StartupError):
    """The server's TLS certificate could not be verified."""


# -- local to one tool; never on the wire ----------------------------------------------------


class JournalError(InferenceError):
    """A scoring run's journal cannot be used: another job's, damaged, or in use."""


class TrainingError(InferenceError):
    """A training run refused to publish a model."""


class DataError(TrainingError):
    """The training data cannot be used as given (missing column, no numeric features...)."""


class RegistryError(TrainingError):
    """The model registry, or a promote / rollback, refuses: the version is unknown, broken,
    or does not fit what is served."""


class ConversionMismatch(TrainingError):
    """An exported ONNX graph does not reproduce scikit-learn's predictions."""


class ToolError(InferenceError):
    """A tool that runs the whole stack (demo, benchmark) cannot go on."""


class RedisServerExited(ToolError):
    """redis-server exited before it answered (bad configuration, unsupported option)."""


class TlsUnsupported(ToolError):
    """No redis-server here can serve TLS, or no trustme (dev extra) to make certificates with."""


class BenchError(ToolError):
    """The bench cannot run here: no workers, no model info, a worker that will not start."""
