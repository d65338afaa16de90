"""Running the web view: :mod:`flops.webserver` around :func:`flops.ui.app.create_app`, as a blocking call or
in a background thread (``flops demo --ui``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from flops.settings import BrokerAddress, Settings
from flops.ui.app import UiConfig, create_app
from flops.webserver import WebServer, has_certificate, start_in_thread, web_server

DEFAULT_PORT = 8770


def build(settings: Settings, host: str, port: int, address: BrokerAddress | None = None) -> WebServer:
    """The server, not started; ``address`` overrides the settings' broker (the demo's embedded one)."""
    tls = has_certificate(settings)
    config = UiConfig(
        address=address or settings.broker(),
        tls_files=settings.broker_tls_files(),
        login=settings.ui_login_required(),
        secure_cookie=tls,
        session_idle_s=settings.ui_session_idle_s,
    )
    return web_server(create_app(config), settings, host, port, lifespan="on")


@contextlib.contextmanager
def alongside(settings: Settings, address: BrokerAddress, port: int) -> Iterator[WebServer]:
    """The web view in this process while the block runs (``flops demo --ui``), without login: the demo's
    broker is the embedded development one."""
    running = start_in_thread(build(settings.model_copy(update={"ui_login": "off"}), "127.0.0.1", port, address))
    try:
        yield running
    finally:
        running.stop()
