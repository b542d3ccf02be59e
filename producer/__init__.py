"""Producer client for the queue-based inference workers (no onnxruntime needed)."""

from contract.errors import InferenceError, InvalidInput, PermanentError, TransientError
from producer.client import Client, TaskStatus

__all__ = [
    "Client",
    "InferenceError",
    "InvalidInput",
    "PermanentError",
    "TaskStatus",
    "TransientError",
]
