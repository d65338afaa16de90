"""``flops api`` as a child process on a free port, and the oak CLI's requests to it, byte for byte.

The Go oak CLI (``oak_go_cli/cmd/addon_flops.go``) POSTs the SLA file re-encoded by ``json.Marshal`` (keys
sorted, compact) with ``Content-Type: application/json`` and ``Authorization: Bearer <token>``, GETs the
tracking URL with ``?customerID=…`` and no body, and DELETEs the database with a JSON body
``{"customerID": …}``. The older Python oak CLI (``requests`` with ``json=``) sent every ``customerID`` as a
JSON body, GET included. Both log in first (``POST /api/auth/login``, at the system manager's address) and
send the token they get back.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support import REPO_ROOT, terminate, wait_until
from tests.ui.support import free_port

GO_USER_AGENT = "Go-http-client/1.1"


@dataclass
class Answer:
    status: int
    body: dict[str, Any]
    headers: dict[str, str]


class ApiProc:
    """With ``ca_file``, the API serves HTTPS (``FLOPS_TLS_CERT_FILE`` in ``env``) and is checked against it."""

    def __init__(self, home: Path, env: dict[str, str], ca_file: Path | None = None) -> None:
        self.home = home
        self.env = env
        self.port = free_port()
        self.url = f"{'https' if ca_file else 'http'}://127.0.0.1:{self.port}"
        self.context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> ApiProc:
        self.home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "FLOPS_LOG_FORMAT": "json", **self.env}
        with (self.home / "api.log").open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "flops.cli", "api", "--port", str(self.port)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
            )
        wait_until(self._up, timeout, f"flops api on {self.url}")
        return self

    def _up(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, f"flops api exited: {self.log_tail()}"
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=2, context=self.context) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        terminate(self.proc)

    def log_tail(self, n: int = 3000) -> str:
        path = self.home / "api.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""

    # --- the oak CLI's requests ---

    def go_login(self, username: str, password: str) -> Answer:
        """``fetchToken``: ``http.Post(…/api/auth/login, "application/json", json.Marshal(map))``, no token."""
        data = json.dumps({"username": username, "password": password}, sort_keys=True, separators=(",", ":"))
        return self.send("POST", "/api/auth/login", {"Content-Type": "application/json"}, data.encode())

    def go_post(self, path: str, token: str, body: Any) -> Answer:
        """``flopsPost``: the SLA as ``json.Marshal`` of the decoded file (a Go map: keys sorted, compact)."""
        data = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
        return self.send("POST", path, headers, data)

    def go_get(self, path: str, token: str, params: dict[str, str]) -> Answer:
        """``flopsGet``: the parameters in the query string, no body."""
        query = urllib.parse.urlencode(sorted(params.items()))
        return self.send("GET", f"{path}?{query}", {"Authorization": f"Bearer {token}"}, None)

    def go_delete(self, path: str, token: str, body: dict[str, str]) -> Answer:
        """``flopsDelete``: a JSON body."""
        data = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
        return self.send("DELETE", path, headers, data)

    def python_request(self, method: str, path: str, token: str, body: Any) -> Answer:
        """The Python oak CLI's ``CustomRequest``: ``requests`` with ``json=body`` (so a GET carries a body)."""
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        return self.send(method, path, headers, json.dumps(body).encode(), user_agent="python-requests/2.32.3")

    def send(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        data: bytes | None,
        *,
        user_agent: str = GO_USER_AGENT,
    ) -> Answer:
        request = urllib.request.Request(
            f"{self.url}{path}", data=data, headers={"User-Agent": user_agent, **headers}, method=method
        )
        try:
            with urllib.request.urlopen(request, timeout=60, context=self.context) as response:
                return Answer(response.status, json.loads(response.read()), _lower(response.headers.items()))
        except urllib.error.HTTPError as exc:
            return Answer(exc.code, json.loads(exc.read()), _lower(exc.headers.items()))


def _lower(items: Iterable[tuple[str, str]]) -> dict[str, str]:
    return {k.lower(): v for k, v in items}
