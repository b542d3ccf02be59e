"""A worker refuses to start, with a message naming the cause, when its model or
device is wrong (that importing the app loads no model: test_app_module.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis

from contract.names import QUEUE_GPU
from producer.client import Client
from stack.processes import celery_env, wait_ready, worker_process
from tests.support import TrainedModel

pytestmark = pytest.mark.integration


def run_worker(
    env: dict[str, str], tmp_path: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    args = [
        sys.executable, "-m", "celery", "-A", "worker", "worker", "-Q", "startup-test",
        "--without-mingle", "--without-gossip",
        "-n", f"refuse-{uuid.uuid4().hex[:6]}@tests", *extra,
    ]  # fmt: skip
    return subprocess.run(
        args, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False
    )


def copy_model(trained: TrainedModel, tmp_path: Path) -> tuple[Path, Path]:
    model_dir = tmp_path / "models"
    shutil.copytree(trained.model_dir, model_dir)
    return model_dir, model_dir / trained.manifest.name / trained.manifest.version


def test_missing_model_is_refused(redis_url: str, tmp_path: Path) -> None:
    proc = run_worker(celery_env(redis_url, model_dir=tmp_path / "nothing"), tmp_path)
    assert proc.returncode != 0
    assert "refuses to start" in proc.stderr and "no model 'friedman1'" in proc.stderr


@pytest.mark.parametrize("damage", ["flip a byte", "truncate"])
def test_tampered_model_is_refused(
    redis_url: str, trained_model: TrainedModel, tmp_path: Path, damage: str
) -> None:
    model_dir, version_dir = copy_model(trained_model, tmp_path)
    model = version_dir / trained_model.manifest.files["cpu"].path
    data = bytearray(model.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    proc = run_worker(celery_env(redis_url, model_dir=model_dir), tmp_path)
    assert proc.returncode != 0
    expected = "truncated or replaced" if damage == "truncate" else "does not match manifest"
    assert expected in proc.stderr


def test_cuda_without_a_gpu_is_refused(
    redis_url: str, trained_model: TrainedModel, tmp_path: Path
) -> None:
    env = celery_env(redis_url, model_dir=trained_model.model_dir, provider="cuda")
    proc = run_worker(env, tmp_path, "-P", "solo")
    assert proc.returncode != 0
    assert "INFERENCE_PROVIDER=cuda but onnxruntime offers only" in proc.stderr
    assert "INFERENCE_ALLOW_CPU_FALLBACK" in proc.stderr


def test_cuda_on_a_prefork_pool_is_refused(
    redis_url: str, trained_model: TrainedModel, tmp_path: Path
) -> None:
    env = celery_env(
        redis_url, model_dir=trained_model.model_dir, provider="cuda", allow_cpu_fallback="true"
    )
    proc = run_worker(env, tmp_path, "-P", "prefork")
    assert proc.returncode != 0
    assert "CUDA-safe pool" in proc.stderr


def test_password_is_not_printed(trained_model: TrainedModel, tmp_path: Path) -> None:
    env = celery_env("redis://:s3cret-pw@127.0.0.1:1/0", model_dir=tmp_path / "nothing")
    proc = run_worker(env, tmp_path)
    assert proc.returncode != 0
    assert "s3cret-pw" not in proc.stderr + proc.stdout


def test_explicit_cpu_fallback_serves_and_says_so(
    redis_url: str, trained_model: TrainedModel, producer_settings, tmp_path: Path
) -> None:
    hostname = f"fallback-{uuid.uuid4().hex[:6]}@tests"
    env = celery_env(
        redis_url, model_dir=trained_model.model_dir, provider="cuda", allow_cpu_fallback="true"
    )
    proc = worker_process(env, tmp_path / "w.log", queue=QUEUE_GPU, name=hostname, pool="solo")
    proc.start()
    client = redis.Redis.from_url(redis_url)
    try:
        wait_ready(proc, client, hostname, processes=1)
        with Client(producer_settings) as producer:
            result = producer.wait(producer.submit(trained_model.X_test[0].tolist(), queue="gpu"))
    finally:
        proc.stop()
        client.close()
    assert result["hostname"] == hostname
    assert result["provider"] == "CPUExecutionProvider"
    assert result["device"] == "cpu (fallback: no CUDA)"
