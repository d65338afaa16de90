"""MLflow's own scoring server for the trained-model image, behind the project's bearer token.

``python -m flops.runtime.mlflow_serve --model DIR|--package DIR [--host H] [--port P] [--advertise-host H]
[--token-file F] [--report-fd FD]`` (the token in a file, or in ``$FLOPS_MODEL_TOKEN``) loads the MLflow model at
DIR (``mlflow.pyfunc.load_model``), builds MLflow's scoring application (``mlflow.pyfunc.scoring_server.init``:
``/ping``, ``/health``, ``/version``, ``/invocations`` with MLflow's request formats) and serves it with uvicorn.
The only thing added is access control: with a token every path except the liveness probes wants
``Authorization: Bearer <token>``.
Once it listens it reports ``model.served`` ``{url}``; a model that cannot be loaded reports ``model.failed``.
"""

from __future__ import annotations

import argparse
import hmac
import os
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import structlog

from flops.builder.model_package import MLFLOW_MODEL_DIR
from flops.runtime.reports import MODEL_FAILED, MODEL_SERVED, ReportWriter
from flops.runtime.serve import TOKEN_ENV, advertised_url, load_token
from flops.supervisor import exit_with_owner

log = structlog.get_logger(__name__)

OPEN_PATHS = frozenset({"/ping", "/health"})
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


def with_token(app: App, token: str | None) -> App:
    """``app`` answering 401 to requests without the bearer token (the liveness probes stay open)."""
    if not token:
        return app
    expected = f"Bearer {token}".encode()

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, expected):
                body = b'{"error_code": "UNAUTHENTICATED", "message": "a bearer token is required"}'
                headers = [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]
                await send({"type": "http.response.start", "status": 401, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await app(scope, receive, send)

    return guarded


def scoring_app(model_dir: Path) -> App:
    import mlflow.pyfunc
    from mlflow.pyfunc import scoring_server

    return scoring_server.init(mlflow.pyfunc.load_model(str(model_dir)))  # type: ignore[no-any-return]


def run(args: argparse.Namespace, reports: ReportWriter) -> int:
    import uvicorn

    try:
        token = load_token(args.token_file, os.environ.get(TOKEN_ENV) or None)
        app = with_token(scoring_app(args.model), token)
    except Exception as exc:
        log.exception("model not loaded", model=str(args.model))
        reports.emit(MODEL_FAILED, reason=f"cannot load the MLflow model {args.model}: {type(exc).__name__}: {exc}")
        return 1
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    url = advertised_url(args.host, sock.getsockname()[1], args.advertise_host)

    def announce() -> None:
        deadline = time.monotonic() + 60.0
        while not server.started and time.monotonic() < deadline and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            log.info("serving", url=url)
            reports.emit(MODEL_SERVED, url=url)

    threading.Thread(target=announce, daemon=True, name="announce").start()
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flops.runtime.mlflow_serve", description=__doc__)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", type=Path, help="an MLflow model directory")
    where.add_argument("--package", type=Path, help="a model package (flops.builder.model_package) with one")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--advertise-host", default=None)
    p.add_argument("--token-file", type=Path, default=None)
    p.add_argument("--report-fd", type=int, default=None)
    args = p.parse_args(argv)
    if args.package is not None:
        args.model = args.package / MLFLOW_MODEL_DIR
    exit_with_owner()  # uvicorn turns SIGTERM into a graceful stop itself
    return run(args, ReportWriter.open(args.report_fd))


if __name__ == "__main__":
    sys.exit(main())
