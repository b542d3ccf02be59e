"""Redis connections built from ConnectionSettings: Celery's TLS options, redis-py
clients with the same TLS options and a retry policy, and a start-up probe that tells
a wrong password (fatal) from a server that is merely down (worth waiting for)."""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import EqualJitterBackoff, NoBackoff
from redis.retry import Retry

from contract.errors import RedisAuthFailed, RedisTlsFailed, RedisUnreachable
from producer.settings import ConnectionSettings, SentinelTarget, is_sentinel, is_tls, redact


def celery_ssl_options(settings: ConnectionSettings) -> dict[str, Any]:
    """The Celery settings for rediss:// broker and backend URLs, for `app.conf.update(...)`.

    Without `broker_use_ssl`, kombu treats a bare rediss:// URL as ssl.CERT_NONE (encrypted
    but unverified) and only warns; without `redis_backend_use_ssl` (or ssl_cert_reqs in the
    URL) Celery's result backend refuses a rediss:// URL. The ssl_* parameters that
    `settings.broker` / `settings.backend` carry in their query say the same thing: this
    keeps the configuration explicit rather than relying on URL parsing alone.
    """
    options: dict[str, Any] = {}
    if is_tls(settings.broker):
        options["broker_use_ssl"] = settings.ssl_options()
    if is_tls(settings.backend):
        options["redis_backend_use_ssl"] = settings.ssl_options()
    return options


T = TypeVar("T")


class _Permanent(Exception):
    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def is_permanent(exc: BaseException) -> bool:
    """Errors a retry cannot fix: rejected credentials, an unverifiable certificate."""
    return isinstance(exc, redis.AuthenticationError) or isinstance(
        _ssl_error(exc), ssl.SSLCertVerificationError
    )


class TransientRetry(Retry):
    """redis-py's Retry, minus the retries of errors that cannot pass.

    redis.AuthenticationError is a ConnectionError, and a failed certificate check
    surfaces as one, so a plain Retry backs off and tries them again and again: a wrong
    password would take seconds to be reported instead of milliseconds.
    """

    def call_with_retry(self, do: Callable[[], T], fail: Any, *args: Any, **kwargs: Any) -> T:
        def attempt() -> T:
            try:
                return do()
            except redis.ConnectionError as exc:
                if is_permanent(exc):
                    raise _Permanent(exc) from exc
                raise

        try:
            return super().call_with_retry(attempt, fail, *args, **kwargs)
        except _Permanent as permanent:
            error = permanent.error
        # Raised outside the except block, so that its own cause stays its context.
        raise error


class AsyncTransientRetry(AsyncRetry):
    """TransientRetry for redis.asyncio: rejected credentials and certificates fail at once."""

    async def call_with_retry(
        self, do: Callable[[], Awaitable[T]], fail: Any, *args: Any, **kwargs: Any
    ) -> T:
        async def attempt() -> T:
            try:
                return await do()
            except redis.ConnectionError as exc:
                if is_permanent(exc):
                    raise _Permanent(exc) from exc
                raise

        try:
            return await super().call_with_retry(attempt, fail, *args, **kwargs)
        except _Permanent as permanent:
            error = permanent.error
        raise error


def _options(
    url: str,
    settings: ConnectionSettings,
    connect_timeout_s: float,
    socket_timeout_s: float,
    health_check_interval_s: int,
) -> tuple[str, dict[str, Any]]:
    url = settings.connection_url(url)
    tls: dict[str, Any] = settings.ssl_options() if is_tls(url) else {}
    return url, {
        "socket_connect_timeout": connect_timeout_s,
        "socket_timeout": socket_timeout_s,
        "socket_keepalive": True,
        "health_check_interval": health_check_interval_s,
        **tls,
    }


def _backoff(retries: int) -> Any:
    return EqualJitterBackoff(cap=2.0, base=0.1) if retries else NoBackoff()


def redis_client(
    url: str,
    settings: ConnectionSettings,
    *,
    connect_timeout_s: float = 5.0,
    socket_timeout_s: float = 10.0,
    retries: int = 5,
    health_check_interval_s: int = 30,
) -> redis.Redis:
    """A redis-py client for `url` (a raw or an already merged URL) with the settings'
    credentials and TLS options.

    A command that meets a refused or dropped connection or a timeout is retried `retries`
    times on a fresh connection, waiting about 0.2 s, doubling up to 2 s, with jitter (2.5
    to 5 s in all for 5 retries), so a Redis restart or failover is ridden out instead of
    surfacing as an error; rejected credentials and certificates fail at once; connections
    idle for `health_check_interval_s` are PINGed before use, since a load balancer or the
    server's `timeout` may have closed them silently.
    """
    url, options = _options(
        url, settings, connect_timeout_s, socket_timeout_s, health_check_interval_s
    )
    retry = TransientRetry(_backoff(retries), retries)
    if is_sentinel(url):
        # Each new connection asks the sentinels where the master is now: after a failover
        # the retries above land on the new one.
        target = SentinelTarget.parse(url)
        sentinel = redis.sentinel.Sentinel(
            target.nodes, sentinel_kwargs=_sentinel_kwargs(options), **options
        )
        client: redis.Redis = sentinel.master_for(
            settings.sentinel_master,
            db=target.db,
            username=target.username,
            password=target.password,
            retry=retry,
            **options,
        )
        return client
    return redis.Redis.from_url(url, retry=retry, **options)


def async_redis_client(
    url: str,
    settings: ConnectionSettings,
    *,
    connect_timeout_s: float = 5.0,
    socket_timeout_s: float = 10.0,
    retries: int = 5,
    health_check_interval_s: int = 30,
) -> redis.asyncio.Redis:
    """redis_client for asyncio (redis.asyncio), with the same options and retry policy."""
    url, options = _options(
        url, settings, connect_timeout_s, socket_timeout_s, health_check_interval_s
    )
    retry = AsyncTransientRetry(_backoff(retries), retries)
    if is_sentinel(url):
        target = SentinelTarget.parse(url)
        sentinel = redis.asyncio.sentinel.Sentinel(
            target.nodes, sentinel_kwargs=_sentinel_kwargs(options), **options
        )
        client: redis.asyncio.Redis = sentinel.master_for(
            settings.sentinel_master,
            db=target.db,
            username=target.username,
            password=target.password,
            retry=retry,
            **options,
        )
        return client
    return redis.asyncio.Redis.from_url(url, retry=retry, **options)


def _sentinel_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    # The sentinels answer quickly or not at all: the next one is asked.
    return {
        "socket_connect_timeout": options["socket_connect_timeout"],
        "socket_timeout": options["socket_connect_timeout"],
    }


_AUTH_REPLIES = ("NOAUTH", "WRONGPASS")


def _ssl_error(exc: BaseException) -> ssl.SSLError | None:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, ssl.SSLError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def _scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def password_source(url: str, settings: ConnectionSettings) -> str:
    if urlsplit(url).password is not None:
        return "the password in the URL"
    if settings.redis_password is not None:
        return "the password from INFERENCE_REDIS_PASSWORD"
    return "no password"


def classify(
    exc: Exception, role: str, url: str, settings: ConnectionSettings, secrets: list[str]
) -> Exception:
    """The exception check_redis raises for `exc`, met while PINGing `role` at `url`."""
    where = f"{role} at {redact(url)}"
    detail = _scrub(str(exc), secrets)
    if isinstance(exc, redis.AuthenticationError | redis.AuthenticationWrongNumberOfArgsError) or (
        isinstance(exc, redis.ResponseError) and str(exc).startswith(_AUTH_REPLIES)
    ):
        user = settings.redis_username or urlsplit(url).username
        return RedisAuthFailed(
            f"Redis authentication failed for the {where} "
            f"(user {user or 'default'}, {password_source(url, settings)}): {detail}"
        )
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return RedisAuthFailed(
            f"the Redis user may not run PING on the {where}: {detail} (check its ACL rules)"
        )
    tls_error = _ssl_error(exc)
    if isinstance(tls_error, ssl.SSLCertVerificationError):
        return RedisTlsFailed(
            f"TLS certificate verification failed for the {where}: "
            f"{_scrub(str(tls_error.verify_message or tls_error), secrets)} "
            "(INFERENCE_REDIS_TLS_CA_FILE must name the CA that signed the server's certificate, "
            "and the URL's host must be one the certificate names)"
        )
    hint = ""
    if tls_error is not None:
        hint = " (TLS handshake failed: does the server want a client certificate, "
        hint += "INFERENCE_REDIS_TLS_CERT_FILE / _KEY_FILE?)"
    return RedisUnreachable(f"the {where} did not answer PING ({detail.rstrip('.')}){hint}")


def check_redis(url: str, settings: ConnectionSettings, role: str, timeout_s: float = 2.0) -> None:
    """PING `url` (as configured: credentials and TLS options are merged in here) once,
    with short timeouts and no retries.

    Raises RedisAuthFailed or RedisTlsFailed (both StartupError: waiting cannot fix them)
    or RedisUnreachable; their messages name `url` redacted and never the password.
    """
    client = redis_client(
        url, settings, connect_timeout_s=timeout_s, socket_timeout_s=timeout_s, retries=0
    )
    secrets = [settings.redis_password.get_secret_value()] if settings.redis_password else []
    password = client.connection_pool.connection_kwargs.get("password")
    if password:
        secrets.append(str(password))
    try:
        client.ping()
    except redis.RedisError as exc:
        raise classify(exc, role, url, settings, secrets) from None
    finally:
        client.close()
