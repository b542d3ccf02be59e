"""Fixtures for the static checks of the deployment files.

Nothing here needs a Docker engine: the compose file and the Dockerfiles are
parsed and checked as text, and validated with check-jsonschema, hadolint and,
when one is installed, a docker compose binary.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

# The helper module sits next to this file; make it importable whatever
# pytest's import mode.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from deploy_helpers import (  # noqa: E402
    COMPOSE_FILE,
    DOCKERFILE_CPU,
    DOCKERFILE_GPU,
    Dockerfile,
    parse_dockerfile,
    settings_env_names,
)

# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def compose_text() -> str:
    return COMPOSE_FILE.read_text()


@pytest.fixture(scope="session")
def compose(compose_text: str) -> dict[str, Any]:
    data = yaml.safe_load(compose_text)
    assert isinstance(data, dict), "docker-compose.yml is not a mapping"
    return data


@pytest.fixture(scope="session")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="session")
def cpu_dockerfile() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE_CPU)


@pytest.fixture(scope="session")
def gpu_dockerfile() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE_GPU)


@pytest.fixture(scope="session")
def env_names() -> set[str]:
    return settings_env_names()
