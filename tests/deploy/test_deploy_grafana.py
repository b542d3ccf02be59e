"""deploy/grafana: the provisioned datasource and dashboard are consistent with each other,
with docker-compose.yml and with the metrics the workers and the exporter expose; every
panel's PromQL parses (promtool, through a generated rule file)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_helpers import (
    GRAFANA_DIR,
    REPO_ROOT,
    dashboard_panels,
    exposed_series,
    find_tool,
    grafana_expr_for_prometheus,
    promql_metric_names,
    resolve_defaults,
    service_environment,
)

DASHBOARD = GRAFANA_DIR / "dashboards" / "inference.json"
DATASOURCES = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = GRAFANA_DIR / "provisioning" / "dashboards" / "inference.yml"


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return dashboard_panels(dashboard["panels"])


@pytest.fixture(scope="module")
def queries(panels: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(panel title, expression) for every query of every panel."""
    return [(p["title"], t["expr"]) for p in panels for t in p.get("targets", [])]


def _variables(dashboard: dict[str, Any]) -> dict[str, str]:
    """The dashboard's own variables, each as the value its `All` option stands for."""
    return {v["name"]: v.get("allValue", ".*") for v in dashboard["templating"]["list"]}


def _titles_using(panels: list[dict[str, Any]], pattern: str) -> list[str]:
    return [
        p["title"]
        for p in panels
        if any(re.search(pattern, t["expr"]) for t in p.get("targets", []))
    ]


# --------------------------------------------------------------------------
# Queries
# --------------------------------------------------------------------------


def test_panels_query_only_exposed_metrics(queries: list[tuple[str, str]]) -> None:
    allowed = exposed_series()
    assert queries
    for title, expr in queries:
        names = promql_metric_names(expr)
        assert names, f"{title}: selects no metric: {expr}"
        assert names <= allowed, f"{title}: unknown metrics {sorted(names - allowed)}"


def test_every_query_parses(
    dashboard: dict[str, Any], queries: list[tuple[str, str]], tmp_path: Path
) -> None:
    """Each panel query, variables substituted, as a recording rule: `promtool check rules`
    parses every expression."""
    tool = find_tool("promtool")
    if tool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus; .ci/run does)")
    variables = _variables(dashboard)
    rules = []
    for i, (_title, expr) in enumerate(queries):
        concrete = grafana_expr_for_prometheus(expr, variables)
        assert "$" not in concrete, f"unsubstituted variable in {concrete}"
        rules.append({"record": f"dashboard:query_{i}", "expr": concrete})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = subprocess.run(
        [tool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    assert f"SUCCESS: {len(rules)} rules found" in proc.stdout, proc.stdout


def test_promtool_rejects_a_broken_query(tmp_path: Path) -> None:
    """The parse check above is a real one."""
    tool = find_tool("promtool")
    if tool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus; .ci/run does)")
    path = tmp_path / "broken.yml"
    rule = {"record": "dashboard:broken", "expr": "sum by (queue (rate(inference_jobs_total[1m]))"}
    path.write_text(yaml.safe_dump({"groups": [{"name": "broken", "rules": [rule]}]}))
    proc = subprocess.run(
        [tool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode != 0


def test_metric_name_extraction() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (queue, le) (rate(inference_task_seconds_bucket"
        '{queue=~"$queue", outcome="failure"}[$__rate_interval]))) > 1e3 unless on (queue) '
        "inference_workers_live offset 5m"
    )
    assert promql_metric_names(expr) == {"inference_task_seconds_bucket", "inference_workers_live"}


# --------------------------------------------------------------------------
# What the dashboard shows
# --------------------------------------------------------------------------


def test_throughput_and_errors(panels: list[dict[str, Any]]) -> None:
    assert _titles_using(panels, r"rate\(inference_jobs_total\{[^}]*\}")
    assert _titles_using(panels, r"rate\(inference_rows_total")
    assert _titles_using(panels, r'inference_jobs_total\{[^}]*outcome="failure"')


def test_queue_depth_and_age_per_queue(panels: list[dict[str, Any]]) -> None:
    for metric in ("inference_queue_depth", "inference_queue_oldest_age_seconds"):
        assert _titles_using(panels, rf"by \(queue\) \({metric}\b"), metric


@pytest.mark.parametrize(
    "histogram",
    [
        "inference_task_seconds",
        "inference_queue_wait_seconds",
        "inference_compute_seconds",
        "inference_lane_batch_size",
    ],
)
def test_quantiles_p50_p95_p99(panels: list[dict[str, Any]], histogram: str) -> None:
    """Each histogram is shown at p50, p95 and p99 in one panel, quantiles over `le`."""
    found = set()
    for panel in panels:
        for target in panel.get("targets", []):
            m = re.match(
                rf"histogram_quantile\((0\.\d+), sum by \([^)]*\ble\b[^)]*\) "
                rf"\(rate\({histogram}_bucket\b",
                target["expr"],
            )
            if m:
                found.add((panel["title"], m.group(1)))
    quantiles_by_panel: dict[str, set[str]] = {}
    for title, q in found:
        quantiles_by_panel.setdefault(title, set()).add(q)
    assert {"0.5", "0.95", "0.99"} in quantiles_by_panel.values(), quantiles_by_panel


def test_model_version_per_worker(panels: list[dict[str, Any]]) -> None:
    [panel] = [p for p in panels if _titles_using([p], r"inference_model_info")]
    assert panel["type"] == "table"
    [target] = panel["targets"]
    grouping = re.search(r"by \(([^)]*)\)", target["expr"])
    assert grouping
    assert {"hostname", "model", "version"} <= {g.strip() for g in grouping.group(1).split(",")}
    assert target.get("instant") is True and target.get("format") == "table"


def test_shadow_rows_and_disagreement(panels: list[dict[str, Any]]) -> None:
    """Shadowed and skipped rows per second, and the mean (sum over count) and p99 of
    |challenger - champion|, each per model, champion version and challenger."""
    pair = r"model, version, challenger"
    assert _titles_using(panels, rf"sum by \({pair}\) \(rate\(inference_shadow_rows_total\[")
    assert _titles_using(
        panels, rf"sum by \({pair}, reason\) \(rate\(inference_shadow_skipped_rows_total\["
    )
    [panel] = _titles_using(panels, r"inference_shadow_abs_diff_sum")
    exprs = [t["expr"] for p in panels if p["title"] == panel for t in p["targets"]]
    assert any(
        re.search(
            r"abs_diff_sum\[[^]]*\]\)\) / sum by \([^)]*\) \(rate\(inference_shadow_abs_diff_count",
            e,
        )
        for e in exprs
    ), exprs
    assert any(
        e.startswith(
            f"histogram_quantile(0.99, sum by ({pair}, le) (rate(inference_shadow_abs_diff_bucket"
        )
        for e in exprs
    ), exprs


def test_panels_have_unique_ids_and_fit_the_grid(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]


# --------------------------------------------------------------------------
# Provisioning, against docker-compose.yml
# --------------------------------------------------------------------------


def test_panels_use_the_provisioned_datasource(
    dashboard: dict[str, Any], panels: list[dict[str, Any]]
) -> None:
    [datasource] = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    refs = [p["datasource"] for p in panels] + [
        t["datasource"] for p in panels for t in p.get("targets", []) if "datasource" in t
    ]
    refs += [v["datasource"] for v in dashboard["templating"]["list"] if "datasource" in v]
    assert refs
    for ref in refs:
        assert ref == {"type": "prometheus", "uid": datasource["uid"]}


def test_compose_provisions_grafana(services: dict[str, Any]) -> None:
    grafana = services["grafana"]
    assert grafana.get("profiles") == ["monitoring"]
    mounts = {m["target"]: m for m in grafana["volumes"] if isinstance(m, dict)}
    provisioning = mounts["/etc/grafana/provisioning"]
    assert (REPO_ROOT / provisioning["source"]).resolve() == (
        GRAFANA_DIR / "provisioning"
    ).resolve()
    # The dashboards provider reads the folder compose mounts the dashboard JSON at.
    [provider] = yaml.safe_load(PROVIDERS.read_text())["providers"]
    dashboards = mounts[provider["options"]["path"]]
    assert (REPO_ROOT / dashboards["source"]).resolve() == DASHBOARD.parent.resolve()
    home = resolve_defaults(service_environment(grafana))[
        "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"
    ]
    assert (
        Path(home).parent == Path(provider["options"]["path"]) and Path(home).name == DASHBOARD.name
    )
    # Grafana's datasource URL names the compose service Prometheus runs as.
    assert "prometheus" in services
    for mount in mounts.values():
        assert mount.get("read_only") is True, mount["target"]
