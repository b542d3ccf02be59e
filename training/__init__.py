"""Training: fit the model, export it to ONNX, check it, publish a versioned artifact.

Run `python -m training --help`. `training.artifact` (the on-disk format) and
`training.fetch` (a served version into a local cache) are the only modules workers import;
keep this package's import free of scikit-learn, onnx and MLflow.
"""
