"""Connection settings shared by producers and workers, read from the environment.

Every variable carries the INFERENCE_ prefix; REDIS_URL is also read, as the
conventional name for the one Redis that serves as broker and result backend.

`broker` and `backend` are the URLs actually connected to: the configured URL
plus INFERENCE_REDIS_USERNAME / INFERENCE_REDIS_PASSWORD (when the URL has no
password of its own) and, for rediss://, the TLS settings as the ssl_* query
parameters that redis-py, kombu and Celery's result backend all read. Because
the URL carries everything, a plain `redis.Redis.from_url(settings.backend)`
anywhere in the code connects the same way Celery does. Those URLs hold the
secret: pass them through `redact` before they reach a log line.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit, urlunsplit

from pydantic import AliasChoices, Field, FilePath, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

TLS_SCHEME = "rediss"
SENTINEL_SCHEME = "sentinel"


class ConnectionSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="INFERENCE_", extra="ignore", populate_by_name=True
    )

    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("INFERENCE_REDIS_URL", "REDIS_URL"),
    )
    """Redis used as broker and result backend unless overridden below: redis://, rediss://, or
    Redis Sentinel as kombu spells it, `sentinel://host1:26379;sentinel://host2:26379/0` (the
    master's password in the first URL's user info, its name in sentinel_master)."""

    broker_url: str | None = None
    """Broker URL, when it must differ from redis_url."""

    result_backend: str | None = None
    """Result backend URL, when it must differ from redis_url."""

    result_ttl_s: int = Field(default=86_400, ge=1)
    """Seconds a task result is kept in the result backend."""

    redis_username: str | None = None
    """Redis ACL user, for URLs that name none."""

    redis_password: SecretStr | None = None
    """Redis password (requirepass or the ACL user's), for URLs that carry none; a password
    written in a URL wins for that URL."""

    redis_tls_ca_file: FilePath | None = None
    """CA bundle (PEM) that signed the server's certificate, for rediss:// URLs; unset uses
    the system's trust store."""

    redis_tls_cert_file: FilePath | None = None
    """Client certificate (PEM), when the server asks for one (tls-auth-clients)."""

    redis_tls_key_file: FilePath | None = None
    """Private key of the client certificate, unless it is in redis_tls_cert_file."""

    sentinel_master: str = "mymaster"
    """With sentinel:// URLs: the name under which the sentinels watch the Redis master."""

    redis_tls_verify: bool = True
    """Verify the server's certificate and host name (ssl.CERT_REQUIRED); false is CERT_NONE."""

    @model_validator(mode="after")
    def _key_needs_a_certificate(self) -> ConnectionSettings:
        if self.redis_tls_key_file is not None and self.redis_tls_cert_file is None:
            raise ValueError("redis_tls_key_file is set but redis_tls_cert_file is not")
        return self

    @property
    def broker(self) -> str:
        return self.connection_url(self.broker_url or self.redis_url)

    @property
    def backend(self) -> str:
        return self.connection_url(self.result_backend or self.redis_url)

    def connection_url(self, url: str) -> str:
        """`url` with the credentials and TLS settings merged in; idempotent."""
        password = self.redis_password.get_secret_value() if self.redis_password else None
        if is_sentinel(url):
            return ";".join(
                with_credentials(part, self.redis_username, password) for part in url.split(";")
            )
        url = with_credentials(url, self.redis_username, password)
        if is_tls(url):
            url = with_query_defaults(url, ssl_query(self.ssl_options()))
        return url

    def ssl_options(self) -> dict[str, Any]:
        """TLS options in the form Celery, kombu and redis-py take them."""
        options: dict[str, Any] = {
            "ssl_cert_reqs": ssl.CERT_REQUIRED if self.redis_tls_verify else ssl.CERT_NONE
        }
        files = {
            "ssl_ca_certs": self.redis_tls_ca_file,
            "ssl_certfile": self.redis_tls_cert_file,
            "ssl_keyfile": self.redis_tls_key_file,
        }
        options.update({key: str(path) for key, path in files.items() if path is not None})
        return options


class ProducerSettings(ConnectionSettings):
    wait_timeout_s: float = Field(default=60.0, gt=0)
    """Seconds a producer waits for a result before giving up."""

    chunk_rows: int = Field(default=20_000, ge=1)
    """Rows per job when scoring a file: large, so that Celery's ~1 ms a message and the
    journal's two fsyncs a chunk are small beside the ~70 ms the model takes on a chunk."""

    max_in_flight: int = Field(default=8, ge=1)
    """Chunks of a file scored at the same time."""

    lost_check_s: float = Field(default=2.0, gt=0)
    """Seconds between two looks, while waiting, for jobs Redis lost with a killed worker."""

    track_sent_jobs: int = Field(default=100_000, ge=0)
    """Most recently sent jobs whose arguments are kept, to re-send them if lost."""

    enqueue_replicas: int = Field(default=0, ge=0)
    """Replicas that must have each enqueued job before a send returns (Redis WAIT, on the same
    connection, after the push). Redis replicates asynchronously: with Sentinel, a job
    acknowledged by the primary alone is lost if the primary dies before passing it on. 0
    does not wait; 1 survives the loss of the primary. A send that times out raises
    NotReplicated (retryable: the job may exist; resending under its id is safe)."""

    enqueue_replicas_timeout_ms: int = Field(default=1_000, ge=1)
    """Longest a send waits for enqueue_replicas."""

    max_queue_depth: int | None = Field(default=None, ge=1)
    """Most jobs a queue may hold; an enqueue that would pass it fails with QueueFull
    (retryable), checked and pushed in one atomic step. Unset: no limit. Producers that do
    not use this client (stock Celery clients) are not held to it."""


def is_tls(url: str) -> bool:
    return urlsplit(url).scheme == TLS_SCHEME


def is_sentinel(url: str) -> bool:
    return urlsplit(url.split(";", 1)[0]).scheme == SENTINEL_SCHEME


@dataclass(frozen=True)
class SentinelTarget:
    """A sentinel:// URL list, parsed: the sentinels, and the master's database and
    credentials (from the first URL that names them, as kombu reads them)."""

    nodes: list[tuple[str, int]]
    db: int
    username: str | None
    password: str | None

    @classmethod
    def parse(cls, url: str) -> SentinelTarget:
        nodes: list[tuple[str, int]] = []
        db, username, password = 0, None, None
        for part in url.split(";"):
            parts = urlsplit(part.strip())
            if parts.scheme != SENTINEL_SCHEME or not parts.hostname:
                raise ValueError(f"not a sentinel:// URL: {redact(part)}")
            nodes.append((parts.hostname, parts.port or 26379))
            if parts.path.strip("/") and not db:
                db = int(parts.path.strip("/"))
            if parts.password is not None and password is None:
                username = unquote(parts.username) if parts.username else None
                password = unquote(parts.password)
        return cls(nodes, db, username, password)


def _split_userinfo(netloc: str) -> tuple[str | None, str]:
    """(userinfo or None, host[:port]); the last @ separates them, as in urllib."""
    userinfo, at, hostport = netloc.rpartition("@")
    return (userinfo if at else None), hostport


def with_credentials(url: str, username: str | None, password: str | None) -> str:
    """`url` with username/password added, percent-encoded, unless it has a password already.

    A URL's own password is kept: with separate broker and backend servers, the one
    that needs a different secret can carry it in its URL.
    """
    if username is None and password is None:
        return url
    parts = urlsplit(url)
    userinfo, hostport = _split_userinfo(parts.netloc)
    if userinfo is not None and ":" in userinfo:
        return url
    user = quote(username, safe="") if username is not None else (userinfo or "")
    credentials = user if password is None else f"{user}:{quote(password, safe='')}"
    return urlunsplit(parts._replace(netloc=f"{credentials}@{hostport}"))


def ssl_query(options: dict[str, Any]) -> dict[str, str]:
    """ssl_* options as URL query values (ssl_cert_reqs by name, as all three parsers accept)."""
    names = {ssl.CERT_REQUIRED: "required", ssl.CERT_OPTIONAL: "optional", ssl.CERT_NONE: "none"}
    query = {key: str(value) for key, value in options.items() if key != "ssl_cert_reqs"}
    if "ssl_cert_reqs" in options:
        query["ssl_cert_reqs"] = names[options["ssl_cert_reqs"]]
    return query


def with_query_defaults(url: str, defaults: dict[str, str]) -> str:
    """`url` with each query parameter of `defaults` it lacks appended; its own ones win."""
    parts = urlsplit(url)
    present = {key for key, _ in parse_qsl(parts.query, keep_blank_values=True)}
    extra = "&".join(
        f"{key}={quote(value, safe='/')}" for key, value in defaults.items() if key not in present
    )
    if not extra:
        return url
    query = f"{parts.query}&{extra}" if parts.query else extra
    return urlunsplit(parts._replace(query=query))


# redis-py also reads a password from the query string (?password=...).
_QUERY_PASSWORD = re.compile(r"(^|&)(password=)[^&]*", re.IGNORECASE)


def redact(url: str) -> str:
    """A URL fit for logs: any password (in the user info or the query) replaced by ***."""
    if ";" in url:  # a sentinel:// list: each URL on its own
        return ";".join(redact(part) for part in url.split(";"))
    parts = urlsplit(url)
    userinfo, hostport = _split_userinfo(parts.netloc)
    netloc = parts.netloc
    if userinfo is not None and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:***@{hostport}"
    query = _QUERY_PASSWORD.sub(r"\1\2***", parts.query)
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit(parts._replace(netloc=netloc, query=query))
