"""A production deployment for tests: `flops setup production` into a temporary directory, Mosquitto started
with the generated config, and clients configured from nothing but an identity's env file."""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from typer.testing import CliRunner

from flops import setup
from flops.broker import wait_for_port
from flops.bus import Bus, BusOptions
from flops.cli import app
from flops.messages import new_id
from flops.settings import Settings

C = "flops/v1/customers"
A = "flops/v1/agents"


def setup_production(directory: Path, *args: str) -> None:
    result = CliRunner().invoke(app, ["setup", "production", "--dir", str(directory), *args])
    assert result.exit_code == 0, result.output


def env_of(directory: Path, name: str) -> dict[str, str]:
    lines = (directory / "env" / f"{name}.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


@contextmanager
def mosquitto(directory: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Mosquitto with the generated config. As root it would drop to the `mosquitto` user, which cannot read
    the root-owned 0600 files: only this test adds `user root`."""
    conf = (directory / "mosquitto.conf").read_text()
    if os.geteuid() == 0:
        conf += "user root\n"
    test_conf = directory / "test-mosquitto.conf"
    test_conf.write_text(conf)
    log_path = directory / "mosquitto.log"
    port = setup.Layout.from_json((directory / "setup.json").read_text()).port
    with log_path.open("wb") as log:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        proc = subprocess.Popen([binary, "-c", str(test_conf)], stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_port("127.0.0.1", port, 10, proc)  # type: ignore[arg-type]
            yield proc
        finally:
            proc.terminate()
            proc.wait(10)


def bus(directory: Path, name: str, subscriptions: list[str] | None = None) -> Bus:
    """A real paho client configured from nothing but ``env/<name>.env``."""
    settings = Settings(**{k.removeprefix("FLOPS_").lower(): v for k, v in env_of(directory, name).items()})
    options = BusOptions(client_id=new_id(name), subscriptions=subscriptions or [], **settings.broker_tls_files())
    return Bus(settings.broker(), options).connect(timeout=10)


def deliveries(reader: Bus, control: str, timeout: float = 10.0) -> list[str]:
    """Topics ``reader`` received up to and including the ``control`` topic (published last, in order)."""
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while control not in got:
        try:
            got.append(reader.inbox.get(timeout=max(0.01, deadline - time.monotonic())).topic)
        except queue.Empty:
            raise AssertionError(f"{control} never arrived; got {got}") from None
    return got
