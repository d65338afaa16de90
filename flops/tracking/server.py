"""``flops tracking``: an MLflow tracking server on loopback, its backend store in SQLite and its artifacts
(logged models) under ``DATA_DIR/tracking``, served through the server (``--artifacts-destination``), so
aggregators on other hosts need no shared file system. Needs the ``tracking`` extra."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import structlog

from flops.errors import ConfigError, FlopsError

log = structlog.get_logger(__name__)

DEFAULT_PORT = 5005


@dataclass
class TrackingServer:
    proc: subprocess.Popen[bytes]
    url: str
    home: Path

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def wait(self) -> int:
        """Until the server exits. In short waits: a signal handler calling :meth:`stop` meanwhile must be able
        to reap the process (a blocking ``Popen.wait`` would hold the lock it needs)."""
        while True:
            try:
                return self.proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                continue

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def mlflow_command() -> str:
    """The ``mlflow`` CLI of this installation (the tracking extra), else the one on PATH."""
    beside = Path(sys.executable).parent / "mlflow"
    found = str(beside) if beside.exists() else shutil.which("mlflow")
    if not found:
        raise ConfigError("MLflow is not installed: pip install 'flops-mqtt[tracking]'")
    return found


def start_tracking(
    home: Path, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT, timeout: float = 180.0
) -> TrackingServer:
    """Start the server and wait until it answers ``/health``."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "artifacts").mkdir(exist_ok=True)
    argv = [
        mlflow_command(),
        "server",
        "--backend-store-uri",
        f"sqlite:///{home / 'mlflow.db'}",
        "--artifacts-destination",
        str(home / "artifacts"),
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    # MLflow's job runner (GenAI features FLOps does not use) would start consumer processes: off.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with (home / "server.log").open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=home, env=env, start_new_session=True)
    shown = f"[{host}]" if ":" in host else host
    server = TrackingServer(proc, f"http://{shown}:{port}", home)
    deadline = time.monotonic() + timeout
    while not server.healthy():
        if proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            tail = (home / "server.log").read_text(errors="replace")[-1500:]
            raise FlopsError(f"MLflow tracking server did not start on {server.url}:\n{tail}")
        time.sleep(0.2)  # no readiness event to wait on; /health is the contract
    log.info("tracking server started", url=server.url, home=str(home))
    return server
