""".dockerignore keeps local state out of the build context but lets the package in."""

from __future__ import annotations

import re

import pytest
from deploy_helpers import DOCKERIGNORE


def _patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """(negated, regex) per line, following Docker's rules closely enough for these paths:
    patterns are relative to the context root, `*` stays within one path segment, `**`
    spans segments, and excluding a directory excludes what is under it."""
    rules = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        line = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(line):
            if line.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif line.startswith("**", i):
                regex += ".*"
                i += 2
            elif line[i] == "*":
                regex += "[^/]*"
                i += 1
            elif line[i] == "?":
                regex += "[^/]"
                i += 1
            elif line[i] == "[":
                end = line.index("]", i)
                regex += line[i : end + 1]
                i = end + 1
            else:
                regex += re.escape(line[i])
                i += 1
        rules.append((negated, re.compile(rf"^{regex}(?:/.*)?$")))
    return rules


def _excluded(path: str) -> bool:
    excluded = False
    for negated, pattern in _patterns():
        if pattern.match(path):
            excluded = not negated
    return excluded


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        "models/friedman1/CURRENT",
        "tests/deploy/conftest.py",
        "deploy/k8s/kustomization.yaml",
        ".pytest_cache/v/cache/nodeids",
        ".mypy_cache/3.11/x.json",
        ".ruff_cache/CACHEDIR.TAG",
        ".hypothesis/examples/x",
        "worker/__pycache__/app.cpython-312.pyc",
        "queue_inference.egg-info/PKG-INFO",
        "build/lib/worker/app.py",
        ".env",
    ],
)
def test_local_state_is_excluded(path: str) -> None:
    assert _excluded(path), f"{path} would be sent to the Docker build context"


@pytest.mark.parametrize(
    "path",
    [
        "pyproject.toml",
        "README.md",
        "contract/names.py",
        "producer/client.py",
        "worker/celery.py",
        "worker/broker/take.lua",
        "worker/lane/store.lua",
        "training/__init__.py",
        "Dockerfile.worker",
        "Dockerfile.worker-gpu",
    ],
)
def test_package_sources_are_included(path: str) -> None:
    assert not _excluded(path), f"{path} is needed by the image build but .dockerignore drops it"
