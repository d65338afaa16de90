"""``flops ui`` as a child process on a free port, up when ``/healthz`` answers."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from tests.support import wait_until
from tests.web_support import CliServer, free_port

__all__ = ["UiProc", "free_port"]


class UiProc(CliServer):
    command = "ui"

    def child_env(self) -> dict[str, str]:
        return {**super().child_env(), "FLOPS_DATA_DIR": str(self.home), **self.env}

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
