"""Producer client for the queue-based inference workers (no onnxruntime needed)."""

from producer.client import Client, TaskStatus
from producer.errors import InferenceError, InvalidInput, PermanentError, TransientError

__all__ = [
    "Client",
    "InferenceError",
    "InvalidInput",
    "PermanentError",
    "TaskStatus",
    "TransientError",
]
