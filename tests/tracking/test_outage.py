"""The aggregator's MLflow logging across a tracking-server outage (a real server stopped and started again
on the same store): the round it could not log is a warning, and is logged once the server is back."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from flops.ports import free_port
from flops.tracking.server import start_tracking
from tests.support import REPO_ROOT

mlflow = pytest.importorskip("mlflow", reason="the tracking extra installs mlflow-skinny")


class Driver:
    """tests/tracking/backlog_driver.py as a child process, its report lines on a queue."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.tracking.backlog_driver"],
            env={**os.environ, **env},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
        )
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.lines.put(json.loads(line))

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def expect(self, what: str, matches: Callable[[dict[str, Any]], bool], timeout: float = 60.0) -> dict[str, Any]:
        seen = []
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no {what} within {timeout} s; saw {seen}") from None
            seen.append(line)
            if matches(line):
                return line


@pytest.fixture
def driver_and_server(tmp_path: Path) -> Iterator[tuple[Driver, Any, Path, int]]:
    port = free_port()
    server = start_tracking(tmp_path / "mlflow", port=port)
    spec = {
        "url": server.url,
        "experiment": "FLOps Project p-outage",
        "project_id": "p-outage",
        "flavor": "sklearn",
        "registered_model": "flops-p-outage",
    }
    driver = Driver({"FLOPS_TRACKING": json.dumps(spec)})
    holder = {"server": server}
    try:
        yield driver, holder, tmp_path / "mlflow", port
    finally:
        driver.proc.kill()
        driver.proc.wait(10)
        holder["server"].stop()


def test_a_round_missed_during_an_outage_is_logged_when_the_server_is_back(
    driver_and_server: tuple[Driver, Any, Path, int],
) -> None:
    driver, holder, home, port = driver_and_server

    def logged(number: int) -> Callable[[dict[str, Any]], bool]:
        return lambda r: r["kind"] == "tracking.logged" and r["payload"].get("round") == number

    driver.send("round 1")
    driver.expect("round 1 logged", logged(1))
    holder["server"].stop()
    driver.send("round 2")
    warning = driver.expect("a warning", lambda r: "warning" in r["payload"])
    assert "unreachable" in warning["payload"]["warning"] and "round 2" in warning["payload"]["warning"]

    holder["server"] = start_tracking(home, port=port)
    driver.send("round 3")
    driver.expect("round 2 logged late", logged(2))
    driver.expect("round 3 logged", logged(3))
    driver.send("end")
    end = driver.expect("the end", lambda r: r["kind"] == "training.failed" or "warning" in r["payload"])
    assert end["kind"] == "training.failed", end  # nothing left unlogged: no warning before it

    client = mlflow.MlflowClient(tracking_uri=holder["server"].url)
    experiment = client.get_experiment_by_name("FLOps Project p-outage")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(int(r.data.tags["flops.round"]) for r in runs) == [1, 2, 3]
