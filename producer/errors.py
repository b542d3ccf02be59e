"""The errors a Python client catches, where result documents say they live (`exc_module`).

They are defined once, in contract.errors; see its docstring for the tree.
"""

from contract.errors import (
    ExplainUnavailable,
    FeatureCountMismatch,
    InferenceError,
    InvalidInput,
    JournalError,
    MessageTooLarge,
    ModelArtifactError,
    ModelNotReady,
    NotReplicated,
    PermanentError,
    PredictionFailed,
    ProviderUnavailable,
    QueueFull,
    RedisAuthFailed,
    RedisTlsFailed,
    RedisUnreachable,
    StartupError,
    TaskFailed,
    TooManyRows,
    TransientError,
    UnknownModelVersion,
)

__all__ = [
    "ExplainUnavailable",
    "FeatureCountMismatch",
    "InferenceError",
    "InvalidInput",
    "JournalError",
    "MessageTooLarge",
    "ModelArtifactError",
    "ModelNotReady",
    "NotReplicated",
    "PermanentError",
    "PredictionFailed",
    "ProviderUnavailable",
    "QueueFull",
    "RedisAuthFailed",
    "RedisTlsFailed",
    "RedisUnreachable",
    "StartupError",
    "TaskFailed",
    "TooManyRows",
    "TransientError",
    "UnknownModelVersion",
]
