"""The house rules, checked: imports run one way, and importing a module builds nothing.

Each check runs in a fresh interpreter, so what this test process has imported already
cannot hide a side effect.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Every module of ours but the app module (building the app is its job) and the __main__
# modules (they run their command).
IMPORT_EVERYTHING = """
import importlib, pkgutil, sys
names = []
for top in ("contract", "producer", "training", "worker", "gateway", "stack"):
    package = importlib.import_module(top)
    names.append(top)
    for info in pkgutil.walk_packages(package.__path__, top + "."):
        if info.name != "worker.celery" and not info.name.endswith("__main__"):
            importlib.import_module(info.name)
            names.append(info.name)

import celery._state
import kombu.compression
from kombu.transport import redis as kombu_redis

assert "worker.celery" not in sys.modules, "something imports the app module"
assert not list(celery._state._apps), "an import built a Celery app"
assert kombu_redis.QoS.restore_unacked.__module__ == "kombu.transport.redis", "kombu patched"
import zlib
assert kombu.compression._decoders["application/x-gzip"] is zlib.decompress, "codecs replaced"
print(len(names), "modules imported")
"""


def run_python(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_importing_any_module_builds_no_app_reads_no_settings_and_patches_nothing() -> None:
    # Settings no worker would accept (the visibility timeout is below the time limit it must
    # exceed): a module that read them at import would fail here.
    proc = run_python("-c", IMPORT_EVERYTHING, env={"INFERENCE_TASK_TIME_LIMIT_S": "1000"})
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.split()[0]) > 40


def test_the_app_module_reads_the_settings_and_names_a_bad_one() -> None:
    proc = run_python("-c", "import worker.celery", env={"INFERENCE_TASK_TIME_LIMIT_S": "1000"})
    assert proc.returncode != 0
    assert "visibility_timeout_s (600) must exceed" in proc.stderr


def test_the_producer_cli_imports_neither_pyarrow_onnxruntime_nor_the_tools() -> None:
    proc = run_python("-X", "importtime", "-m", "producer", "--help")
    assert proc.returncode == 0, proc.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()}
    assert "producer.cli" in imported  # the check sees our modules
    for heavy in ("pyarrow", "onnxruntime", "sklearn", "stack", "worker", "training", "gateway"):
        assert heavy not in imported, f"`python -m producer --help` imports {heavy}"


def test_imports_run_one_way() -> None:
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint is None:
        pytest.fail("lint-imports is missing: install the dev extra (import-linter)")
    proc = subprocess.run(
        [lint], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 kept, 0 broken" in proc.stdout
