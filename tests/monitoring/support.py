"""Helpers of the monitoring tests: scrape, read samples, wait for a worker's processes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from contract.names import row_queue
from tests.support import RunningWorker
from worker.health import live_states


@dataclass
class MetricsWorker:
    worker: RunningWorker
    port: int
    queue: str

    @property
    def rows(self) -> str:
        return row_queue(self.queue)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def samples(text: str, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    """The samples named `name` whose labels include `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    found = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                found.append((dict(sample.labels), float(sample.value)))
    return found


def total(text: str, name: str, **labels: str) -> float:
    return sum(value for _, value in samples(text, name, **labels))


def by(text: str, name: str, keys: tuple[str, ...], **labels: str) -> dict[tuple[str, ...], int]:
    """Sample values summed per the values of the labels `keys` (zeros left out)."""
    out: dict[tuple[str, ...], int] = {}
    for labelset, value in samples(text, name, **labels):
        key = tuple(labelset[k] for k in keys)
        out[key] = out.get(key, 0) + int(value)
    return {k: v for k, v in out.items() if v}


def wait_for(what: str, check: Callable[[], Any], timeout_s: float = 60, every: float = 0.2) -> Any:
    """check()'s first true value; fails the test with `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}; last: {value!r}")
        time.sleep(every)


def child_pids(client: redis.Redis, hostname: str) -> set[int]:
    return {s.pid for s in live_states(client, hostname=hostname)}


def kill_child_and_wait_replaced(client: redis.Redis, hostname: str, pid: int, n: int) -> set[int]:
    """SIGKILL pool process `pid`, then wait until `n` processes other than it are live."""
    os.kill(pid, signal.SIGKILL)
    return wait_for(
        f"a replacement of process {pid}",
        lambda: (
            (pids := {p for p in child_pids(client, hostname) if p != pid})
            and len(pids) >= n
            and pids
        ),
    )


def binary(name: str) -> str:
    """The path of an installed binary, or the test skips (CI installs it: .ci/run)."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"`{name}` is not installed (Debian package `prometheus`; see .ci/run)")
    return path


def promtool_check_metrics(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binary("promtool"), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
    )


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
