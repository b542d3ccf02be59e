"""GatewaySettings: the producer's settings plus the gateway's own, from INFERENCE_*."""

from __future__ import annotations

import ast
import inspect

import pytest
from pydantic import ValidationError

from gateway import settings as settings_module
from gateway.settings import MIB, GatewaySettings
from producer.settings import ProducerSettings


def test_defaults_serve_a_full_batch_and_bound_every_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    settings = GatewaySettings()
    assert settings.gateway_token is None
    assert settings.gateway_max_body_bytes == 64 * MIB
    assert settings.gateway_predict_timeout_s == 30
    assert settings.gateway_max_wait_s == 60
    assert settings.gateway_retry_after_s == 1
    assert isinstance(settings, ProducerSettings)


def test_every_setting_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://redis.internal:6379/2")
    monkeypatch.setenv("INFERENCE_MAX_QUEUE_DEPTH", "500")
    monkeypatch.setenv("INFERENCE_GATEWAY_TOKEN", "s3cret-token")
    monkeypatch.setenv("INFERENCE_GATEWAY_MAX_BODY_BYTES", "1024")
    monkeypatch.setenv("INFERENCE_GATEWAY_PREDICT_TIMEOUT_S", "2.5")
    monkeypatch.setenv("INFERENCE_GATEWAY_MAX_WAIT_S", "10")
    monkeypatch.setenv("INFERENCE_GATEWAY_RETRY_AFTER_S", "4")
    monkeypatch.setenv("INFERENCE_GATEWAY_MODEL_INFO_TTL_S", "0")
    settings = GatewaySettings()
    assert settings.redis_url == "redis://redis.internal:6379/2"
    assert settings.max_queue_depth == 500
    assert settings.gateway_token is not None
    assert settings.gateway_token.get_secret_value() == "s3cret-token"
    assert (settings.gateway_max_body_bytes, settings.gateway_predict_timeout_s) == (1024, 2.5)
    assert (settings.gateway_max_wait_s, settings.gateway_retry_after_s) == (10, 4)
    assert settings.gateway_model_info_ttl_s == 0
    # The token never shows in a repr or a log line made from one.
    assert "s3cret-token" not in repr(settings) and "s3cret-token" not in str(settings)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("INFERENCE_GATEWAY_MAX_BODY_BYTES", "0"),
        ("INFERENCE_GATEWAY_PREDICT_TIMEOUT_S", "0"),
        ("INFERENCE_GATEWAY_MAX_WAIT_S", "-1"),
        ("INFERENCE_GATEWAY_RETRY_AFTER_S", "soon"),
    ],
)
def test_a_setting_out_of_range_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=name.removeprefix("INFERENCE_").lower()):
        GatewaySettings()


def test_every_gateway_setting_says_what_it_is_for() -> None:
    tree = ast.parse(inspect.getsource(settings_module))
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "GatewaySettings"]
    body = cls.body
    fields = [
        (i, node.target.id)
        for i, node in enumerate(body)
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
    ]
    assert {name for _, name in fields} == set(GatewaySettings.model_fields) - set(
        ProducerSettings.model_fields
    )
    for i, name in fields:
        following = body[i + 1] if i + 1 < len(body) else None
        assert isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant), (
            f"{name} has no docstring"
        )
