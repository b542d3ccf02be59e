"""deploy/prometheus: the config and the alerting rules pass promtool, the rules' unit tests
pass, and the config scrapes what docker-compose.yml runs.

promtool comes from Debian's `prometheus` package, which .ci/run installs; the promtool
tests skip only where it is absent.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_helpers import (
    PROMETHEUS_DIR,
    REPO_ROOT,
    command_argv,
    exposed_series,
    find_tool,
    option_value,
    promql_metric_names,
    resolve_defaults,
    service_environment,
)

from contract.names import QUEUES, row_queue
from stack.embedded_redis import free_port
from stack.processes import CeleryProcess, wait_http

CONFIG = PROMETHEUS_DIR / "prometheus.yml"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yml"
TIMEOUT_S = 120

# What the rules must cover, by alert name.
EXPECTED_ALERTS = {
    "InferenceQueueWithoutWorkers",
    "InferenceOldestJobTooOld",
    "InferenceErrorRatioHigh",
    "InferenceServingDecisionRefused",
}


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    tool = find_tool("promtool")
    if tool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus; .ci/run does)")
    return subprocess.run(
        [tool, *map(str, args)],
        cwd=PROMETHEUS_DIR,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def _report(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return yaml.safe_load(CONFIG.read_text())


@pytest.fixture(scope="module")
def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _scrape_job(config: dict[str, Any], name: str) -> dict[str, Any]:
    for job in config["scrape_configs"]:
        if job["job_name"] == name:
            return job
    raise AssertionError(f"prometheus.yml has no scrape job {name!r}")


# --------------------------------------------------------------------------
# promtool
# --------------------------------------------------------------------------


def test_promtool_check_config() -> None:
    proc = promtool("check", "config", CONFIG)
    assert proc.returncode == 0, _report(proc)
    # The rule file is found and loaded along with the config.
    assert "1 rule files found" in proc.stdout + proc.stderr, _report(proc)


def test_promtool_check_rules() -> None:
    proc = promtool("check", "rules", ALERTS)
    assert proc.returncode == 0, _report(proc)


def test_promtool_alert_unit_tests() -> None:
    proc = promtool("test", "rules", ALERTS_TEST)
    assert proc.returncode == 0, _report(proc)
    assert "SUCCESS" in proc.stdout + proc.stderr, _report(proc)


def test_promtool_unit_tests_catch_a_broken_rule(tmp_path: Path) -> None:
    """The unit tests pin the thresholds: a rule file with the age threshold moved fails them."""
    text = ALERTS.read_text()
    moved = re.sub(r"(inference_queue_oldest_age_seconds\) >) 60\b", r"\1 600", text)
    assert moved != text
    (tmp_path / "alerts.yml").write_text(moved)
    (tmp_path / "alerts_test.yml").write_text(ALERTS_TEST.read_text())
    proc = promtool("test", "rules", tmp_path / "alerts_test.yml")
    assert proc.returncode != 0, _report(proc)
    assert "InferenceOldestJobTooOld" in proc.stdout + proc.stderr


# --------------------------------------------------------------------------
# The rules, as data
# --------------------------------------------------------------------------


def test_expected_alerts_exist(rules: list[dict[str, Any]]) -> None:
    names = {rule.get("alert") for rule in rules}
    assert names >= EXPECTED_ALERTS, EXPECTED_ALERTS - names


def test_rules_use_only_exposed_metrics(rules: list[dict[str, Any]]) -> None:
    # `up` is Prometheus' own series for every scrape target.
    allowed = exposed_series() | {"up"}
    for rule in rules:
        unknown = promql_metric_names(rule["expr"]) - allowed
        assert not unknown, f"{rule.get('alert')}: unknown metrics {sorted(unknown)}"


def test_every_alert_has_a_severity_and_a_summary(rules: list[dict[str, Any]]) -> None:
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]


def test_no_worker_alert_waits_two_minutes(rules: list[dict[str, Any]]) -> None:
    rule = next(r for r in rules if r.get("alert") == "InferenceQueueWithoutWorkers")
    assert rule["for"] == "2m"
    assert {"inference_queue_depth", "inference_workers_live"} <= promql_metric_names(rule["expr"])


def test_unit_tests_use_the_queues_the_code_uses() -> None:
    """alerts_test.yml's example series name real queues: a rename in contract.names
    that the examples miss fails here."""
    known = set(QUEUES.values()) | {row_queue(q) for q in QUEUES.values()}
    used = set(re.findall(r'queue="([^"]+)"', ALERTS_TEST.read_text()))
    used |= set(re.findall(r"^\s*queue: (\S+)$", ALERTS_TEST.read_text(), flags=re.MULTILINE))
    assert used, "alerts_test.yml names no queue"
    assert used <= known, f"not queues of contract.names: {sorted(used - known)}"
    # Each kind is exercised: a Celery queue and a row queue.
    assert used & set(QUEUES.values()) and used - set(QUEUES.values())


# --------------------------------------------------------------------------
# The config against docker-compose.yml
# --------------------------------------------------------------------------


def test_rule_file_is_loaded(config: dict[str, Any]) -> None:
    assert [(CONFIG.parent / f).resolve() for f in config["rule_files"]] == [ALERTS.resolve()]


def test_workers_are_scraped_on_their_metrics_port(
    config: dict[str, Any], services: dict[str, Any]
) -> None:
    """Every worker service is discovered by name (so --scale is followed) on the port its
    INFERENCE_METRICS_PORT sets."""
    job = _scrape_job(config, "inference-workers")
    discovered = {
        name: sd["port"]
        for sd in job["dns_sd_configs"]
        for name in sd["names"]
        if sd.get("type", "SRV") == "A"
    }
    workers = {
        name: service
        for name, service in services.items()
        if command_argv(service.get("command"))[:4] == ["celery", "-A", "worker", "worker"]
    }
    assert set(workers) == {"worker-cpu", "worker-gpu"}
    for name, service in workers.items():
        env = resolve_defaults(service_environment(service))
        assert name in discovered, f"{name} is not scraped"
        assert str(discovered[name]) == env.get("INFERENCE_METRICS_PORT"), name
        assert "container_name" not in service


def test_exporter_is_scraped_on_its_port(config: dict[str, Any], services: dict[str, Any]) -> None:
    exporter = services["exporter"]
    argv = [*command_argv(exporter.get("entrypoint")), *command_argv(exporter.get("command"))]
    assert argv[:4] == ["python", "-m", "producer", "metrics"], argv
    port = option_value(argv, "--port")
    targets = [
        t
        for sc in _scrape_job(config, "inference-exporter")["static_configs"]
        for t in sc["targets"]
    ]
    assert targets == [f"exporter:{port}"]
    # One exporter: each queue's series exists once.
    assert exporter.get("deploy", {}).get("replicas", 1) == 1


def test_compose_mounts_this_config(services: dict[str, Any]) -> None:
    prometheus = services["prometheus"]
    assert prometheus.get("profiles") == ["monitoring"]
    argv = command_argv(prometheus["command"])
    config_file = option_value(argv, "--config.file")
    assert config_file is not None
    mounts = {m["target"]: m for m in prometheus["volumes"] if isinstance(m, dict)}
    mount = mounts[str(Path(config_file).parent)]
    assert (REPO_ROOT / mount["source"]).resolve() == PROMETHEUS_DIR.resolve()
    assert mount.get("read_only") is True
    assert Path(config_file).name == CONFIG.name


# --------------------------------------------------------------------------
# Prometheus itself, started with this config
# --------------------------------------------------------------------------


def test_prometheus_loads_the_config_and_the_rules(tmp_path: Path) -> None:
    """Debian's prometheus, started with prometheus.yml and alerts.yml as shipped, loads every
    rule and every scrape job (the compose targets do not resolve here, so none is up)."""
    binary = find_tool("prometheus")
    if binary is None:
        pytest.skip(
            "prometheus is not installed (Debian: apt-get install prometheus; .ci/run does)"
        )
    port = free_port()
    process = CeleryProcess(
        [
            binary,
            f"--config.file={CONFIG}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        env={},
        log_path=tmp_path / "prometheus.log",
    ).start()
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(process, f"{base}/-/ready", timeout_s=60)

        def get(path: str) -> Any:
            with urllib.request.urlopen(base + path, timeout=10) as response:
                body = json.load(response)
            assert body["status"] == "success", body
            return body["data"]

        loaded = {
            rule["name"] for group in get("/api/v1/rules")["groups"] for rule in group["rules"]
        }
        shipped = {
            rule["alert"]
            for group in yaml.safe_load(ALERTS.read_text())["groups"]
            for rule in group["rules"]
        }
        assert loaded == shipped
        config = yaml.safe_load(get("/api/v1/status/config")["yaml"])
        jobs = {job["job_name"] for job in config["scrape_configs"]}
        assert {"inference-workers", "inference-exporter"} <= jobs
    finally:
        process.stop()
