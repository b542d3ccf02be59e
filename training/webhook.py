"""Receive MLflow's webhooks (MLflow 3.x): an alias moved on the server wakes `sync` at once.

`python -m training sync --listen HOST:PORT` runs this receiver beside its poll loop. MLflow
POSTs a JSON event signed with the webhook's secret (X-MLflow-Signature: "v1," + base64 of
HMAC-SHA256 over "<delivery id>.<timestamp>.<body>"); a `model_version_alias` event of the
model wakes the loop, which then reads the registry and checks the version as always: the
event only says when to look, never what to serve. Unsigned, stale or badly signed requests
are refused (401). Standard library only, like the HTTP sync.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SIGNATURE_HEADER = "X-MLflow-Signature"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
DELIVERY_HEADER = "X-MLflow-Delivery-Id"
# A signed request older (or newer) than this is refused: a captured one cannot be replayed.
MAX_SKEW_S = 300
MAX_BODY_BYTES = 64 * 1024


def signature(secret: str, delivery_id: str, timestamp: str, body: str) -> str:
    digest = hmac.new(
        secret.encode(), f"{delivery_id}.{timestamp}.{body}".encode(), hashlib.sha256
    ).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def verified(
    secret: str, delivery: str, stamp: str, given: str, body: str, now: float | None = None
) -> bool:
    """Whether a request (its three MLflow headers and body) is freshly signed with `secret`."""
    if not (delivery and stamp.isdigit() and given):
        return False
    if abs((time.time() if now is None else now) - int(stamp)) > MAX_SKEW_S:
        return False
    return hmac.compare_digest(given, signature(secret, delivery, stamp, body))


def concerns(event: object, name: str) -> bool:
    """Whether an MLflow event may have moved an alias of model `name`."""
    if not isinstance(event, dict):
        return False
    data = event.get("data")
    return (
        event.get("entity") == "model_version_alias"
        and isinstance(data, dict)
        and data.get("name") == name
    )


def start_receiver(
    host: str, port: int, secret: str, name: str, wake: threading.Event
) -> ThreadingHTTPServer:
    """Serve the receiver on a daemon thread; `wake` is set by each event about `name`."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                self._reply(413)
                return
            body = self.rfile.read(length).decode("utf-8", errors="replace")
            headers = self.headers  # looked up without regard to case
            delivery, stamp, given = (
                headers.get(h, "") for h in (DELIVERY_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER)
            )
            if not verified(secret, delivery, stamp, given, body):
                self._reply(401)
                return
            try:
                event = json.loads(body)
            except ValueError:
                self._reply(400)
                return
            if concerns(event, name):
                wake.set()
            self._reply(200)

        def _reply(self, status: int) -> None:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass  # one line per request would drown the sync's own output

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="webhook", daemon=True).start()
    return server
