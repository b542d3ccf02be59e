"""`python -m stack.bench explain`: SHAP explanations per second, against shap itself.

In one run, on the same held-out rows of a model trained here with the default
configuration:

1. shap's TreeExplainer (path-dependent) on the scikit-learn forest, one core;
2. explain.onnx in this process with onnxruntime, one thread; the values are checked
   against shap's (max |diff|) and the predictions (additivity);
3. unless --no-queue: a private redis-server and a one-process CPU worker serving
   inference.explain: single-row jobs through the row lane, and `score --explain` of a
   generated CSV file (producer.bulk), end to end.

It prints rows/s and the ratios: explain.onnx / shap (goal >= 10) and through the queue /
in-process. shap is a development dependency (the dev extra). Only the ratios of one run
compare: the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import redis

from contract.errors import BenchError
from producer.bulk import score_csv
from producer.client import Client
from producer.settings import ProducerSettings
from stack.embedded_redis import EmbeddedRedis
from stack.processes import celery_env, wait_ready, worker_process

PARITY_ATOL = 1e-5
ADDITIVITY_ATOL = 1e-4


def _rate(rows: int, seconds: float) -> float:
    return rows / seconds if seconds > 0 else float("inf")


def inprocess(rows: int, say: Callable[[str], None], work: Path) -> dict[str, Any]:
    """Train the default model, time shap and explain.onnx on the same rows, compare them."""
    try:
        import shap
    except ImportError:
        raise BenchError("shap is not installed here: pip install '.[dev]'") from None
    from training.artifact import load_manifest
    from training.export import cpu_session, pipeline_steps
    from training.importance import explain_rows
    from training.train import TrainConfig, run_training

    say("training the default model (python -m training's configuration)")
    outcome = run_training(TrainConfig(model_dir=work / "models"))
    version_dir, manifest = load_manifest(work / "models", outcome.manifest.name)
    if manifest.base_value is None or "explain" not in manifest.files:
        raise BenchError("the trained model has no explain.onnx")
    X = outcome.X_test[:rows]
    scaler, forest = pipeline_steps(outcome.pipeline)
    # The rows as the forest sees them: scaled in float64, then float32.
    scaled = scaler.transform(X).astype(np.float32).astype(np.float64)

    say(f"shap {shap.__version__} TreeExplainer on {len(X)} rows, one core")
    explainer = shap.TreeExplainer(forest, feature_perturbation="tree_path_dependent")
    explainer.shap_values(scaled[:10], check_additivity=False)
    start = time.perf_counter()
    theirs = np.asarray(explainer.shap_values(scaled, check_additivity=False))
    shap_s = time.perf_counter() - start

    say(f"explain.onnx on the same {len(X)} rows, one onnxruntime thread")
    session = cpu_session((version_dir / manifest.files["explain"].path).read_bytes(), threads=1)
    explain_rows(session, X[:32])
    start = time.perf_counter()
    ours = explain_rows(session, X)
    ours_s = time.perf_counter() - start

    diff = float(np.abs(ours - theirs).max())
    gap = float(np.abs(manifest.base_value + ours.sum(axis=1) - outcome.pipeline.predict(X)).max())
    return {
        "model_dir": str(work / "models"),
        "model_version": manifest.version,
        "rows": len(X),
        "shap_version": shap.__version__,
        "shap_rows_per_s": _rate(len(X), shap_s),
        "explain_onnx_rows_per_s": _rate(len(X), ours_s),
        "ratio_vs_shap": shap_s / ours_s if ours_s > 0 else float("inf"),
        "max_abs_diff_vs_shap": diff,
        "max_abs_additivity": gap,
        "parity_ok": diff <= PARITY_ATOL and gap <= ADDITIVITY_ATOL,
        "X": X,
    }


def through_queue(
    model_dir: Path, X: np.ndarray, jobs: int, bulk_rows: int, chunk_rows: int, work: Path,
    say: Callable[[str], None],
) -> dict[str, Any]:  # fmt: skip
    """Single-row explain jobs and bulk explain chunks through a one-process worker."""
    with EmbeddedRedis() as server:
        env = celery_env(server.url, model_dir=model_dir.resolve(), intra_op_threads=1)
        for name in ("INFERENCE_BROKER_URL", "INFERENCE_RESULT_BACKEND", "INFERENCE_MODEL_VERSION"):
            env.pop(name, None)
        hostname = f"bench-explain-{os.getpid()}@{socket.gethostname()}"
        worker = worker_process(
            env, work / "worker.log", queue="inference.cpu", name=hostname, concurrency=1
        )
        say(f"starting a one-process CPU worker; log {work / 'worker.log'}")
        probe = redis.Redis.from_url(server.url)
        worker.start()
        try:
            try:
                wait_ready(worker, probe, hostname, 1, timeout_s=120.0)
            finally:
                probe.close()
            settings = ProducerSettings(redis_url=server.url, broker_url=None, result_backend=None)
            with Client(settings) as client:
                return _measure_queue(client, X, jobs, bulk_rows, chunk_rows, work, say)
        finally:
            worker.stop()


def _measure_queue(
    client: Client, X: np.ndarray, jobs: int, bulk_rows: int, chunk_rows: int, work: Path,
    say: Callable[[str], None],
) -> dict[str, Any]:  # fmt: skip
    rows = np.resize(X, (max(jobs, 1), X.shape[1]))
    client.wait(client.submit_explain(rows[:1].tolist()))  # warm the path
    say(f"{jobs} single-row explain jobs through the row lane, all in flight")
    start = time.perf_counter()
    ids = [client.submit_explain([r.tolist()]) for r in rows[:jobs]]
    for status in client.iter_finished(ids, timeout=600):
        if status.state != "SUCCESS":
            raise BenchError(f"explain job {status.task_id} ended {status.state}: {status.error}")
    single_s = time.perf_counter() - start

    bulk = np.resize(X, (bulk_rows, X.shape[1])).astype(np.float32)
    src, dst = work / "bulk.csv", work / "bulk-explained.csv"
    names = [f"x{i}" for i in range(bulk.shape[1])]
    pa_csv.write_csv(pa.table({n: bulk[:, i] for i, n in enumerate(names)}), src)
    say(f"score --explain of a {bulk_rows}-row CSV file, chunks of {chunk_rows}, two in flight")
    summary = score_csv(
        client, src, dst, chunk_rows=chunk_rows, max_in_flight=2, progress=False, explain=True
    )
    if summary.rows != bulk_rows:
        raise BenchError(f"score --explain wrote {summary.rows} rows of {bulk_rows}")
    bulk_s = summary.seconds
    return {
        "single_row_jobs": jobs,
        "single_row_rows_per_s": _rate(jobs, single_s),
        "bulk_rows": bulk_rows,
        "bulk_chunk_rows": chunk_rows,
        "bulk_rows_per_s": _rate(bulk_rows, bulk_s),
    }


def report_lines(result: dict[str, Any]) -> list[str]:
    local = result["inprocess"]
    lines = [
        f"explain bench: model {local['model_version']}, {local['rows']} held-out rows, "
        "one core each",
        f"  {'shap ' + local['shap_version'] + ' TreeExplainer':<28}"
        f"{local['shap_rows_per_s']:>10,.0f} rows/s",
        f"  explain.onnx (onnxruntime)  {local['explain_onnx_rows_per_s']:>10,.0f} rows/s  "
        f"= {local['ratio_vs_shap']:.1f}x shap (goal >= 10x)",
        f"  parity: max |explain.onnx - shap| {local['max_abs_diff_vs_shap']:.2g} "
        f"(<= {PARITY_ATOL:g}), additivity {local['max_abs_additivity']:.2g} "
        f"(<= {ADDITIVITY_ATOL:g}): {'ok' if local['parity_ok'] else 'FAILED'}",
    ]
    queue = result.get("queue")
    if queue:
        base = local["explain_onnx_rows_per_s"]
        for label, key in (
            (f"single-row jobs ({queue['single_row_jobs']})", "single_row_rows_per_s"),
            (f"score --explain, {queue['bulk_rows']} rows", "bulk_rows_per_s"),
        ):
            rate = queue[key]
            lines.append(
                f"  queue, {label:<26}{rate:>10,.0f} rows/s  = {rate / base:.2f}x in-process, "
                f"{rate / local['shap_rows_per_s']:.1f}x shap"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stack.bench explain",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rows", type=int, default=1000, help="held-out rows (default 1000)")
    parser.add_argument("--no-queue", action="store_true", help="in-process figures only")
    parser.add_argument("--jobs", type=int, default=500, help="single-row explain jobs")
    parser.add_argument("--bulk-rows", type=int, default=20_000)
    parser.add_argument("--chunk-rows", type=int, default=2_000)
    parser.add_argument("--json-out", type=Path, default=Path("out/bench-explain.json"))
    args = parser.parse_args(argv)

    def say(message: str) -> None:
        print(f"bench: {message}", file=sys.stderr, flush=True)

    for name in ("rows", "jobs", "bulk_rows", "chunk_rows"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    try:
        with tempfile.TemporaryDirectory(prefix="bench-explain-") as tmp:
            work = Path(tmp)
            local = inprocess(args.rows, say, work)
            X = local.pop("X")
            result: dict[str, Any] = {"inprocess": local}
            if not args.no_queue:
                result["queue"] = through_queue(
                    Path(local["model_dir"]), X, args.jobs, args.bulk_rows, args.chunk_rows,
                    work, say,
                )  # fmt: skip
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(report_lines(result)))
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"JSON: {args.json_out}")
    return 0 if local["parity_ok"] else 1
