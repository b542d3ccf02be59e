"""Other services code against task names and JSON alone: a plain Celery client
that imports nothing from this project enqueues by name and reads the result."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.support import RunningWorker, TrainedModel

pytestmark = pytest.mark.integration

PLAIN_CLIENT = r"""
import json, sys
from celery import Celery

url, rows = sys.argv[1], json.loads(sys.argv[2])
app = Celery(broker=url, backend=url)
app.conf.update(task_serializer="json", accept_content=["json"], result_accept_content=["json"])
one = app.send_task("inference.predict", kwargs={"features": rows[0]}, queue="inference.cpu")
many = app.send_task("inference.predict_batch", kwargs={"rows": rows}, queue="inference.cpu")
bad = app.send_task("inference.predict", kwargs={"features": rows[0][:2]}, queue="inference.cpu")
out = {"one": one.get(timeout=30), "many": many.get(timeout=30)}
bad.get(timeout=30, propagate=False)
out["bad_state"] = bad.state
# What any language reads from the result backend: the task's JSON meta document.
out["bad_meta"] = json.loads(app.backend.client.get("celery-task-meta-" + bad.id))
print(json.dumps(out))
"""


def test_plain_celery_client_gets_the_in_process_prediction(
    redis_url: str, cpu_worker: RunningWorker, trained_model: TrainedModel
) -> None:
    rows = trained_model.X_test[:7]
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_CLIENT, redis_url, json.dumps(rows.tolist())],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    expected = trained_model.reference(rows)

    assert out["one"]["prediction"] == pytest.approx(float(expected[0]), abs=1e-6)
    np.testing.assert_allclose(out["many"]["predictions"], expected, atol=1e-6)
    for result in (out["one"], out["many"]):
        assert set(result) >= {
            "model_name",
            "model_version",
            "provider",
            "device",
            "hostname",
            "latency",
        }
        assert set(result["latency"]) == {"queue_wait_ms", "inference_ms", "task_ms"}
    # A plain client sets no enqueued_at header: the queue wait is unknown, not invented.
    assert out["one"]["latency"]["queue_wait_ms"] is None

    assert out["bad_state"] == "FAILURE"
    meta = out["bad_meta"]
    assert meta["status"] == "FAILURE"
    assert meta["result"]["exc_type"] == "FeatureCountMismatch"
    assert meta["result"]["exc_module"] == "producer.errors"
    assert "expects 5" in meta["result"]["exc_message"][0]
