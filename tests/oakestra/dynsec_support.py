"""A real Mosquitto with the dynamic-security plugin next to a password file and an ACL, as production runs it.

The password file holds ``manager`` (every ``flops/#`` topic, like the manager and its Oakestra adapter); the
plugin holds only the admin identity the adapter makes actor identities with (:mod:`flops.oakestra.dynsec`).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from pathlib import Path

from flops.broker import wait_for_port
from flops.errors import BrokerStartFailed
from flops.oakestra import dynsec_files
from flops.ports import free_port
from flops.settings import BrokerAddress
from flops.setup import hash_passwords

ADMIN = "flops-dynsec"
MANAGER = "manager"


class DynsecBroker:
    """Mosquitto on a free loopback port with the plugin loaded; stopped by :meth:`stop`."""

    def __init__(self, directory: Path, *, start_timeout: float = 10.0) -> None:
        plugin = dynsec_files.plugin_path()
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if plugin is None or not Path(binary).exists():
            raise BrokerStartFailed("mosquitto or its dynamic-security plugin is not installed")
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.admin_password = secrets.token_urlsafe(24)
        self.manager_password = secrets.token_urlsafe(24)
        state = directory / "dynamic-security.json"
        state.write_text(dynsec_files.initial_state(ADMIN, self.admin_password))
        (directory / "passwd").write_text(hash_passwords("", {MANAGER: self.manager_password}))
        (directory / "acl").write_text(f"user {MANAGER}\ntopic readwrite flops/#\n")
        config = directory / "mosquitto.conf"
        config.write_text(
            "per_listener_settings false\nallow_anonymous false\n"
            f"password_file {directory / 'passwd'}\nacl_file {directory / 'acl'}\n"
            + dynsec_files.config_lines(state, plugin)
            # Mosquitto started as root drops to the `mosquitto` user, which cannot read the test's files.
            + ("user root\n" if os.geteuid() == 0 else "")
            + f"listener {self.port} 127.0.0.1\nprotocol mqtt\nlog_dest stderr\nlog_type error\nlog_type warning\n"
        )
        self.log_path = directory / "mosquitto.log"
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            [binary, "-c", str(config)], stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        try:
            wait_for_port("127.0.0.1", self.port, start_timeout, self._proc)
        except BrokerStartFailed:
            self.stop()
            raise

    def address(self, username: str | None = None, password: str | None = None) -> BrokerAddress:
        return BrokerAddress(host="127.0.0.1", port=self.port, username=username, password=password)

    @property
    def admin(self) -> BrokerAddress:
        return self.address(ADMIN, self.admin_password)

    @property
    def manager(self) -> BrokerAddress:
        return self.address(MANAGER, self.manager_password)

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        self._log.close()
