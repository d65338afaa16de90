"""Credentials inside URLs (``https://bob:token@host/repo.git``) never leave the place that needs them.

An ML repo URL may carry a token; only the builder needs it (to clone). Everything else that can show a URL,
a git message or a build log (failure reasons, events, states, logs, the commands of other agents) goes
through :func:`redact`, which keeps the URL but replaces its user information with ``***``.
"""

from __future__ import annotations

import re
from typing import Any

# scheme://user[:password]@  (user information as RFC 3986 allows it, up to the first @ of the authority)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)[^/@\s]+@")


def redact(text: str) -> str:
    return _USERINFO.sub(r"\g<scheme>***@", text)


def redact_values(value: Any) -> Any:
    """``value`` with every string inside (dict values, list items) redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_values(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact_values(v) for v in value)
    return value


def redact_log_event(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: the same for every field of a log line (exceptions included, once formatted)."""
    return {k: redact_values(v) for k, v in event.items()}
