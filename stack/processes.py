"""Start and stop `celery worker`, `celery beat` and gateway processes (demo, benchmark, tests).

A worker counts as ready when each of its processes has published its state,
which it does only after its model is loaded and warmed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

from worker.health import live_states


class CeleryProcess:
    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.args = args
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> CeleryProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signum)

    def wait(self, timeout_s: float) -> int | None:
        """The exit code, once the process has exited by itself; None if it is still running."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM (warm shutdown: running jobs finish), then SIGKILL to the group if needed."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


def celery_env(redis_url: str, **settings: object) -> dict[str, str]:
    """The current environment plus REDIS_URL and INFERENCE_<NAME> settings."""
    env = dict(os.environ)
    env["REDIS_URL"] = redis_url
    env.pop("INFERENCE_REDIS_URL", None)
    for name, value in settings.items():
        env[f"INFERENCE_{name.upper()}"] = str(value)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def worker_process(
    env: dict[str, str],
    log_path: Path,
    *,
    queue: str,
    name: str,
    pool: str = "prefork",
    concurrency: int = 1,
    loglevel: str = "INFO",
    events: bool = False,
) -> CeleryProcess:
    """`celery worker`; `events`: with task events on from the start (-E)."""
    args = [
        sys.executable, "-m", "celery", "-A", "worker", "worker",
        "-Q", queue, "-P", pool, "-c", str(concurrency), "-n", name,
        "--loglevel", loglevel, "--without-mingle", "--without-gossip",
    ]  # fmt: skip
    if events:
        args.append("-E")
    return CeleryProcess(args, env, log_path)


def flower_process(env: dict[str, str], log_path: Path, port: int) -> CeleryProcess:
    """Flower on 127.0.0.1:`port`, its API open (FLOWER_UNAUTHENTICATED_API): it turns the
    workers' task events on itself (enable_events)."""
    env = {**env, "FLOWER_UNAUTHENTICATED_API": "true"}
    args = [
        sys.executable, "-m", "celery", "-A", "worker", "flower",
        "--address=127.0.0.1", f"--port={port}",
    ]  # fmt: skip
    return CeleryProcess(args, env, log_path)


def beat_process(env: dict[str, str], log_path: Path, schedule: Path) -> CeleryProcess:
    args = [
        sys.executable, "-m", "celery", "-A", "worker", "beat",
        "--loglevel", "INFO", "--schedule", str(schedule),
    ]  # fmt: skip
    return CeleryProcess(args, env, log_path)


def gateway_process(env: dict[str, str], log_path: Path, port: int) -> CeleryProcess:
    """`python -m gateway` on 127.0.0.1:`port` (a subprocess like the Celery ones)."""
    args = [sys.executable, "-m", "gateway", "--host", "127.0.0.1", "--port", str(port)]
    return CeleryProcess(args, env, log_path)


def wait_http(process: CeleryProcess, url: str, timeout_s: float = 30) -> None:
    """Block until `url` answers 200 (the process's log tail if it exits first)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        if not process.running:
            raise RuntimeError(f"{process.args[2]} exited:\n{process.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer in {timeout_s:g}s:\n{process.log_tail()}")
        time.sleep(0.1)


def wait_ready(
    worker: CeleryProcess, client: redis.Redis, hostname: str, processes: int, timeout_s: float = 60
) -> None:
    """Block until `processes` processes of worker `hostname` have loaded their model."""
    deadline = time.monotonic() + timeout_s
    while True:
        if not worker.running:
            raise RuntimeError(f"worker {hostname} exited:\n{worker.log_tail()}")
        if len(live_states(client, hostname=hostname)) >= processes:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"worker {hostname} not ready in {timeout_s}s:\n{worker.log_tail()}")
        time.sleep(0.1)
