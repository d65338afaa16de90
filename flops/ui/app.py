"""The web view's ASGI application (Starlette): two pages, their JSON, and server-sent events that push a
fresh snapshot whenever the feed changes. Read-only: nothing here publishes to the broker.

With login (``FLOPS_UI_LOGIN``), every request needs a session cookie from ``/login``, where a person types
their MQTT username and password; their pages come from a feed connected with exactly those credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flops.errors import BrokerUnavailable
from flops.settings import BrokerAddress
from flops.ui.feed import Feed
from flops.ui.sessions import COOKIE, Sessions

log = structlog.get_logger(__name__)

KEEPALIVE_S = 15.0
MIN_PUSH_INTERVAL_S = 0.2  # coalesce bursts of changes into at most five snapshots a second


@dataclass(frozen=True)
class UiConfig:
    """What the application needs; built by ``flops ui`` from the settings."""

    address: BrokerAddress
    tls_files: dict[str, str | None]
    login: bool
    secure_cookie: bool = False
    session_idle_s: float = 3600.0


def create_app(config: UiConfig) -> Starlette:
    shared: dict[str, Any] = {}
    sessions = Sessions(config.address, config.tls_files, idle_s=config.session_idle_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if not config.login:
            shared["feed"] = await asyncio.to_thread(Feed(config.address, **config.tls_files).start)
        try:
            yield
        finally:
            if "feed" in shared:
                await asyncio.to_thread(shared["feed"].stop)
            await asyncio.to_thread(sessions.close)

    def feed_of(request: Request) -> Feed | None:
        if not config.login:
            return shared.get("feed")
        session = sessions.get(request.cookies.get(COOKIE))
        return session.feed if session else None

    def guarded(handler: Callable[[Request, Feed], Any]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            feed = feed_of(request)
            if feed is None:
                if request.url.path.startswith("/api/"):
                    return JSONResponse({"error": "login required"}, status_code=401)
                return RedirectResponse("/login", status_code=303)
            result: Response = await handler(request, feed)
            return result

        return endpoint

    async def projects_page(request: Request, feed: Feed) -> Response:
        return HTMLResponse(_page("Projects", "projects", "", who=_who(request, sessions, config)))

    async def project_page(request: Request, feed: Feed) -> Response:
        project_id = request.path_params["project_id"]
        return HTMLResponse(_page(f"Project {project_id}", "project", project_id, who=_who(request, sessions, config)))

    async def projects_json(request: Request, feed: Feed) -> Response:
        return JSONResponse(feed.observed.summaries())

    async def project_json(request: Request, feed: Feed) -> Response:
        detail = feed.observed.detail(request.path_params["project_id"])
        if detail is None:
            return JSONResponse({"error": "no such project (or not yours)"}, status_code=404)
        return JSONResponse(detail)

    async def stream(request: Request, feed: Feed) -> Response:
        project_id = request.query_params.get("project")

        def snapshot() -> str:
            body = feed.observed.detail(project_id) if project_id else {"projects": feed.observed.summaries()}
            return json.dumps(body, separators=(",", ":"))

        return StreamingResponse(
            _snapshots(feed, snapshot),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def login_form(request: Request) -> Response:
        if not config.login:
            return RedirectResponse("/", status_code=303)
        return HTMLResponse(_login_page(None))

    async def login_submit(request: Request) -> Response:
        if not config.login:
            return RedirectResponse("/", status_code=303)
        form = parse_qs((await request.body()).decode(errors="replace"))
        username = (form.get("username") or [""])[0].strip()
        password = (form.get("password") or [""])[0]
        if not username or not password:
            return HTMLResponse(_login_page("username and password, please"), status_code=400)
        try:
            token = await asyncio.to_thread(sessions.login, username, password)
        except BrokerUnavailable:
            log.warning("ui login refused", username=username)
            return HTMLResponse(_login_page("the broker refused these credentials"), status_code=401)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=config.secure_cookie, max_age=None)
        return response

    async def logout(request: Request) -> Response:
        await asyncio.to_thread(sessions.logout, request.cookies.get(COOKIE))
        response = RedirectResponse("/login" if config.login else "/", status_code=303)
        response.delete_cookie(COOKIE)
        return response

    async def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True, "login": config.login})

    static = StaticFiles(directory=str(resources.files("flops.ui") / "static"))
    app = Starlette(
        routes=[
            Route("/", guarded(projects_page)),
            Route("/projects/{project_id}", guarded(project_page)),
            Route("/api/projects", guarded(projects_json)),
            Route("/api/projects/{project_id}", guarded(project_json)),
            Route("/api/stream", guarded(stream)),
            Route("/login", login_form, methods=["GET"]),
            Route("/login", login_submit, methods=["POST"]),
            Route("/logout", logout, methods=["POST"]),
            Route("/healthz", healthz),
            Mount("/static", static, name="static"),
        ],
        lifespan=lifespan,
    )
    app.add_middleware(SecurityHeaders)
    return app


async def _snapshots(feed: Feed, snapshot: Callable[[], str]) -> AsyncIterator[str]:
    """A snapshot now, then after every change (at most every MIN_PUSH_INTERVAL_S), comments as keep-alive."""
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()

    def wake() -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closing
            loop.call_soon_threadsafe(changed.set)

    stop = feed.observed.listen(wake)
    last = None
    try:
        yield "retry: 2000\n\n"
        while True:
            changed.clear()
            body = snapshot()
            if body != last:
                last = body
                yield f"event: snapshot\ndata: {body}\n\n"
            try:
                await asyncio.wait_for(changed.wait(), KEEPALIVE_S)
            except TimeoutError:
                yield ": keep-alive\n\n"
                continue
            await asyncio.sleep(MIN_PUSH_INTERVAL_S)
    finally:
        stop()


class SecurityHeaders:
    """Only our own scripts and styles; no framing; no referrer."""

    HEADERS = [
        (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
    ]

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)


def _who(request: Request, sessions: Sessions, config: UiConfig) -> str | None:
    if not config.login:
        return None
    session = sessions.get(request.cookies.get(COOKIE))
    return session.username if session else None


def _page(title: str, kind: str, project_id: str, *, who: str | None) -> str:
    account = (
        f'<form method="post" action="/logout" class="account"><span>{html.escape(who)}</span> '
        '<button type="submit">Log out</button></form>'
        if who
        else ""
    )
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)} · FLOps</title>
<link rel="stylesheet" href="/static/style.css">
<script src="/static/app.js" defer></script>
</head>
<body data-page="{kind}" data-project="{html.escape(project_id)}">
<header class="top"><a href="/" class="brand">FLOps</a>{account}
<span id="live" class="live" role="status" aria-live="polite">connecting…</span></header>
<main id="main"><h1>{html.escape(title)}</h1>
<noscript><p>This page updates itself with JavaScript; without it, read
<a href="/api/projects{"/" + html.escape(project_id) if project_id else ""}">the JSON</a>.</p></noscript>
</main>
</body>
</html>
"""


def _login_page(error: str | None) -> str:
    message = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Log in · FLOps</title>
<link rel="stylesheet" href="/static/style.css">
</head>
<body>
<header class="top"><span class="brand">FLOps</span></header>
<main class="login">
<h1>Log in</h1>
<p>With your broker credentials: you see what they may read.</p>
{message}
<form method="post" action="/login">
<label for="username">Username</label>
<input id="username" name="username" autocomplete="username" required>
<label for="password">Password</label>
<input id="password" name="password" type="password" autocomplete="current-password" required>
<button type="submit">Log in</button>
</form>
</main>
</body>
</html>
"""
