"""A ``flops`` HTTP command (``flops ui``, ``flops api``) as a child process on a free port, up when its
``/healthz`` answers; HTTPS checked against ``ca_file`` when given."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.support import REPO_ROOT, terminate, wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CliServer:
    command = ""  # the flops subcommand

    def __init__(self, home: Path, env: dict[str, str], ca_file: Path | None = None) -> None:
        self.home = home
        self.env = env
        self.port = free_port()
        self.url = f"{'https' if ca_file else 'http'}://127.0.0.1:{self.port}"
        self.context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
        self.proc: subprocess.Popen[bytes] | None = None

    def child_env(self) -> dict[str, str]:
        return {**os.environ, "FLOPS_LOG_FORMAT": "json", **self.env}

    @property
    def log_path(self) -> Path:
        return self.home / f"{self.command}.log"

    def start(self, timeout: float = 30.0) -> CliServer:
        self.home.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "flops.cli", self.command, "--port", str(self.port)],
                env=self.child_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
            )
        wait_until(self._up, timeout, f"flops {self.command} on {self.url}")
        return self

    def _up(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, f"flops {self.command} exited: {self.log_tail()}"
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=2, context=self.context) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        terminate(self.proc)

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""
