"""The broker side of per-project actor identities: the dynamic-security plugin's first state and config lines.

Mosquitto 2.0 asks its plugins first and its ``password_file``/``acl_file`` only for clients the plugin does not
know (the dynamic-security plugin defers those), so the plugin is loaded next to the existing password file and
ACL on the same listener: the manager, agents, customers and operators keep their static identities, and the
plugin holds only the admin identity the manager's Oakestra adapter uses and the ``flops-actor-<project>`` clients
it makes (:mod:`flops.oakestra.dynsec`). The admin's role reaches the control topics and nothing else (the
plugin's ``mosquitto_ctrl dynsec init`` admin may also read every topic). The plugin rewrites its file on every
change: it must be writable by the broker's user. ``python -m flops.oakestra.dynsec_files DIR`` writes the first
state and the manager's settings for it, and prints the config lines.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import secrets
import sys
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


def write_secret(path: Path, text: str) -> None:
    """A new file only its owner reads; refuses to replace one (its admin password would be lost)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flops.oakestra.dynsec_files", description=__doc__.split("\n")[0])
    parser.add_argument("directory", type=Path, help="e.g. the directory of `flops setup production`")
    parser.add_argument("--admin", default="flops-dynsec", help="the admin's username (not one of the password file)")
    args = parser.parse_args(argv)
    directory: Path = args.directory.resolve()
    state = directory / "dynamic-security.json"
    env = directory / "env" / "oakestra-dynsec.env"
    password = secrets.token_urlsafe(24)
    try:
        write_secret(state, initial_state(args.admin, password))
        write_secret(env, f"FLOPS_OAKESTRA_DYNSEC_USERNAME={args.admin}\nFLOPS_OAKESTRA_DYNSEC_PASSWORD={password}\n")
    except FileExistsError as exc:
        print(f"{exc.filename} exists: remove it to start the actors' identities afresh", file=sys.stderr)
        return 1
    plugin = plugin_path() or "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so  # adjust: not found here"
    print(f"# Add to mosquitto.conf (global section); chown {state} to the broker's user:")
    print(config_lines(state, plugin), end="")
    print(f"# Add {env} to the manager's environment.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
