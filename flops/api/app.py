"""The API's ASGI application (Starlette): the original FLOps manager's four endpoints, with and without a
trailing slash, behind bearer tokens.

Every request needs ``Authorization: Bearer <token>`` naming a customer of the tokens file (else 401). The
work is blocking MQTT and Arrow Flight IO, run in a worker thread per request (:mod:`flops.api.actions`).
Answers are JSON objects with a ``message`` (the original manager's text where it had one) and, for
refused input, ``errors``: ``[{field, message}]``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from flops.api import actions
from flops.api.actions import Answer, ApiConfig, parse_json, refused
from flops.api.original import CustomerQuery, Login
from flops.api.tokens import Principal
from flops.messages import field_errors

log = structlog.get_logger(__name__)

BODY_LIMIT_FACTOR = 4  # a body may be this many times the broker's payload limit before it is refused unread
Handler = Callable[[Request, Principal, bytes], Awaitable[Answer]]


def create_app(config: ApiConfig) -> Starlette:
    body_limit = config.max_payload_bytes * BODY_LIMIT_FACTOR

    def authenticated(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            started = time.monotonic()
            bound = log.bind(method=request.method, path=request.url.path)
            principal = _principal(request, config)
            if isinstance(principal, Answer):
                answer = principal
            else:
                bound = bound.bind(customer=principal.customer)
                raw = await _body(request, body_limit)
                answer = raw if isinstance(raw, Answer) else await handler(request, principal, raw)
            bound.info("api.request", status=answer.status, ms=round((time.monotonic() - started) * 1000, 1))
            headers = {"WWW-Authenticate": 'Bearer realm="flops"'} if answer.status == 401 else None
            return JSONResponse(answer.body, status_code=answer.status, headers=headers)

        return endpoint

    async def projects(request: Request, principal: Principal, raw: bytes) -> Answer:
        return await asyncio.to_thread(actions.submit_project, config, principal, raw)

    async def mocks(request: Request, principal: Principal, raw: bytes) -> Answer:
        return await asyncio.to_thread(actions.push_mock_data, config, principal, raw)

    async def tracking(request: Request, principal: Principal, raw: bytes) -> Answer:
        # The current oak CLI sends ?customerID=…; the original manager read it from a JSON body.
        named = _customer(request.query_params.get("customerID"), raw)
        if isinstance(named, Answer):
            return named
        return actions.tracking_url(config, principal, named)

    async def database(request: Request, principal: Principal, raw: bytes) -> Answer:
        named = _customer(request.query_params.get("customerID"), raw)
        if isinstance(named, Answer):
            return named
        # The token decides who is an administrator; the body's customerID (the oak CLI's "Admin") does not.
        return await asyncio.to_thread(actions.reset_database, config, principal)

    async def login(request: Request) -> Response:
        """The oak CLI's login (Oakestra's ``/api/auth/login``), for customers with a password in the tokens file."""
        raw = await _body(request, body_limit)
        answer = raw if isinstance(raw, Answer) else _login(config, raw)
        log.info("api.login", status=answer.status)
        return JSONResponse(answer.body, status_code=answer.status)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True})

    routes = [Route("/healthz", healthz)]
    routes += [Route(p, login, methods=["POST"]) for p in ("/api/auth/login", "/api/auth/login/")]
    for path, handler, method in (
        ("/api/flops/projects", projects, "POST"),
        ("/api/flops/mocks", mocks, "POST"),
        ("/api/flops/tracking", tracking, "GET"),
        ("/api/flops/database", database, "DELETE"),
    ):
        endpoint = authenticated(handler)
        routes += [Route(path, endpoint, methods=[method]), Route(f"{path}/", endpoint, methods=[method])]
    return Starlette(routes=routes)


def _login(config: ApiConfig, raw: bytes) -> Answer:
    data, bad = parse_json(raw)
    if bad is not None:
        return bad
    try:
        asked = Login.model_validate(data)
    except ValidationError as exc:
        return refused(422, "invalid login", field_errors(exc))
    token = config.tokens.login(asked.username, asked.password)
    if token is None:
        return refused(401, "wrong username or password")
    return Answer(200, {"token": token})


def _principal(request: Request, config: ApiConfig) -> Principal | Answer:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return refused(401, "missing bearer token: send Authorization: Bearer <token>")
    principal = config.tokens.find(token.strip())
    if principal is None:
        return refused(401, "unknown token")
    return principal


async def _body(request: Request, limit: int) -> bytes | Answer:
    """The request body, up to ``limit`` bytes (413 beyond, without reading the rest)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return refused(413, f"body of {declared} bytes exceeds {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return refused(413, f"body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _customer(query: str | None, raw: bytes) -> str | Answer | None:
    """``customerID`` from the query string, else from a JSON body, else None."""
    if query is not None:
        data: Any = {"customerID": query}
    elif raw.strip():
        data, bad = parse_json(raw)
        if bad is not None:
            return bad
    else:
        return None
    try:
        return CustomerQuery.model_validate(data).customerID
    except ValidationError as exc:
        return refused(422, "invalid request", field_errors(exc))
