"""Credentials and TLS options merged into the Redis URLs, redaction, Celery's and redis-py's
TLS options, and how a failed PING is classified (no server needed)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import redis
from celery import Celery
from kombu.utils.url import parse_url as kombu_parse_url
from pydantic import SecretStr, ValidationError
from redis.backoff import NoBackoff
from redis.connection import parse_url as redis_parse_url

from contract.errors import StartupError
from producer.connections import (
    RedisAuthFailed,
    RedisTlsFailed,
    RedisUnreachable,
    TransientRetry,
    celery_ssl_options,
    check_redis,
    classify,
    redis_client,
)
from producer.settings import ConnectionSettings, ProducerSettings, redact, with_credentials
from stack.embedded_redis import free_port

# Every character that means something in a URL.
PASSWORD = "p@ss:w/rd%#?&+ x"
ENCODED = "p%40ss%3Aw%2Frd%25%23%3F%26%2B%20x"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "REDIS_URL",
        "INFERENCE_REDIS_URL",
        "INFERENCE_BROKER_URL",
        "INFERENCE_RESULT_BACKEND",
        "INFERENCE_REDIS_USERNAME",
        "INFERENCE_REDIS_PASSWORD",
        "INFERENCE_REDIS_TLS_CA_FILE",
        "INFERENCE_REDIS_TLS_CERT_FILE",
        "INFERENCE_REDIS_TLS_KEY_FILE",
        "INFERENCE_REDIS_TLS_VERIFY",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def pem_files(tmp_path: Path) -> dict[str, Path]:
    # Settings only check that the files exist; their content matters to a handshake.
    files = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    for path in files.values():
        path.write_text("-----BEGIN CERTIFICATE-----\n")
    return files


# -- credentials ---------------------------------------------------------------------------


def test_password_from_the_environment_is_merged_percent_encoded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://cache:6380/2")
    monkeypatch.setenv("INFERENCE_REDIS_PASSWORD", PASSWORD)
    settings = ProducerSettings()
    assert isinstance(settings.redis_password, SecretStr)
    assert settings.broker == settings.backend == f"redis://:{ENCODED}@cache:6380/2"
    # Every parser on the way decodes it back to the exact secret.
    assert redis_parse_url(settings.broker)["password"] == PASSWORD
    assert kombu_parse_url(settings.broker)["password"] == PASSWORD
    app = Celery(broker=settings.broker, backend=settings.backend)
    assert app.backend.connparams["password"] == PASSWORD  # type: ignore[attr-defined]


def test_username_and_password_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://cache:6379/0")
    monkeypatch.setenv("INFERENCE_RESULT_BACKEND", "redis://results:6379/1")
    monkeypatch.setenv("INFERENCE_REDIS_USERNAME", "infer@ence")
    monkeypatch.setenv("INFERENCE_REDIS_PASSWORD", "pw")
    settings = ProducerSettings()
    assert settings.broker == "redis://infer%40ence:pw@cache:6379/0"
    assert settings.backend == "redis://infer%40ence:pw@results:6379/1"
    parsed = redis_parse_url(settings.backend)
    assert (parsed["username"], parsed["password"]) == ("infer@ence", "pw")


def test_a_password_in_the_url_wins_for_that_url() -> None:
    settings = ProducerSettings(
        redis_url="redis://:own@cache:6379/0",
        result_backend="redis://results:6379/1",
        redis_password=SecretStr("from-env"),
    )
    assert settings.broker == "redis://:own@cache:6379/0"
    assert settings.backend == "redis://:from-env@results:6379/1"


def test_url_user_is_kept_when_only_the_password_comes_from_the_environment() -> None:
    assert with_credentials("redis://alice@h:1/0", None, "pw") == "redis://alice:pw@h:1/0"
    assert with_credentials("redis://h:1/0", "bob", None) == "redis://bob@h:1/0"
    assert with_credentials("redis://h:1/0", None, None) == "redis://h:1/0"


def test_the_password_is_never_in_the_settings_repr_or_dump() -> None:
    settings = ProducerSettings(redis_url="redis://h:1/0", redis_password=SecretStr(PASSWORD))
    for text in (repr(settings), str(settings), settings.model_dump_json()):
        assert PASSWORD not in text and ENCODED not in text
    assert redact(settings.broker) == "redis://:***@h:1/0"


# -- redaction -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:pw@host:6379/0", "redis://:***@host:6379/0"),
        ("rediss://user:pw@host/1", "rediss://user:***@host/1"),
        (f"redis://:{ENCODED}@host:6379/0", "redis://:***@host:6379/0"),
        ("redis://user:p@w@[::1]:6379/0", "redis://user:***@[::1]:6379/0"),
        ("redis://host:6379/0?password=pw&db=1", "redis://host:6379/0?password=***&db=1"),
        (
            "rediss://:pw@h:1/0?ssl_cert_reqs=required&ssl_ca_certs=/ca.pem",
            "rediss://:***@h:1/0?ssl_cert_reqs=required&ssl_ca_certs=/ca.pem",
        ),
        ("redis://user@host:6379/0", "redis://user@host:6379/0"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("not a url", "not a url"),
    ],
)
def test_redact(url: str, expected: str) -> None:
    assert redact(url) == expected


# -- TLS -----------------------------------------------------------------------------------


def test_rediss_urls_carry_the_tls_options(pem_files: dict[str, Path]) -> None:
    settings = ProducerSettings(
        redis_url="rediss://cache:6380/0",
        redis_password=SecretStr("pw"),
        redis_tls_ca_file=pem_files["ca"],
        redis_tls_cert_file=pem_files["cert"],
        redis_tls_key_file=pem_files["key"],
    )
    expected = {
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_ca_certs": str(pem_files["ca"]),
        "ssl_certfile": str(pem_files["cert"]),
        "ssl_keyfile": str(pem_files["key"]),
    }
    assert celery_ssl_options(settings) == {
        "broker_use_ssl": expected,
        "redis_backend_use_ssl": expected,
    }
    # In the URL too, so that redis.Redis.from_url(settings.backend) verifies the same way.
    parsed = redis_parse_url(settings.backend)
    assert parsed["connection_class"] is redis.SSLConnection
    assert parsed["ssl_cert_reqs"] == "required"
    assert parsed["ssl_ca_certs"] == str(pem_files["ca"])
    assert kombu_parse_url(settings.broker)["ssl"] == expected
    assert settings.connection_url(settings.broker) == settings.broker


def test_celery_takes_the_tls_options(pem_files: dict[str, Path]) -> None:
    settings = ProducerSettings(
        redis_url="rediss://cache:6380/0", redis_tls_ca_file=pem_files["ca"]
    )
    app = Celery(broker=settings.broker, backend=settings.backend)
    app.conf.update(celery_ssl_options(settings))
    connparams = app.backend.connparams  # type: ignore[attr-defined]
    assert connparams["connection_class"] is redis.SSLConnection
    assert connparams["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    assert connparams["ssl_ca_certs"] == str(pem_files["ca"])
    with app.connection_for_write() as conn:
        assert conn.ssl == {
            "ssl_cert_reqs": ssl.CERT_REQUIRED,
            "ssl_ca_certs": str(pem_files["ca"]),
        }


def test_plain_urls_get_no_tls_options(pem_files: dict[str, Path]) -> None:
    settings = ProducerSettings(
        redis_url="redis://cache:6379/0",
        result_backend="rediss://results:6380/0",
        redis_tls_ca_file=pem_files["ca"],
    )
    assert settings.broker == "redis://cache:6379/0"
    assert list(celery_ssl_options(settings)) == ["redis_backend_use_ssl"]
    assert celery_ssl_options(ProducerSettings(redis_url="redis://cache:6379/0")) == {}


def test_verification_can_be_turned_off_and_the_url_has_the_last_word(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("INFERENCE_REDIS_TLS_VERIFY", "false")
    settings = ProducerSettings(redis_url="rediss://cache:6380/0")
    assert celery_ssl_options(settings)["broker_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_NONE}
    assert settings.broker == "rediss://cache:6380/0?ssl_cert_reqs=none"
    own = ProducerSettings(redis_url="rediss://cache:6380/0?ssl_cert_reqs=required")
    assert own.broker == "rediss://cache:6380/0?ssl_cert_reqs=required"


def test_tls_files_must_exist_and_a_key_needs_a_certificate(
    pem_files: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(ValidationError, match="redis_tls_ca_file"):
        ConnectionSettings(redis_tls_ca_file=tmp_path / "absent.pem")
    with pytest.raises(ValidationError, match="redis_tls_cert_file is not"):
        ConnectionSettings(redis_tls_key_file=pem_files["key"])


def test_redis_client_has_the_tls_options_and_a_retry_policy(pem_files: dict[str, Path]) -> None:
    settings = ProducerSettings(
        redis_url="rediss://cache:6380/0",
        redis_password=SecretStr("pw"),
        redis_tls_ca_file=pem_files["ca"],
    )
    # The raw URL is enough: credentials and TLS options are merged in.
    client = redis_client(settings.redis_url, settings, retries=4)
    kwargs = client.connection_pool.connection_kwargs
    assert client.connection_pool.connection_class is redis.SSLConnection
    assert kwargs["password"] == "pw"
    assert kwargs["ssl_ca_certs"] == str(pem_files["ca"])
    # What a connection made from it verifies with, whichever form the option was merged in.
    assert client.connection_pool.make_connection().cert_reqs == ssl.CERT_REQUIRED
    assert kwargs["socket_connect_timeout"] == 5.0
    assert kwargs["retry"].get_retries() == 4
    plain = redis_client("redis://cache:6379/0", ProducerSettings())
    assert plain.connection_pool.connection_class is redis.Connection


def test_retries_only_what_may_pass() -> None:
    retry = TransientRetry(NoBackoff(), 3)
    for error, attempts in [
        (redis.ConnectionError("Error 111 connecting. Connection refused."), 4),
        (redis.TimeoutError("Timeout reading from socket"), 4),
        (redis.AuthenticationError("invalid username-password pair"), 1),
        (_cert_error(), 1),
    ]:
        calls: list[int] = []

        def do(error: Exception = error, calls: list[int] = calls) -> None:
            calls.append(1)
            raise error

        with pytest.raises(type(error)) as info:
            retry.call_with_retry(do, lambda _: None)
        assert info.value is error
        assert len(calls) == attempts, error


# -- start-up check ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        redis.AuthenticationError("invalid username-password pair or user is disabled."),
        redis.AuthenticationWrongNumberOfArgsError("wrong number of arguments for 'auth'"),
        redis.ResponseError("NOAUTH Authentication required."),
        redis.ResponseError("WRONGPASS invalid username-password pair"),
    ],
)
def test_rejected_credentials_are_fatal_and_name_the_url_redacted(exc: Exception) -> None:
    settings = ProducerSettings(redis_url="redis://h:1/0")
    error = classify(exc, "broker", f"redis://:{ENCODED}@h:1/0", settings, [PASSWORD])
    assert isinstance(error, RedisAuthFailed) and isinstance(error, StartupError)
    assert "authentication failed for the broker at redis://:***@h:1/0" in str(error)
    assert "the password in the URL" in str(error)
    assert PASSWORD not in str(error) and ENCODED not in str(error)


def test_the_secret_is_scrubbed_from_the_servers_words() -> None:
    settings = ProducerSettings(redis_url="redis://h:1/0", redis_password=SecretStr("hunter2"))
    error = classify(
        redis.AuthenticationError("no such password: hunter2"),
        "broker",
        "redis://h:1/0",
        settings,
        ["hunter2"],
    )
    assert "hunter2" not in str(error)
    assert "the password from INFERENCE_REDIS_PASSWORD" in str(error)


def test_a_missing_permission_is_fatal() -> None:
    error = classify(
        redis.exceptions.NoPermissionError("NOPERM this user has no permissions"),
        "result backend",
        "redis://u:pw@h:1/0",
        ProducerSettings(),
        [],
    )
    assert isinstance(error, RedisAuthFailed) and "ACL" in str(error)


def _cert_error() -> redis.ConnectionError:
    cause = ssl.SSLCertVerificationError(1, "certificate verify failed")
    cause.verify_message = "self-signed certificate in certificate chain"
    exc = redis.ConnectionError("Error 1 connecting to h:1.")
    exc.__cause__ = cause
    return exc


def test_an_unverified_certificate_is_fatal() -> None:
    error = classify(_cert_error(), "broker", "rediss://h:1/0", ProducerSettings(), [])
    assert isinstance(error, RedisTlsFailed)
    assert "self-signed certificate" in str(error) and "INFERENCE_REDIS_TLS_CA_FILE" in str(error)


def test_a_server_that_does_not_answer_is_not_fatal() -> None:
    url = f"redis://:pw@127.0.0.1:{free_port()}/0"
    with pytest.raises(RedisUnreachable, match=r"redis://:\*\*\*@127\.0\.0\.1") as info:
        check_redis(url, ProducerSettings(), "broker", timeout_s=0.5)
    assert not isinstance(info.value, StartupError)
