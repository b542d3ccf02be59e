"""Worker settings, read from the environment (prefix INFERENCE_) when a process asks.

Nothing is read at import: `load()` reads them once per process, the first time the app
module, a signal handler or a task needs them.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, model_validator

from contract.names import QUEUE_CPU
from producer.settings import ConnectionSettings
from training.fetch import ArtifactAuth, auth_headers


class WorkerSettings(ConnectionSettings):
    model_dir: Path = Path("models")
    """Directory holding trained models (<model_dir>/<name>/<version>/)."""

    model_name: str = "friedman1"
    """Name of the model to serve."""

    model_version: str | None = None
    """Version to serve; unset follows <model_dir>/<name>/CURRENT."""

    provider: Literal["cpu", "cuda"] = "cpu"
    """Execution provider: cpu (onnxruntime) or cuda (onnxruntime-gpu, GPU model variant)."""

    allow_cpu_fallback: bool = False
    """With provider=cuda and no usable GPU, serve on the CPU instead of refusing to start."""

    cuda_device_id: int = Field(default=0, ge=0)
    """CUDA device index, counted among the devices CUDA_VISIBLE_DEVICES leaves visible."""

    intra_op_threads: int = Field(default=1, ge=1)
    """onnxruntime intra-op threads per worker process (processes x threads <= cores)."""

    max_batch_rows: int = Field(default=100_000, ge=1)
    """Most rows accepted in one inference.predict_batch job."""

    max_message_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    """Largest task message body accepted, in bytes once decompressed; larger ones fail with
    MessageTooLarge before their JSON is decoded. Keep it above the largest legitimate batch
    (max_batch_rows rows of JSON numbers, about 20 bytes per feature value)."""

    max_row_message_bytes: int = Field(default=1024 * 1024, ge=1024)
    """Largest inference.predict (single-row) message accepted, in bytes: one row of 40,000
    features fits. A larger one fails with MessageTooLarge before its JSON is decoded, so a
    hostile row of millions of features costs the worker nothing but its bytes."""

    task_soft_time_limit_s: float = Field(default=60.0, gt=0)
    """Seconds after which a running task is interrupted with an error."""

    task_time_limit_s: float = Field(default=90.0, gt=0)
    """Seconds after which a running task's process is killed and replaced."""

    visibility_timeout_s: int = Field(default=600, ge=1)
    """Seconds after which a job delivered to a worker that never acknowledged it (the
    worker died) is handed to another worker. Must exceed the longest a job can wait
    in a worker's prefetch buffer plus run: task_time_limit_s x (prefetch_multiplier + 1)."""

    held_ttl_s: float = Field(default=15.0, ge=1)
    """Seconds a worker process's hold on the jobs it took outlives its last refresh (each
    process refreshes it every third of this, from a thread of its own). Once it lapses (the
    process died, or lost its Redis connection), any live worker hands those jobs back: they
    run again within about held_ttl_s + restore_interval_s of the death, instead of after the
    visibility timeout. A live process, however slow its jobs, keeps its hold."""

    result_replicas: int = Field(default=0, ge=0)
    """Replicas that must have a batch's results before the row lane acknowledges its jobs
    (Redis WAIT, up to result_replicas_timeout_ms; past it the lane logs and goes on). With
    Sentinel, a result on the primary alone is lost if it dies first, while its job, already
    acknowledged, is not run again."""

    result_replicas_timeout_ms: int = Field(default=1_000, ge=1)
    """Longest the row lane waits for result_replicas."""

    restore_interval_s: float = Field(default=5.0, gt=0)
    """Seconds between two scans for jobs whose visibility timeout has passed."""

    prefetch_multiplier: int = Field(default=4, ge=1)
    """Jobs each worker process reserves ahead of the one it runs."""

    health_interval_s: float = Field(default=30.0, gt=0)
    """Seconds between two health reports (celery beat)."""

    health_queue: str = QUEUE_CPU
    """Queue the health task is sent to; any worker consuming it gathers the report."""

    heartbeat_s: float = Field(default=5.0, gt=0)
    """Seconds between two refreshes of a worker process's state in Redis."""

    row_lane: bool = True
    """Each worker process takes the single-row jobs of <queue>.rows itself, many per Redis
    round trip, and predicts them as one batch (worker.lane). False leaves that queue to
    Celery's consumer: name it in -Q then."""

    row_batch_max: int = Field(default=256, ge=1, le=10_000)
    """Most single-row jobs a worker process takes off the queue and predicts at once."""

    row_batch_wait_ms: float = Field(default=0.0, ge=0, le=1_000)
    """How long a worker process waits for more single-row jobs to fill a batch (up to
    row_batch_max) once it has one. 0 takes what is queued: batches still grow with load,
    because jobs queue up while the previous batch runs, and a lone job never waits."""

    explain: bool = True
    """Load the model's explain.onnx, when it has one, and serve inference.explain. Off
    saves its memory (for the default model, ~120 MB a process: ~43 MB once loaded, the
    rest onnxruntime's working memory once it has explained); explain jobs then fail with
    ExplainUnavailable."""

    warmup_runs: int = Field(default=20, ge=0)
    """Inference runs made at process start, before the first job is taken."""

    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    """Port the worker's main process serves Prometheus metrics on (/metrics), all its
    processes counted together (worker.metrics); unset: no metrics are kept."""

    metrics_addr: str = "0.0.0.0"
    """Address the metrics port is bound to."""

    serving_decisions: bool = True
    """Serve what `python -m training promote` decided (a decision in Redis, checked at start
    and whenever it changes) rather than the model directory; without a decision in Redis
    the model directory is served, as with False."""

    serving_poll_s: float = Field(default=1.0, gt=0, le=60)
    """Seconds between two reads of the serving decision, the backstop of its pub/sub
    notice: a change missed by both is applied within this."""

    model_cache_dir: Path = Path(tempfile.gettempdir()) / "inference-models"
    """Where the versions named by serving decisions are fetched to (checked, then renamed
    into place), <model_cache_dir>/<name>/<version>/."""

    artifact_server: str | None = Field(
        default=None,
        validation_alias=AliasChoices("INFERENCE_ARTIFACT_SERVER", "MLFLOW_TRACKING_URI"),
    )
    """The MLflow server whose artifact REST API serves the decisions' versions: the
    artifact credentials below are sent to its URLs, and to no other."""

    artifact_token: str | None = Field(
        default=None,
        validation_alias=AliasChoices("INFERENCE_ARTIFACT_TOKEN", "MLFLOW_TRACKING_TOKEN"),
        repr=False,
    )
    """Bearer token for artifact_server's downloads (as MLflow's clients send it)."""

    artifact_username: str | None = Field(
        default=None,
        validation_alias=AliasChoices("INFERENCE_ARTIFACT_USERNAME", "MLFLOW_TRACKING_USERNAME"),
    )
    """With artifact_password: basic auth for artifact_server's downloads (the token wins)."""

    artifact_password: str | None = Field(
        default=None,
        validation_alias=AliasChoices("INFERENCE_ARTIFACT_PASSWORD", "MLFLOW_TRACKING_PASSWORD"),
        repr=False,
    )
    """The password of artifact_username."""

    max_pinned_versions: int = Field(default=3, ge=0, le=32)
    """Versions kept loaded for jobs that pin one (least recently used dropped first),
    besides the champion and challenger."""

    shadow_max_share: float = Field(default=0.2, ge=0.0, le=1.0)
    """Most of a process's time spent running the challenger in shadow, kept over a 10 s
    window: above it, rows are served without their shadow run (counted as skipped)."""

    shadow_queue_rows: int = Field(default=65_536, ge=1, le=10_000_000)
    """Rows waiting for their shadow run, at most, per process: beyond it, new rows are
    served without one (counted as skipped), so the queue never holds much memory."""

    @property
    def artifact_auth(self) -> ArtifactAuth | None:
        """Credentials for version downloads from artifact_server (None: sent nowhere)."""
        if not self.artifact_server:
            return None
        headers = auth_headers(self.artifact_token, self.artifact_username, self.artifact_password)
        return ArtifactAuth(self.artifact_server, headers) if headers else None

    @model_validator(mode="after")
    def _limits_are_consistent(self) -> WorkerSettings:
        if self.task_soft_time_limit_s > self.task_time_limit_s:
            raise ValueError("task_soft_time_limit_s must not exceed task_time_limit_s")
        if self.held_ttl_s >= self.visibility_timeout_s:
            raise ValueError("held_ttl_s must be below visibility_timeout_s")
        held = self.task_time_limit_s * (self.prefetch_multiplier + 1)
        if self.visibility_timeout_s <= held:
            # Redis would hand a job still waiting or running in one worker to a second one.
            raise ValueError(
                f"visibility_timeout_s ({self.visibility_timeout_s}) must exceed "
                f"task_time_limit_s x (prefetch_multiplier + 1) = {held:g}"
            )
        return self


@functools.cache
def load() -> WorkerSettings:
    """This process's settings, read from the environment on the first call."""
    return WorkerSettings()
