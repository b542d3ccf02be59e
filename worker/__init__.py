"""Celery workers serving the ONNX model: `celery -A worker worker -Q inference.cpu`.

Importing the package builds nothing; `celery -A worker` finds the app in worker.celery.
"""
