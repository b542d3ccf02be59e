"""`python -m producer bench`: the report is complete and consistent with itself.

Nothing here asserts speed: the figures depend on the machine and on what else runs on
it. What must hold on any machine: every row comes back, predictions equal the model's,
each ratio is its own numerator over its own denominator, percentiles are ordered, and
the JSON on disk is the report printed.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from producer import bench, bench_jobs, bench_local
from producer.bench_report import RATIOS, compute_goals, compute_ratios, format_report, lookup
from producer.client import Client
from producer.settings import ProducerSettings
from tests.support import RunningWorker, TrainedModel

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report_and_path(
    redis_url: str,
    cpu_worker: RunningWorker,
    trained_model: TrainedModel,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("bench")
    argv = [
        "--quick",
        "--model-dir", str(trained_model.model_dir),
        "--json-out", str(out / "bench.json"),
        "--work-dir", str(out / "work"),
        "--sustained-jobs", "120",
        "--bulk-rows", "6000",
        "--chunk-rows", "700",
        "--in-flight", "3",
    ]  # fmt: skip
    config = bench.config_from_args(_parse(argv))
    settings = ProducerSettings(redis_url=redis_url, wait_timeout_s=30)
    return bench.run_bench(config, settings), out / "bench.json"


@pytest.fixture
def report(report_and_path: tuple[dict[str, Any], Path]) -> dict[str, Any]:
    return report_and_path[0]


def _parse(argv: list[str]) -> Any:
    import argparse

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(argv)


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every mapping in the report, with its dotted path."""
    found: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        found.append((path, node))
        for key, value in node.items():
            found += _walk(value, f"{path}.{key}" if path else key)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _walk(value, f"{path}[{i}]")
    return found


def test_the_json_on_disk_is_the_report(report_and_path: tuple[dict[str, Any], Path]) -> None:
    report, path = report_and_path
    assert json.loads(path.read_text()) == report
    assert report["mode"] == "deployment"
    machine = report["machine"]
    assert machine["cores"] >= 1 and machine["cpu_model"] and machine["python"]
    assert machine["celery"] and machine["onnxruntime"]
    assert "Python" in format_report(report)


def test_every_row_comes_back_and_matches_the_model(report: dict[str, Any]) -> None:
    bulk = report["bulk"]
    assert bulk["rows_in"] == bulk["rows_out"] == bulk["rows_scored"] == 6_000
    assert bulk["chunks"] == math.ceil(6_000 / 700)
    spot = bulk["spot_check"]
    assert spot["rows"] == bench_local.SPOT_CHECK_ROWS
    assert spot["passed"] is True and spot["max_abs_diff"] <= bench_local.SPOT_CHECK_ATOL
    batch = report["batch"]
    assert batch["rows_back"] == batch["rows_sent"] == 2 * batch["jobs"] * batch["rows_per_job"]
    assert report["checks"]["passed"], report["checks"]


def test_the_reference_is_the_served_model(trained_model: TrainedModel) -> None:
    manifest = trained_model.manifest
    local, reason = bench_local.find_local_model(
        trained_model.model_dir, manifest.name, manifest.version
    )
    assert local is not None, reason
    rows = trained_model.X_test[:50]
    np.testing.assert_array_equal(local.predictor(1)(rows), trained_model.reference(rows))
    missing, reason = bench_local.find_local_model(
        trained_model.model_dir, manifest.name, "no-such"
    )
    assert missing is None and reason and "no-such" in reason


def test_single_row_jobs_all_succeed(report: dict[str, Any]) -> None:
    assert report["single_row"]["predict"]["count"] == bench.QUICK["single_jobs"]
    predict = report["sustained"]["predict"]
    assert predict["jobs"] == 120 and predict["failed"] == 0
    assert predict["latency"]["count"] == 120


def test_each_ratio_is_its_numerator_over_its_denominator(report: dict[str, Any]) -> None:
    assert set(report["ratios"]) == {spec.key for spec in RATIOS}
    for key, ratio in report["ratios"].items():
        num, den = ratio["numerator"], ratio["denominator"]
        assert num["value"] == lookup(report, num["path"]), key
        assert den["value"] == lookup(report, den["path"]), key
        if ratio["value"] is None:
            assert ratio["unavailable"], key
        else:
            assert ratio["value"] == pytest.approx(num["value"] / den["value"], rel=1e-12), key
    # Recomputed from the report alone, the ratios are the ones it holds.
    assert compute_ratios(report) == report["ratios"]
    assert report["ratios"]["P1"]["value"] is not None
    assert report["goals"]["P5"]["value"] is None  # only --embedded starts a worker


def test_percentiles_are_ordered(report: dict[str, Any]) -> None:
    checked = 0
    for path, node in _walk(report):
        for unit in ("ms", "us"):
            p50, p95, p99 = (node.get(f"p{q}_{unit}") for q in (50, 95, 99))
            if p50 is None or p95 is None:
                continue
            assert p50 <= p95, path
            if p99 is not None:
                assert p95 <= p99, path
            checked += 1
    assert checked >= 6


def test_noop_is_measured_or_reported_unavailable(report: dict[str, Any]) -> None:
    for part in (report["single_row"]["noop"], report["sustained"]["noop"]):
        if part["available"]:
            assert part.get("count", part.get("jobs"))
        else:
            assert bench.TASK_NOOP in part["reason"]
    if not report["single_row"]["noop"]["available"]:
        assert report["ratios"]["P3"]["value"] is None


def test_p2_compares_the_row_lane_with_plain_celery_side_by_side(report: dict[str, Any]) -> None:
    sustained = report["sustained"]
    ours, plain = sustained["predict"], sustained["plain_celery"]
    assert ours["jobs"] == plain["jobs"] and ours["failed"] == plain["failed"] == 0
    p2 = report["ratios"]["P2"]
    assert p2["value"] == pytest.approx(ours["jobs_per_s"] / plain["jobs_per_s"])
    # The lane's batches account for every predict job of the sustained run.
    batches = ours["batch_sizes"]
    assert batches and sum(batches.values()) >= 1
    assert sum(batches.values()) <= ours["jobs"]


def test_an_unknown_task_is_reported_not_waited_for(
    producer_settings: ProducerSettings, cpu_worker: RunningWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench_jobs, "TASK_NOOP", "inference.bench-test-never-registered")
    with Client(producer_settings) as client:
        reason = bench.probe_noop(client, cpu_worker.queue, timeout_s=5)
    assert reason is not None and "inference.bench-test-never-registered" in reason


def test_quick_shrinks_the_defaults_and_flags_win() -> None:
    full = bench.config_from_args(_parse([]))
    quick = bench.config_from_args(_parse(["--quick", "--bulk-rows", "123"]))
    assert full.sustained_jobs == bench.FULL["sustained_jobs"]
    assert quick.sustained_jobs == bench.QUICK["sustained_jobs"] < full.sustained_jobs
    assert quick.bulk_rows == 123


@pytest.mark.parametrize(
    ("speedup", "size", "loss", "met"),
    [
        (286.0, 4_485_746, 0.0077, True),
        (49.0, 4_485_746, 0.0077, False),
        (286.0, 32_800_000, 0.0, False),
        (286.0, 4_485_746, 0.02, False),
        (286.0, 4_485_746, None, True),
    ],
)
def test_p4_needs_speed_size_and_accuracy_together(
    speedup: float, size: int, loss: float | None, met: bool
) -> None:
    goals = compute_goals(
        {
            "model_goals": {
                "available": True,
                "one_row_speedup": speedup,
                "artifact_bytes": size,
                "r2_loss": loss,
                "measured_at": "t",
                "cores": 2,
            }
        }
    )
    assert goals["P4"]["value"] == speedup and goals["P4"]["met"] is met
    missing = compute_goals({"model_goals": {"available": False, "reason": "no file"}})
    assert missing["P4"]["value"] is None and missing["P4"]["unavailable"] == "no file"


def test_a_ratio_without_its_denominator_is_unavailable() -> None:
    report = {"bulk": {"rows_per_s": 10.0}, "inprocess": {"batch_all_cores": {"rows_per_s": 0}}}
    ratios = compute_ratios(report)
    assert ratios["P1"]["value"] is None and "inprocess" in ratios["P1"]["unavailable"]


def test_embedded_run_starts_and_stops_its_own_redis_and_worker(
    trained_model: TrainedModel, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERENCE_")}
    env.pop("REDIS_URL", None)
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable, "-m", "producer", "bench", "--embedded", "--quick",
            "--model-dir", str(trained_model.model_dir), "--json-out", str(out),
            "--processes", "1", "--single-jobs", "10", "--sustained-jobs", "60",
            "--batch-jobs", "3", "--bulk-rows", "3000", "--inprocess-rows", "2048",
        ],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["mode"] == "embedded"
    ready = report["worker"]["start_to_ready_s"]
    assert ready is not None and ready > 0
    assert report["goals"]["P5"]["value"] == ready
    assert report["checks"]["passed"]
    assert "P5" in proc.stdout and "worker start -> ready" in proc.stdout
    # The worker was stopped with the run, not left behind.
    assert "Warm shutdown" in Path(report["worker"]["log"]).read_text()
