from __future__ import annotations

import pytest
from pydantic import ValidationError

from producer.settings import ConnectionSettings, ProducerSettings, redact
from worker.settings import WorkerSettings


def test_one_redis_url_serves_broker_and_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://cache:6380/2")
    settings = ProducerSettings()
    assert settings.broker == settings.backend == "redis://cache:6380/2"


def test_overrides_and_prefixed_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://plain:6379/0")
    monkeypatch.setenv("INFERENCE_REDIS_URL", "redis://prefixed:6379/0")
    monkeypatch.setenv("INFERENCE_RESULT_BACKEND", "redis://results:6379/1")
    settings = ProducerSettings()
    assert settings.broker == "redis://prefixed:6379/0"
    assert settings.backend == "redis://results:6379/1"


def test_worker_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERENCE_PROVIDER", "cuda")
    monkeypatch.setenv("INFERENCE_INTRA_OP_THREADS", "2")
    monkeypatch.setenv("INFERENCE_ALLOW_CPU_FALLBACK", "true")
    settings = WorkerSettings()
    assert (settings.provider, settings.intra_op_threads, settings.allow_cpu_fallback) == (
        "cuda",
        2,
        True,
    )
    monkeypatch.setenv("INFERENCE_PROVIDER", "tpu")
    with pytest.raises(ValidationError, match="provider"):
        WorkerSettings()


def test_visibility_timeout_must_exceed_the_time_limit() -> None:
    with pytest.raises(ValidationError, match=r"visibility_timeout_s \(450\) must exceed .* = 500"):
        WorkerSettings(task_time_limit_s=100, task_soft_time_limit_s=50, visibility_timeout_s=450)
    WorkerSettings(task_time_limit_s=100, task_soft_time_limit_s=50, visibility_timeout_s=501)
    with pytest.raises(ValidationError, match="soft"):
        WorkerSettings(task_time_limit_s=10, task_soft_time_limit_s=20)


def test_redact_hides_only_the_password() -> None:
    assert redact("redis://:pw@host:6379/0") == "redis://:***@host:6379/0"
    assert redact("rediss://user:pw@host/1") == "rediss://user:***@host/1"
    assert redact("redis://host:6379/0") == "redis://host:6379/0"


def test_a_sentinel_url_list_is_parsed_as_kombu_spells_it() -> None:
    from producer.settings import SentinelTarget, is_sentinel, redact

    url = "sentinel://:s%40cret@h1:26379/2;sentinel://h2:26380;sentinel://h3"
    assert is_sentinel(url) and not is_sentinel("redis://h:6379/0")
    target = SentinelTarget.parse(url)
    assert target.nodes == [("h1", 26379), ("h2", 26380), ("h3", 26379)]
    assert (target.db, target.username, target.password) == (2, None, "s@cret")
    assert "s%40cret" not in redact(url) and redact(url).count("sentinel://") == 3
    with pytest.raises(ValueError, match="not a sentinel"):
        SentinelTarget.parse("sentinel://h1;redis://h2")


def test_credentials_from_settings_reach_every_sentinel_url() -> None:
    settings = ConnectionSettings(
        redis_url="sentinel://h1:26379;sentinel://h2:26379", redis_password="pw"
    )
    assert settings.broker == "sentinel://:pw@h1:26379;sentinel://:pw@h2:26379"
