"""Running the API: :mod:`flops.webserver` around :func:`flops.api.app.create_app` (HTTPS when this node has a
certificate, as the web view)."""

from __future__ import annotations

from flops.api.actions import ApiConfig
from flops.api.app import create_app
from flops.api.tokens import Tokens
from flops.errors import ConfigError
from flops.settings import Settings
from flops.webserver import WebServer, web_server

DEFAULT_PORT = 5072
"""The original FLOps manager's port, which the oak CLI calls (``http://<SYSTEM_MANAGER_IP>:5072``)."""


def config_from(settings: Settings) -> ApiConfig:
    """The API's configuration; a ConfigError without a usable tokens file (no token, no API)."""
    if settings.api_tokens_file is None:
        raise ConfigError("flops api needs FLOPS_API_TOKENS_FILE (bearer tokens of the customers, see README)")
    tokens = Tokens.load(settings.api_tokens_file)
    if not len(tokens):
        raise ConfigError(f"tokens file {settings.api_tokens_file}: no customers")
    home = settings.data_dir
    agent_dirs = settings.api_agent_dirs or [home, *sorted(p for p in home.glob("*") if p.is_dir())]
    return ApiConfig(
        address=settings.broker(),
        tls_files=settings.broker_tls_files(),
        tokens=tokens,
        store_path=settings.store_path,
        sqlite_synchronous=settings.sqlite_synchronous,
        tracking_uri=settings.tracking_uri,
        agent_dirs=tuple(agent_dirs),
        data_ca_file=settings.tls_ca_file,
        reply_timeout_s=settings.api_reply_timeout_s,
        max_payload_bytes=settings.max_payload_bytes,
    )


def build(settings: Settings, host: str, port: int) -> WebServer:
    """The server, not started."""
    return web_server(create_app(config_from(settings)), settings, host, port, lifespan="off")
