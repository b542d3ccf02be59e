"""Celery workers serving the ONNX model: `celery -A worker worker -Q inference.cpu`."""

from worker.app import app

__all__ = ["app"]
