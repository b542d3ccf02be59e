"""`python -m stack.bench explain`, end to end on small sizes: parity holds, every figure
is there and each ratio is the quotient it names. Nothing here asserts speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_explain_bench_reports_parity_and_ratios(tmp_path: Path) -> None:
    pytest.importorskip("shap")
    out = tmp_path / "bench-explain.json"
    proc = subprocess.run(
        [sys.executable, "-m", "stack.bench", "explain", "--rows", "40", "--jobs", "6",
         "--bulk-rows", "150", "--chunk-rows", "50", "--json-out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    local, queue = report["inprocess"], report["queue"]
    assert local["rows"] == 40 and local["parity_ok"] is True
    assert local["max_abs_diff_vs_shap"] <= 1e-5 and local["max_abs_additivity"] <= 1e-4
    ratio = local["shap_rows_per_s"] and local["explain_onnx_rows_per_s"] / local["shap_rows_per_s"]
    assert local["ratio_vs_shap"] == pytest.approx(ratio, rel=1e-9)
    assert queue["single_row_jobs"] == 6 and queue["bulk_rows"] == 150
    assert queue["single_row_rows_per_s"] > 0 and queue["bulk_rows_per_s"] > 0
    assert f"= {local['ratio_vs_shap']:.1f}x shap" in proc.stdout
    assert "score --explain, 150 rows" in proc.stdout
