"""`python -m gateway`: serve the gateway with uvicorn."""

from __future__ import annotations

import argparse
import copy
import sys
from typing import Any

import uvicorn
from pydantic import ValidationError
from uvicorn.config import LOGGING_CONFIG

from gateway.auth import exposure_error
from gateway.settings import GatewaySettings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gateway",
        description="HTTP gateway in front of the inference queues. Settings: INFERENCE_* "
        "and REDIS_URL, as for the producer, plus INFERENCE_GATEWAY_* (docs/gateway.md).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (%(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port (%(default)s)")
    parser.add_argument("--workers", type=int, default=1, help="server processes (%(default)s)")
    parser.add_argument(
        "--timeout-keep-alive",
        type=int,
        default=5,
        help="seconds an idle connection is kept open (%(default)s); behind a load "
        "balancer, more than its idle timeout",
    )
    parser.add_argument(
        "--root-path",
        default="",
        help="the path prefix a reverse proxy serves the gateway under and strips, e.g. "
        "/inference: job URLs (Location, status_url) then carry it",
    )
    parser.add_argument(
        "--access-log", action="store_true", help="log a line per request (off: it is costly)"
    )
    return parser


def log_config() -> dict[str, Any]:
    """uvicorn's logging, extended to the gateway's and the producer client's loggers, so that
    their warnings (Redis down at start, lost jobs sent again) read like the server's own."""
    config = copy.deepcopy(LOGGING_CONFIG)
    for name in ("gateway", "producer"):
        config["loggers"][name] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.workers < 1:
        print("gateway: --workers must be at least 1", file=sys.stderr)
        return 2
    try:
        # Read here as well as in each server process, to refuse bad settings with a message
        # rather than a traceback per process.
        settings = GatewaySettings()
    except ValidationError as exc:
        print(f"gateway: invalid settings: {exc}", file=sys.stderr)
        return 2
    refusal = exposure_error(args.host, settings)
    if refusal is not None:
        print(f"gateway: {refusal}", file=sys.stderr)
        return 2
    # An import string and a factory, so that with --workers each process builds its own
    # app (and its own Redis connections).
    uvicorn.run(
        "gateway.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        timeout_keep_alive=args.timeout_keep_alive,
        root_path=args.root_path,
        log_config=log_config(),
        # A log line per request costs ~10% of a request's CPU at a few thousand requests a
        # second; --access-log turns it on.
        access_log=args.access_log,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
