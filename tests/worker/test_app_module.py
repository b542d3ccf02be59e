"""The worker app module: importing it registers the tasks and loads no model (a unit
test: a fresh interpreter, no Redis, no worker process)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_importing_the_app_loads_no_model(tmp_path: Path) -> None:
    code = (
        "import worker.celery, worker.runtime as r\n"
        "app = worker.celery.app\n"
        "app.loader.import_default_modules()\n"
        "assert r._current is None\n"
        "print(sorted(t for t in app.tasks if t.startswith('inference.')))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={"INFERENCE_MODEL_DIR": str(tmp_path / "absent"), "PATH": ""},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    tasks = "'inference.health', 'inference.noop', 'inference.predict', 'inference.predict_batch'"
    assert tasks in proc.stdout
