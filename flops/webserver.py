"""uvicorn for FLOps' HTTP surfaces (the web view, the oak CLI's API): HTTPS when this node has a certificate
(``FLOPS_TLS_CERT_FILE``/``FLOPS_TLS_KEY_FILE``), run blocking or in a background thread."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

import uvicorn

from flops.errors import FlopsError
from flops.settings import Settings


@dataclass
class WebServer:
    server: uvicorn.Server
    url: str
    thread: threading.Thread | None = None

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(10)


def has_certificate(settings: Settings) -> bool:
    return settings.tls_cert_file is not None and settings.tls_key_file is not None


def web_server(
    app: Any, settings: Settings, host: str, port: int, *, lifespan: Literal["on", "off"] = "on"
) -> WebServer:
    """``app`` served on ``host:port``, not started."""
    tls = has_certificate(settings)
    uv = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan=lifespan,
        timeout_graceful_shutdown=2,
        ssl_certfile=str(settings.tls_cert_file) if tls else None,
        ssl_keyfile=str(settings.tls_key_file) if tls else None,
    )
    shown = f"[{host}]" if ":" in host else host
    return WebServer(uvicorn.Server(uv), f"{'https' if tls else 'http'}://{shown}:{port}")


def start_in_thread(running: WebServer, timeout: float = 15.0) -> WebServer:
    """Serve in a daemon thread until :meth:`WebServer.stop`; raise if it does not come up in time."""
    running.thread = threading.Thread(target=running.server.run, name="flops-web", daemon=True)
    running.thread.start()
    deadline = time.monotonic() + timeout
    while not running.server.started:
        if not running.thread.is_alive() or time.monotonic() > deadline:
            running.stop()
            raise FlopsError(f"web server did not start on {running.url}")
        time.sleep(0.05)  # uvicorn offers no event for "listening"
    return running
