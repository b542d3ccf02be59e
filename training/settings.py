"""Settings of the registry commands (`python -m training promote | rollback | versions`
and a training run that registers its model), read from the environment when asked."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class RegistrySettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="INFERENCE_", extra="ignore", populate_by_name=True
    )

    tracking_uri: str | None = Field(
        default=None,
        validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "INFERENCE_TRACKING_URI"),
    )
    """MLflow server (http://host:5000) holding runs and the model registry; unset: the
    embedded registry, a SQLite file and an artifact folder under <model_dir>/mlflow/."""

    tracking_token: str | None = Field(
        default=None,
        validation_alias=AliasChoices("MLFLOW_TRACKING_TOKEN", "INFERENCE_TRACKING_TOKEN"),
        repr=False,
    )
    """Bearer token the HTTP `sync` sends to the MLflow server (as MLflow's clients do)."""

    tracking_username: str | None = Field(
        default=None,
        validation_alias=AliasChoices("MLFLOW_TRACKING_USERNAME", "INFERENCE_TRACKING_USERNAME"),
    )
    """With tracking_password: HTTP basic auth for the MLflow server (`mlflow server
    --app-name basic-auth`); the token wins when both are set."""

    tracking_password: str | None = Field(
        default=None,
        validation_alias=AliasChoices("MLFLOW_TRACKING_PASSWORD", "INFERENCE_TRACKING_PASSWORD"),
        repr=False,
    )
    """The password of tracking_username."""

    webhook_secret: str | None = Field(default=None, repr=False)
    """The secret of MLflow's webhook (`sync --listen`): requests not signed with it are
    refused."""

    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("INFERENCE_REDIS_URL", "REDIS_URL"),
    )
    """Redis the workers read the serving decision from (their result backend)."""

    result_backend: str | None = None
    """The workers' result backend, when it differs from redis_url: the decision goes there."""

    promote_tolerance: float = Field(default=0.01, ge=0.0)
    """--promote-if-better promotes a candidate whose held-out R2 is at most this much below
    the champion's (on the same rows); a worse one is registered as challenger."""

    @property
    def decision_url(self) -> str:
        return self.result_backend or self.redis_url

    def embedded_dir(self, model_dir: Path) -> Path:
        return model_dir / "mlflow"
