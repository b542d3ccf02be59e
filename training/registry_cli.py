"""`python -m training promote | rollback | versions | sync`: the registry's commands.

`sync` against an MLflow server reads its REST API over plain HTTP (training.mlflow_http)
and runs without MLflow installed; the other commands, and `sync` on the embedded registry
(a SQLite file, no HTTP API), use MLflow's client (training.registry).
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import redis

from contract.errors import InferenceError
from contract.names import ALIAS_CHALLENGER, ALIAS_CHAMPION
from contract.schemas import ServingDecision

if TYPE_CHECKING:
    from training.registry_types import RegistryLike
    from training.settings import RegistrySettings

COMMANDS = ("promote", "rollback", "versions", "sync")
EXIT_FAILED = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description=(
            "The model registry (MLflow; embedded under <model-dir>/mlflow/ unless "
            "MLFLOW_TRACKING_URI names a server) and the serving decision workers read from "
            "Redis (INFERENCE_REDIS_URL)."
        ),
    )
    parser.add_argument("--model-dir", type=Path, default=Path("models"))
    parser.add_argument("--name", default="friedman1", help="model name (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)
    promote = sub.add_parser("promote", help="serve a version (checked first)")
    promote.add_argument("version", help="registry number, alias or artifact version")
    promote.add_argument(
        "--alias", choices=(ALIAS_CHAMPION, ALIAS_CHALLENGER), default=ALIAS_CHAMPION
    )
    promote.add_argument(
        "--canary",
        type=float,
        default=0.0,
        metavar="PERCENT",
        help="as challenger, serving this share of the jobs that pin no version",
    )
    promote.add_argument(
        "--shadow",
        action="store_true",
        help="as challenger, also run on the champion's batches, off the result path",
    )
    sub.add_parser("rollback", help="drop the challenger, or else restore the previous champion")
    sub.add_parser("versions", help="registered versions, aliases, metrics, who serves them")
    sync = sub.add_parser(
        "sync",
        help=(
            "serve MLflow's champion alias if it was moved there (its UI, a client); against "
            "a server, over its REST API, without MLflow installed"
        ),
    )
    sync.add_argument(
        "--every",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="keep checking at this interval (default: once)",
    )
    sync.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help=(
            "also receive MLflow's webhooks here (model_version_alias events, signed with "
            "INFERENCE_WEBHOOK_SECRET): an alias moved is synced at once; runs until stopped"
        ),
    )
    return parser


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    from training import promote
    from training.settings import RegistrySettings

    settings = RegistrySettings()
    client = redis.Redis.from_url(settings.decision_url)
    try:
        if args.command == "sync":
            registry = _sync_registry(settings, args.model_dir)
            return _sync(promote.sync, registry, client, args, settings.webhook_secret)
        from training.registry import Registry

        registry = Registry(settings, args.model_dir)
        if args.command == "promote":
            decision = promote.promote(
                registry,
                client,
                args.name,
                args.version,
                alias=args.alias,
                canary_percent=args.canary,
                shadow=args.shadow,
            )
            print(describe(decision))
        elif args.command == "rollback":
            print(describe(promote.rollback(registry, client, args.name)))
        else:
            serving = promote.serving_now(client)
            print(f"{'version':>7}  {'artifact':<24} {'aliases':<20} {'r2':>7}  created (UTC)")
            for v in registry.versions(args.name):
                created = datetime.fromtimestamp(v.created_ms / 1000, UTC)
                r2 = v.metrics.get("r2")
                who = ", ".join(serving.get(v.artifact_version, [])) or "-"
                print(
                    f"{v.number:>7}  {v.artifact_version:<24} {','.join(v.aliases) or '-':<20} "
                    f"{'-' if r2 is None else f'{r2:.4f}':>7}  {created:%Y-%m-%d %H:%M:%S}  "
                    f"served by: {who}"
                )
    except (InferenceError, redis.RedisError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        client.close()
    return 0


def _sync_registry(settings: RegistrySettings, model_dir: Path) -> RegistryLike:
    uri = settings.tracking_uri
    if uri and uri.startswith(("http://", "https://")):
        from training.mlflow_http import RestRegistry, auth_headers

        headers = auth_headers(
            settings.tracking_token, settings.tracking_username, settings.tracking_password
        )
        return RestRegistry(uri, headers)
    from training.registry import Registry

    return Registry(settings, model_dir)


def _sync(
    sync: Callable[[RegistryLike, redis.Redis, str], ServingDecision | None],
    registry: RegistryLike,
    client: redis.Redis,
    args: argparse.Namespace,
    webhook_secret: str | None = None,
) -> int:
    """Once: exit 1 on a refusal. With --every or --listen: report it and keep going (MLflow
    or Redis down for a while, an alias moved to a broken version and then back)."""
    from training.promote import can_run_models

    if not can_run_models():
        print(
            "note: onnxruntime is not installed here: a version's files are checked (sha256, "
            "manifest), not run; the workers run it before they serve it",
            file=sys.stderr,
        )
    wake = threading.Event()
    listen = getattr(args, "listen", None)
    if listen:
        from training.webhook import start_receiver

        if not webhook_secret:
            print("error: --listen needs INFERENCE_WEBHOOK_SECRET", file=sys.stderr)
            return EXIT_FAILED
        host, _, port = listen.rpartition(":")
        start_receiver(host or "127.0.0.1", int(port), webhook_secret, args.name, wake)
    while True:
        try:
            moved = sync(registry, client, args.name)
            print(describe(moved) if moved else f"{args.name}: in step with MLflow", flush=True)
        except (InferenceError, redis.RedisError) as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            if args.every <= 0 and not listen:
                return EXIT_FAILED
        if args.every <= 0 and not listen:
            return 0
        # A webhook ends the wait early; without --every only a webhook does.
        wake.wait(args.every if args.every > 0 else None)
        wake.clear()


def describe(decision: ServingDecision) -> str:
    text = (
        f"{decision.name}: champion {decision.champion.version} "
        f"(registry {decision.champion.registry_version}), generation {decision.generation}"
    )
    if decision.challenger is not None:
        text += (
            f"; challenger {decision.challenger.version} "
            f"(registry {decision.challenger.registry_version}), "
            f"canary {decision.canary_percent:g}%, shadow {'on' if decision.shadow else 'off'}"
        )
    return text
