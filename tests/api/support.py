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
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tests.web_support import CliServer

GO_USER_AGENT = "Go-http-client/1.1"


@dataclass
class Answer:
    status: int
    body: dict[str, Any]
    headers: dict[str, str]


class ApiProc(CliServer):
    command = "api"

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
