"""Training: fit the model, export it to ONNX, check it, publish a versioned artifact.

Run `python -m training --help`. `training.artifact` (the on-disk format) is the only
module workers import; keep this package's import free of scikit-learn and onnx.
"""
