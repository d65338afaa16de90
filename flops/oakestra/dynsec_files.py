"""The broker side of per-project actor identities: the dynamic-security plugin's first state and config lines.

Mosquitto 2.0 asks its plugins first and its ``password_file``/``acl_file`` only for clients the plugin does not
know (the dynamic-security plugin defers those), so the plugin is loaded next to the existing password file and
ACL on the same listener: the manager, agents, customers and operators keep their static identities, and the
plugin holds only the admin identity the manager's Oakestra adapter uses and the ``flops-actor-<project>`` clients
it makes (:mod:`flops.oakestra.dynsec`). The admin's role reaches the control topics and nothing else (the
plugin's ``mosquitto_ctrl dynsec init`` admin may also read every topic). The plugin rewrites its file on every
change: it must be writable by the broker's user.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from pathlib import Path
from typing import Any

# Where distributions install the plugin (Debian/Ubuntu, the eclipse-mosquitto image, Fedora).
PLUGIN_PATHS = (
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/lib64/mosquitto_dynamic_security.so",
)
ADMIN_ROLE = "flops-dynsec-admin"
ITERATIONS = 101  # what mosquitto_ctrl writes; the broker hashes with the count stored per client
CONTROL = "$CONTROL/dynamic-security/#"


def plugin_path() -> str | None:
    """The dynamic-security plugin of this machine's Mosquitto, or None."""
    return next((path for path in PLUGIN_PATHS if Path(path).exists()), None)


def password_entry(password: str) -> dict[str, Any]:
    """A client's ``password``/``salt``/``iterations`` as the plugin stores them (PBKDF2-SHA512, base64)."""
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, ITERATIONS)
    return {
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": ITERATIONS,
    }


def initial_state(admin_username: str, admin_password: str) -> str:
    """The plugin's first ``dynamic-security.json``: one admin limited to the control API, default deny."""
    acls = [
        {"acltype": acltype, "topic": CONTROL, "allow": True}
        for acltype in ("publishClientSend", "publishClientReceive", "subscribePattern", "unsubscribePattern")
    ]
    state = {
        "clients": [
            {
                "username": admin_username,
                "textname": "FLOps Oakestra adapter: makes the actors' identities",
                **password_entry(admin_password),
                "roles": [{"rolename": ADMIN_ROLE}],
            }
        ],
        "roles": [{"rolename": ADMIN_ROLE, "acls": acls}],
        "groups": [],
        # Whatever a role does not allow is refused; receiving what one may subscribe to is fine.
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": True,
            "subscribe": False,
            "unsubscribe": True,
        },
    }
    return json.dumps(state, indent=2) + "\n"


def config_lines(state_file: Path, plugin: str) -> str:
    """What a broker config adds (global section, ``per_listener_settings false``) to load the plugin."""
    return f"plugin {plugin}\nplugin_opt_config_file {state_file}\n"
