"""Test-side helpers for the Oakestra tests: a virtual clock, the fake System Manager's control endpoints, the
shim running a scripted actor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from tests.support import REPO_ROOT

# An actor module for the shim to run: emits the report lines it is given, exits with the code it is given.
ACTOR = """
import argparse
import json

from flops.runtime.reports import ReportWriter

parser = argparse.ArgumentParser()
parser.add_argument("--script")
parser.add_argument("--exit-code", type=int)
parser.add_argument("--report-fd", type=int)
args = parser.parse_args()
out = ReportWriter.open(args.report_fd)
for kind, payload in json.loads(args.script):
    out.emit(kind, **payload)
raise SystemExit(args.exit_code)
"""


def run_shim(env: dict[str, str], script: list[Any], tmp_path: Path, exit_code: int = 0) -> int:
    """``python -m flops.oakestra.shim`` as a service would run it, with ``env`` as its environment (over ours),
    running an actor that reports ``script``; the shim's exit status."""
    (tmp_path / "fake_actor.py").write_text(ACTOR)
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO_ROOT)]), **env}
    argv = [sys.executable, "-m", "flops.oakestra.shim", "fake_actor", "--script", json.dumps(script)]
    argv += ["--exit-code", str(exit_code)]
    done = subprocess.run(argv, env=full_env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    return done.returncode


class VirtualClock:
    """Monotonic seconds that move only when someone sleeps: deadlines of minutes pass in no real time."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeControl:
    """The fake System Manager's ``/__fake/*`` endpoints, over HTTP like any other client."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=5)

    def _post(self, path: str, body: Any = None) -> None:
        self.http.post(path, json=body).raise_for_status()

    def script(self, match: str, script: str | None = None, *, steps: list[str] | None = None, **extra: Any) -> None:
        body = {"match": match, **extra}
        body.update({"script": script} if script else {"steps": steps})
        self._post("/__fake/scripts", body)

    def tick(self, n: int = 1) -> None:
        self._post("/__fake/tick", {"n": n})

    def fault(self, method: str, path: str, status: int, body: Any, times: int = 1) -> None:
        self._post("/__fake/faults", {"method": method, "path": path, "status": status, "body": body, "times": times})

    def clusters(self, clusters: list[dict[str, Any]]) -> None:
        self._post("/__fake/clusters", clusters)

    def expire_tokens(self) -> None:
        self._post("/__fake/tokens/expire")

    def rr_conflicts(self, times: int) -> None:
        self._post("/__fake/rr_conflicts", {"times": times})

    def calls(self) -> list[dict[str, Any]]:
        response = self.http.get("/__fake/calls")
        response.raise_for_status()
        return list(response.json())

    def close(self) -> None:
        self.http.close()


def paths(calls: list[dict[str, Any]]) -> list[str]:
    """``METHOD path`` of every logged call, in order."""
    return [f"{c['method']} {c['path']}" for c in calls]
