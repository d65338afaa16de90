"""Running the API: uvicorn around :func:`flops.api.app.create_app`, HTTPS when this node has a certificate
(``FLOPS_TLS_CERT_FILE``/``FLOPS_TLS_KEY_FILE``), as the web view does."""

from __future__ import annotations

from dataclasses import dataclass

import uvicorn

from flops.api.actions import ApiConfig
from flops.api.app import create_app
from flops.api.tokens import Tokens
from flops.errors import ConfigError
from flops.settings import Settings

DEFAULT_PORT = 5072
"""The original FLOps manager's port, which the oak CLI calls (``http://<SYSTEM_MANAGER_IP>:5072``)."""


@dataclass
class ApiServer:
    server: uvicorn.Server
    url: str


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


def build(settings: Settings, host: str, port: int) -> ApiServer:
    """The server, not started."""
    tls = settings.tls_cert_file is not None and settings.tls_key_file is not None
    uv = uvicorn.Config(
        create_app(config_from(settings)),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=2,
        ssl_certfile=str(settings.tls_cert_file) if tls else None,
        ssl_keyfile=str(settings.tls_key_file) if tls else None,
    )
    shown = f"[{host}]" if ":" in host else host
    return ApiServer(uvicorn.Server(uv), f"{'https' if tls else 'http'}://{shown}:{port}")
