"""``flops ui`` as a child process on a free port, up when ``/healthz`` answers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tests.support import REPO_ROOT, terminate, wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class UiProc:
    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.home = home
        self.env = env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> UiProc:
        env = {**os.environ, "FLOPS_LOG_FORMAT": "json", "FLOPS_DATA_DIR": str(self.home), **self.env}
        with (self.home / "ui.log").open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "flops.cli", "ui", "--port", str(self.port)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
            )
        wait_until(self._up, timeout, f"flops ui on {self.url}")
        return self

    def _up(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, f"flops ui exited: {self.log_tail()}"
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def known(self, path: str, timeout: float = 30.0) -> dict:
        """The JSON at ``path`` once the view has it: a view started after a project learns its retained state
        a moment after ``/healthz`` answers (404 until then)."""

        def fetch() -> dict | None:
            try:
                with urllib.request.urlopen(f"{self.url}{path}", timeout=5) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as exc:
                if exc.code != 404:
                    raise
                return None

        return wait_until(fetch, timeout, f"{path} on the web view", interval=0.2)

    def stop(self) -> None:
        terminate(self.proc)

    def log_tail(self, n: int = 3000) -> str:
        path = self.home / "ui.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""
