"""Connection settings shared by producers and workers, read from the environment.

Every variable carries the INFERENCE_ prefix; REDIS_URL is also read, as the
conventional name for the one Redis that serves as broker and result backend.
"""

from __future__ import annotations

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ConnectionSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="INFERENCE_", extra="ignore", populate_by_name=True
    )

    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("INFERENCE_REDIS_URL", "REDIS_URL"),
    )
    """Redis used as broker and result backend unless overridden below (redis:// or rediss://)."""

    broker_url: str | None = None
    """Broker URL, when it must differ from redis_url."""

    result_backend: str | None = None
    """Result backend URL, when it must differ from redis_url."""

    result_ttl_s: int = Field(default=86_400, ge=1)
    """Seconds a task result is kept in the result backend."""

    @property
    def broker(self) -> str:
        return self.broker_url or self.redis_url

    @property
    def backend(self) -> str:
        return self.result_backend or self.redis_url


class ProducerSettings(ConnectionSettings):
    wait_timeout_s: float = Field(default=60.0, gt=0)
    """Seconds a producer waits for a result before giving up."""

    chunk_rows: int = Field(default=2_000, ge=1)
    """Rows per job when scoring a file."""

    max_in_flight: int = Field(default=8, ge=1)
    """Chunks of a file scored at the same time."""


def redact(url: str) -> str:
    """A URL fit for logs: any password replaced by ***."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
