"""Running the web view: uvicorn around :func:`flops.ui.app.create_app`, HTTPS when this node has a
certificate (``FLOPS_TLS_CERT_FILE``/``FLOPS_TLS_KEY_FILE``), as a blocking call or in a background thread."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import uvicorn

from flops.errors import FlopsError
from flops.settings import BrokerAddress, Settings
from flops.ui.app import UiConfig, create_app

DEFAULT_PORT = 8770


@dataclass
class UiServer:
    server: uvicorn.Server
    url: str
    thread: threading.Thread | None = None

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(10)


def build(settings: Settings, host: str, port: int, address: BrokerAddress | None = None) -> UiServer:
    """The server, not started; ``address`` overrides the settings' broker (the demo's embedded one)."""
    tls = settings.tls_cert_file is not None and settings.tls_key_file is not None
    config = UiConfig(
        address=address or settings.broker(),
        tls_files=settings.broker_tls_files(),
        login=settings.ui_login_required(),
        secure_cookie=tls,
        session_idle_s=settings.ui_session_idle_s,
    )
    uv = uvicorn.Config(
        create_app(config),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=2,
        ssl_certfile=str(settings.tls_cert_file) if tls else None,
        ssl_keyfile=str(settings.tls_key_file) if tls else None,
    )
    shown = f"[{host}]" if ":" in host else host
    return UiServer(uvicorn.Server(uv), f"{'https' if tls else 'http'}://{shown}:{port}")


def start_in_thread(running: UiServer, timeout: float = 15.0) -> UiServer:
    """Serve in a daemon thread until :meth:`UiServer.stop`; raise if it does not come up in time."""
    running.thread = threading.Thread(target=running.server.run, name="flops-ui", daemon=True)
    running.thread.start()
    deadline = time.monotonic() + timeout
    while not running.server.started:
        if not running.thread.is_alive() or time.monotonic() > deadline:
            running.stop()
            raise FlopsError(f"web view did not start on {running.url}")
        time.sleep(0.05)  # uvicorn offers no event for "listening"
    return running


@contextlib.contextmanager
def alongside(settings: Settings, address: BrokerAddress, port: int) -> Iterator[UiServer]:
    """The web view in this process while the block runs (``flops demo --ui``), without login: the demo's
    broker is the embedded development one."""
    running = start_in_thread(build(settings.model_copy(update={"ui_login": "off"}), "127.0.0.1", port, address))
    try:
        yield running
    finally:
        running.stop()
