"""Producer clients for the queue-based inference workers (no onnxruntime needed):
Client for plain Python, AsyncClient for asyncio services."""

from producer.aio import AsyncClient
from producer.client import Client, TaskStatus
from producer.errors import InferenceError, InvalidInput, PermanentError, TransientError

__all__ = [
    "AsyncClient",
    "Client",
    "InferenceError",
    "InvalidInput",
    "PermanentError",
    "TaskStatus",
    "TransientError",
]
