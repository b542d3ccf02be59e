"""The gateway's settings: the producer's (Redis, timeouts) plus its own, all INFERENCE_*."""

from __future__ import annotations

from pydantic import Field, SecretStr

from producer.settings import ProducerSettings

MIB = 1 << 20


class GatewaySettings(ProducerSettings):
    gateway_token: SecretStr | None = None
    """Bearer token every request under /api/v1 must carry (INFERENCE_GATEWAY_TOKEN). Unset,
    the gateway serves only on a loopback host: `python -m gateway` refuses any other."""

    gateway_max_body_bytes: int = Field(default=64 * MIB, ge=1)
    """Largest request body accepted; a larger one is refused with 413 before it is read.
    The default fits a batch of INFERENCE_MAX_BATCH_ROWS (100,000) rows of tens of
    features as JSON text."""

    gateway_predict_timeout_s: float = Field(default=30.0, gt=0)
    """Seconds /api/v1/predict, /api/v1/predict/batch and /api/v1/explain wait for the result
    before they answer 504 (the job stays queued; its id is in the problem document)."""

    gateway_max_wait_s: float = Field(default=60.0, ge=0)
    """Longest long poll of GET /api/v1/jobs/{id}?wait=S: a larger S is cut to this, so that
    no request outlives the proxies and load balancers in front of the gateway."""

    gateway_retry_after_s: int = Field(default=1, ge=0)
    """The Retry-After (seconds) of 429 (queue full) and 503 (not ready, Redis down)."""

    gateway_model_info_ttl_s: float = Field(default=30.0, ge=0)
    """Seconds the model info the workers publish is trusted before it is read again; inputs
    are checked against it (feature count, row limit) before they are enqueued, so a new
    model is taken up within this long without restarting the gateway."""
