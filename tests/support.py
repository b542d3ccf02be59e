"""Types and constants shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import redis

from contract.schemas import ServedVersion
from stack.processes import CeleryProcess, wait_ready
from training.artifact import Manifest

TEST_MAX_BATCH_ROWS = 5_000
"""The row limit the shared test worker is started with."""


@dataclass(frozen=True)
class MlflowServer:
    """A running `mlflow server` (the mlflow_server fixture)."""

    url: str
    artifacts: Path
    """Its --artifacts-destination: what its artifact REST API serves."""
    log: Path

    def artifact_dir(self, source: str) -> Path:
        """The folder holding a `mlflow-artifacts:/...` model version source."""
        return self.artifacts / source.removeprefix("mlflow-artifacts:").lstrip("/")


@dataclass(frozen=True)
class SyncCommand:
    """`python -m training --name NAME sync [args]` as a given interpreter command runs it."""

    prefix: list[str]
    env: dict[str, str]

    def __call__(self, name: str, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [*self.prefix, "--name", name, "sync", *args]
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=120)

    def start(self, name: str, *args: str, log: Path, **env: str) -> subprocess.Popen[bytes]:
        """In the background (`--every`, `--listen`), its output in `log`."""
        argv = [*self.prefix, "--name", name, "sync", *args]
        with log.open("wb") as out:
            return subprocess.Popen(
                argv, env={**self.env, **env}, stdout=out, stderr=subprocess.STDOUT
            )


@dataclass(frozen=True)
class TrainedModel:
    model_dir: Path
    version_dir: Path
    manifest: Manifest
    X_test: np.ndarray

    def reference(self, rows: np.ndarray) -> np.ndarray:
        """Predictions of the served ONNX file, run in this process."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        # One thread, as the workers run it, so trees are summed in the same order.
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(
            str(self.version_dir / self.manifest.files["cpu"].path),
            options,
            providers=["CPUExecutionProvider"],
        )
        (out,) = session.run(None, {self.manifest.input_name: rows.astype(np.float32)})
        return np.asarray(out).reshape(-1)


@dataclass
class RunningWorker:
    process: CeleryProcess
    hostname: str
    queue: str


@contextlib.contextmanager
def serving(
    proc: CeleryProcess, redis_url: str, hostname: str, queue: str, processes: int = 1
) -> Iterator[RunningWorker]:
    """Start a worker process, wait until `processes` of its processes have loaded the
    model, hand it over; stop it afterwards, however the block ends."""
    state = redis.Redis.from_url(redis_url)
    proc.start()
    try:
        wait_ready(proc, state, hostname, processes=processes)
        yield RunningWorker(proc, hostname, queue)
    finally:
        proc.stop()
        state.close()


def served_version(version_dir: Path, registry_version: str | None = None) -> ServedVersion:
    """A version directory as a serving decision names it (no registry needed)."""
    from training.artifact import load_manifest
    from training.fetch import file_hashes

    _, manifest = load_manifest(
        version_dir.parent.parent, version_dir.parent.name, version_dir.name
    )
    return ServedVersion(
        version=manifest.version,
        registry_version=registry_version,
        location=str(version_dir),
        sha256=file_hashes(str(version_dir)),
        n_features=manifest.n_features,
    )
