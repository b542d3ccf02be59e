"""GPU vs CPU worker throughput through the queue, node placement, and accuracy.

Run as `python -m stack.gpu_check` by scripts/gpu_check.sh on a machine with an NVIDIA
GPU (it also runs without one, with --allow-cpu-fallback, to check the script itself).
It trains a model (or uses --model-dir), starts a private Redis, a GPU worker (-P solo,
INFERENCE_PROVIDER=cuda) and a CPU worker (prefork, 2 processes pinned to 2
cores, like the 2-core CPU machine), sends predict_batch jobs of 1 to 65,536
rows to each queue, and writes the figures to OUT/gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import redis

from contract.names import TASK_PREDICT_BATCH
from contract.schemas import HealthReport
from producer.client import Client
from producer.settings import ProducerSettings
from stack.embedded_redis import EmbeddedRedis
from stack.processes import celery_env, wait_ready, worker_process
from training.artifact import load_manifest
from worker.health import build_report

BATCHES = [1, 16, 256, 4_096, 65_536]


def gpu_name() -> str:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "none"
    out = subprocess.run(
        [smi, "--query-gpu=name,driver_version", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() or out.stderr.strip()


def through_queue(
    client: Client, queue: str, rows: np.ndarray, batch: int, jobs: int
) -> dict[str, Any]:
    payload = {"rows": rows[:batch].tolist()}
    client.wait(client.send(TASK_PREDICT_BATCH, payload, queue), timeout=300)  # warm
    started = time.perf_counter()
    ids = [client.send(TASK_PREDICT_BATCH, payload, queue) for _ in range(jobs)]
    results = [client.wait(t, timeout=600) for t in ids]
    seconds = time.perf_counter() - started
    inference_ms = [r["latency"]["inference_ms"] for r in results]
    return {
        "batch_rows": batch,
        "jobs": jobs,
        "seconds": round(seconds, 4),
        "rows_per_s": round(batch * jobs / seconds, 1),
        "inference_ms_p50": float(np.percentile(inference_ms, 50)),
        "device": results[0]["device"],
        "provider": results[0]["provider"],
        "predictions": results[0]["predictions"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", default="out/gpu/models")
    parser.add_argument("--out", default=os.environ.get("OUT", "out/gpu"))
    parser.add_argument("--gpu-pythonpath", default=os.environ.get("GPU_PYTHONPATH", ""))
    parser.add_argument("--cpu-pythonpath", default=os.environ.get("CPU_PYTHONPATH", ""))
    parser.add_argument("--allow-cpu-fallback", action="store_true")
    parser.add_argument("--rows-budget", type=int, default=2_000_000, help="rows per batch size")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model_dir)

    from training.train import TrainConfig, run_training

    if not (model_dir / "friedman1" / "CURRENT").exists():
        run_training(TrainConfig(model_dir=model_dir), log=print)
    _, manifest = load_manifest(model_dir, "friedman1")
    rng = np.random.default_rng(0)
    rows = rng.uniform(0, 1, size=(max(BATCHES), manifest.n_features)).astype(np.float32)

    report: dict[str, Any] = {
        "gpu": gpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "model": f"{manifest.name}/{manifest.version}",
        "runs": {},
    }
    with EmbeddedRedis() as server:
        base = {
            "model_dir": model_dir.resolve(),
            "heartbeat_s": 1,
            "max_batch_rows": max(BATCHES),
            "task_time_limit_s": 300,
            "task_soft_time_limit_s": 290,
            "visibility_timeout_s": 3600,
        }
        gpu_env = celery_env(
            server.url,
            provider="cuda",
            allow_cpu_fallback=str(args.allow_cpu_fallback).lower(),
            **base,
        )
        cpu_env = celery_env(server.url, **base)
        if args.gpu_pythonpath:
            gpu_env["PYTHONPATH"] = os.pathsep.join([args.gpu_pythonpath, os.getcwd()])
        if args.cpu_pythonpath:
            cpu_env["PYTHONPATH"] = os.pathsep.join([args.cpu_pythonpath, os.getcwd()])
        gpu = worker_process(
            gpu_env, out / "gpu-worker.log", queue="inference.gpu", name="gpu@check", pool="solo"
        )
        cpu = worker_process(
            cpu_env, out / "cpu-worker.log", queue="inference.cpu", name="cpu@check", concurrency=2
        )
        if shutil.which("taskset"):
            cpu.args = ["taskset", "-c", "0,1", *cpu.args]
        probe = redis.Redis.from_url(server.url)
        try:
            t0 = time.perf_counter()
            gpu.start()
            wait_ready(gpu, probe, "gpu@check", 1, timeout_s=300)
            report["gpu_worker_ready_s"] = round(time.perf_counter() - t0, 2)
            cpu.start()
            wait_ready(cpu, probe, "cpu@check", 2, timeout_s=120)
            with Client(ProducerSettings(redis_url=server.url, wait_timeout_s=600)) as client:
                for batch in BATCHES:
                    jobs = max(4, min(2_000, args.rows_budget // batch))
                    for label, queue in (("gpu", "inference.gpu"), ("cpu", "inference.cpu")):
                        run = through_queue(client, queue, rows, batch, jobs)
                        report["runs"].setdefault(str(batch), {})[label] = run
                    g, c = report["runs"][str(batch)]["gpu"], report["runs"][str(batch)]["cpu"]
                    diff = float(
                        np.max(
                            np.abs(np.array(g.pop("predictions")) - np.array(c.pop("predictions")))
                        )
                    )
                    report["runs"][str(batch)]["gpu_vs_cpu"] = {
                        "throughput_ratio": round(g["rows_per_s"] / c["rows_per_s"], 3),
                        "max_abs_diff": diff,
                    }
                    print(
                        f"batch {batch:>6}: gpu {g['rows_per_s']:>12,.0f} rows/s ({g['device']}), "
                        f"cpu {c['rows_per_s']:>12,.0f} rows/s, "
                        f"ratio {g['rows_per_s'] / c['rows_per_s']:.2f}, "
                        f"max |gpu-cpu| {diff:.2e}",
                        flush=True,
                    )
            health: HealthReport = build_report(probe, probe, ["inference.cpu", "inference.gpu"])
            report["workers"] = [w.model_dump() for w in health.workers]
        finally:
            gpu.stop()
            cpu.stop()
            probe.close()
    for log in ("gpu-worker.log",):
        for line in (out / log).read_text(errors="replace").splitlines():
            if "placement" in line:
                report["gpu_placement_log"] = line.strip()
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
