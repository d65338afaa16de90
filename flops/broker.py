"""The broker behind a small interface: a Mosquitto subprocess (embedded default), the pip-installed
iotcore broker (fallback where no Mosquitto binary exists) or an external URL.

When no broker URL is configured, ``flops broker`` and ``flops manager`` start Mosquitto from PATH with the
development config of ``mosquitto/dev.conf`` (loopback, anonymous, TCP_NODELAY). A broker that is already
listening on the default address is used as it is.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Protocol

import structlog

from flops.errors import BrokerStartFailed
from flops.ports import free_port, port_open
from flops.settings import BrokerAddress

log = structlog.get_logger(__name__)

DEV_SETTINGS = """\
per_listener_settings false
allow_anonymous true
listener {listener}
protocol mqtt
set_tcp_nodelay true
max_inflight_messages 0
max_queued_messages 1000000
message_size_limit 1048576
{persistence}
{logging}
"""
EMBEDDED_LOGGING = "log_dest stderr\nlog_type error\nlog_type warning"


def dev_config(
    listener: str = "1883 127.0.0.1", persistence: str = "persistence false", logging: str = EMBEDDED_LOGGING
) -> str:
    """The development broker's settings: the one source of the embedded broker's config, of
    ``mosquitto/dev.conf`` and of the test container's config (``tests/test_broker.py`` compares them).

    paho never sets TCP_NODELAY and Mosquitto's default is false: Nagle + delayed ACK cost 40-90 ms a hop.
    """
    return DEV_SETTINGS.format(listener=listener, persistence=persistence, logging=logging)


class Broker(Protocol):
    """Something clients can connect to."""

    @property
    def address(self) -> BrokerAddress: ...

    def stop(self) -> None: ...


class ExternalBroker:
    """A broker someone else runs; we only know its address."""

    def __init__(self, address: BrokerAddress) -> None:
        self._address = address

    @property
    def address(self) -> BrokerAddress:
        return self._address

    def stop(self) -> None:
        return None


class MosquittoBroker:
    """Mosquitto started from PATH as our child process, with the development config."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        data_dir: Path | None = None,
        binary: str | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        self._binary = binary or shutil.which("mosquitto") or _sbin("mosquitto")
        if not self._binary:
            raise BrokerStartFailed(
                "no mosquitto binary on PATH (apt-get install mosquitto) and no FLOPS_BROKER_URL given"
            )
        self.host = host
        self.port = port or free_port(host)
        self._dir = Path(tempfile.mkdtemp(prefix="flops-broker-")) if data_dir is None else data_dir
        self._dir.mkdir(parents=True, exist_ok=True)
        persistence = (
            f"persistence true\npersistence_location {self._dir}/\nautosave_interval 5"
            if data_dir is not None
            else "persistence false"
        )
        config = self._dir / "mosquitto.conf"
        config.write_text(
            "# Written by FLOps for an embedded development broker (see mosquitto/dev.conf).\n"
            + dev_config(f"{self.port} {host}", persistence)
        )
        self._log_path = self._dir / "mosquitto.log"
        self._log_file = self._log_path.open("ab")
        self._proc = subprocess.Popen(
            [self._binary, "-c", str(config)],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_for_port(host, self.port, start_timeout, self._proc)
        except BrokerStartFailed:
            self.stop()
            tail = self._log_path.read_text(errors="replace")[-2000:]
            raise BrokerStartFailed(f"mosquitto did not listen on {host}:{self.port}: {tail}") from None
        log.info("embedded mosquitto started", address=self.address.url, pid=self._proc.pid)

    @property
    def address(self) -> BrokerAddress:
        return BrokerAddress(host=self.host, port=self.port)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def wait(self) -> int:
        return self._proc.wait()

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        self._log_file.close()


IOTCORE_CONFIG = """\
# Written by FLOps for the pip-installed fallback broker (iotcore wraps rumqttd).
id = 0

[router]
id = 0
max_connections = 10010
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10

[v5.1]
name = "flops-v5"
listen = "{host}:{port}"
next_connection_delay_ms = 1
    [v5.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = 1048576
    max_inflight_count = 100
    dynamic_filters = true
"""


class IotcoreBroker:
    """The pip-installable fallback (``pip install flops-mqtt[broker]``) for machines without Mosquitto.

    iotcore runs rumqttd in a child process; MQTT 5 needs a rumqttd TOML config, which we write. It has no
    persistence across its own restarts, so it suits development and demos, not production.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, start_timeout: float = 10.0) -> None:
        try:
            from iotcore.broker import Broker as RustBroker
        except ImportError as exc:
            raise BrokerStartFailed(
                "no mosquitto binary and no iotcore package: apt-get install mosquitto, or pip install iotcore"
            ) from exc
        self.host = host
        self.port = port or free_port(host)
        self._dir = Path(tempfile.mkdtemp(prefix="flops-iotcore-"))
        config = self._dir / "rumqttd.toml"
        config.write_text(IOTCORE_CONFIG.format(host=host, port=self.port))
        try:
            self._broker = RustBroker(config_path=str(config)).start(timeout=start_timeout)
        except (OSError, RuntimeError) as exc:
            raise BrokerStartFailed(f"iotcore broker did not start on {host}:{self.port}: {exc}") from exc
        log.info("embedded iotcore broker started", address=self.address.url)

    @property
    def address(self) -> BrokerAddress:
        return BrokerAddress(host=self.host, port=self.port)

    def stop(self) -> None:
        self._broker.stop()


def start_embedded(host: str = "127.0.0.1", port: int = 0, data_dir: Path | None = None) -> Broker:
    """Mosquitto from PATH when there is one, else the pip-installed iotcore broker."""
    if shutil.which("mosquitto") or _sbin("mosquitto"):
        return MosquittoBroker(host, port, data_dir=data_dir)
    log.warning("no mosquitto binary on PATH; falling back to the pip-installed iotcore broker")
    return IotcoreBroker(host, port)


def embedded_or_external(url: str | None, address: BrokerAddress, data_dir: Path | None = None) -> Broker:
    """The broker a server process should use: the configured URL, one already listening, or a new one."""
    if url:
        return ExternalBroker(address)
    if port_open(address.host, address.port):
        log.info("using the broker already listening", address=address.url)
        return ExternalBroker(address)
    return start_embedded(address.host, address.port, data_dir)


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll until something accepts connections on host:port, the process dies, or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BrokerStartFailed(f"process exited with {proc.returncode}")
        if port_open(host, port, timeout=0.2):
            return
        time.sleep(0.02)  # polling a port that has no event to wait on
    raise BrokerStartFailed(f"nothing listening on {host}:{port} after {timeout} s")


def _sbin(name: str) -> str | None:
    for candidate in (f"/usr/sbin/{name}", f"/usr/local/sbin/{name}"):
        if Path(candidate).exists():
            return candidate
    return None
