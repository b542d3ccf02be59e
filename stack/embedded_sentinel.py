"""A Redis Sentinel setup of child processes: a primary, a replica and three sentinels.

For tests and demos of failover: `with SentinelCluster() as cluster:` gives `cluster.url`
(kombu's `sentinel://...;sentinel://...` list) and `cluster.master` (the name the sentinels
watch); `cluster.kill_primary()` SIGKILLs the primary, and the sentinels promote the replica
within a few seconds (down-after 1 s). The sentinels run the same redis-server binary as
EmbeddedRedis (`redis-server <config> --sentinel`).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

from contract.errors import RedisServerExited
from stack.embedded_redis import EmbeddedRedis, free_port, redis_server_binary

MASTER = "inference"
DOWN_AFTER_MS = 1_000


class SentinelCluster:
    def __init__(self, sentinels: int = 3, appendonly: bool = True) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="inference-sentinel-"))
        self.master = MASTER
        self.primary = EmbeddedRedis(appendonly=appendonly, data_dir=self._sub("primary"))
        self.replica = EmbeddedRedis(
            appendonly=appendonly,
            data_dir=self._sub("replica"),
            extra_args=("--replicaof", "127.0.0.1", str(self.primary.port)),
        )
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self._sentinels: list[subprocess.Popen[bytes]] = []

    def _sub(self, name: str) -> Path:
        path = self.dir / name
        path.mkdir()
        return path

    @property
    def url(self) -> str:
        return ";".join(f"sentinel://127.0.0.1:{port}/0" for port in self.sentinel_ports)

    def start(self, timeout_s: float = 20.0) -> SentinelCluster:
        self.primary.start()
        self.replica.start()
        binary = redis_server_binary()
        quorum = len(self.sentinel_ports) // 2 + 1
        for port in self.sentinel_ports:
            conf = self.dir / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
                f"logfile {self.dir / f'sentinel-{port}.log'}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {self.primary.port} {quorum}\n"
                f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {MASTER} 10000\n"
                f"sentinel parallel-syncs {MASTER} 1\n"
            )
            self._sentinels.append(
                subprocess.Popen(
                    [binary, str(conf), "--sentinel"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        self._wait(timeout_s)
        return self

    def _wait(self, timeout_s: float) -> None:
        """Until every sentinel knows the primary and its replica, and the replica is in sync."""
        deadline = time.monotonic() + timeout_s
        while True:
            for proc in self._sentinels:
                if proc.poll() is not None:
                    raise RedisServerExited(f"a sentinel exited with {proc.returncode}")
            if self._ready():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the sentinels did not see primary and replica in {timeout_s}s")
            time.sleep(0.1)

    def _ready(self) -> bool:
        try:
            replica = redis.Redis(port=self.replica.port, socket_timeout=1)
            if replica.info("replication").get("master_link_status") != "up":
                return False
            for port in self.sentinel_ports:
                sentinel = redis.Redis(port=port, socket_timeout=1)
                state: Any = sentinel.sentinel_master(MASTER)
                if (
                    int(state.get("num-slaves", 0)) < 1
                    or int(state.get("num-other-sentinels", 0)) < len(self.sentinel_ports) - 1
                ):
                    return False
            return True
        except redis.RedisError:
            return False

    def master_ports(self) -> list[int]:
        """The port each sentinel now names as the primary."""
        ports = []
        for port in self.sentinel_ports:
            address: Any = redis.Redis(port=port).sentinel_get_master_addr_by_name(MASTER)
            ports.append(int(address[1]))
        return ports

    def kill_primary(self) -> None:
        """SIGKILL the primary, as a crash of its machine would."""
        self.primary.kill()

    def restart_old_primary(self) -> None:
        """Start the killed primary again, on its port and data: the sentinels make it a
        replica of the new primary, as when a crashed machine comes back. It answers as a
        primary until they do (about 10 s): started before every sentinel has learned of the
        failover, it would be named primary by a lagging one, and take writes that its
        demotion then discards."""
        self.primary.start()

    def wait_failover(self, timeout_s: float = 30.0) -> float:
        """Seconds until every sentinel names the replica as primary."""
        start = time.monotonic()
        while set(self.master_ports()) != {self.replica.port}:
            if time.monotonic() - start > timeout_s:
                raise RuntimeError(f"no failover within {timeout_s}s")
            time.sleep(0.05)
        return time.monotonic() - start

    def stop(self) -> None:
        for proc in self._sentinels:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._sentinels = []
        self.replica.stop()
        self.primary.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SentinelCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
