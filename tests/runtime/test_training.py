"""End-to-end training runtime: real aggregator + learner processes, real Flower, real Arrow Flight."""

from __future__ import annotations

import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from pyarrow import flight
from sklearn.datasets import load_digits

from flops.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
DIGITS_REPO = ROOT / "examples" / "ml_repos" / "digits_sklearn"
TAG = "digits"


class _PartitionServer(flight.FlightServerBase):
    """Serves one table under one data tag, answering list_flights criteria {"data_tags": [...]}."""

    def __init__(self, table: pa.Table) -> None:
        super().__init__("grpc://127.0.0.1:0")
        self._table = table

    def list_flights(self, context: Any, criteria: bytes) -> Iterator[flight.FlightInfo]:
        tags = json.loads(criteria or b"{}").get("data_tags", [])
        if TAG in tags:
            endpoint = flight.FlightEndpoint(TAG.encode(), [])
            descriptor = flight.FlightDescriptor.for_path(TAG)
            yield flight.FlightInfo(self._table.schema, descriptor, [endpoint], self._table.num_rows, -1)

    def do_get(self, context: Any, ticket: flight.Ticket) -> flight.RecordBatchStream:
        return flight.RecordBatchStream(self._table)


@pytest.fixture
def data_servers(request: pytest.FixtureRequest) -> Iterator[list[str]]:
    """One Flight server per learner, each holding an IID digits partition; yields their locations."""
    count = getattr(request, "param", 2)
    digits = load_digits()
    order = np.random.default_rng(7).permutation(len(digits.target))
    servers = []
    for part in np.array_split(order, count):
        table = pa.table(
            {
                "image": pa.array(digits.data[part].tolist(), type=pa.list_(pa.float64())),
                "label": pa.array(digits.target[part], type=pa.int64()),
            }
        )
        server = _PartitionServer(table)
        threading.Thread(target=server.serve, daemon=True).start()
        servers.append(server)
    yield [f"grpc://127.0.0.1:{s.port}" for s in servers]
    for server in servers:
        server.shutdown()


class Worker:
    """A runtime process whose report lines arrive on a pipe (``--report-fd``)."""

    def __init__(self, module: str, args: list[str], marker: str, log: Path) -> None:
        read_fd, write_fd = os.pipe()
        env = dict(os.environ, PYTHONPATH=str(ROOT), FLOPS_TEST_MARKER=marker)
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args, "--report-fd", str(write_fd)],
            env=env,
            pass_fds=(write_fd,),
            stdout=subprocess.DEVNULL,
            stderr=log.open("w"),
            start_new_session=True,
        )
        os.close(write_fd)
        self.reports: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        threading.Thread(target=self._read, args=(read_fd,), daemon=True).start()

    def _read(self, fd: int) -> None:
        with os.fdopen(fd, "r", encoding="utf-8") as stream:
            for line in stream:
                obj = json.loads(line)
                self.reports.put((obj["kind"], obj["payload"]))

    def next_report(self, timeout: float) -> tuple[str, dict[str, Any]]:
        try:
            return self.reports.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no report within {timeout}s; log tail:\n{self.log.read_text()[-3000:]}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout=30)


def _processes_with_marker(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if f"FLOPS_TEST_MARKER={marker}".encode() in (entry / "environ").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _wait_no_processes(marker: str, timeout: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := _processes_with_marker(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


class Training:
    """An aggregator and one learner per data server, started as processes; reports arrive per process."""

    def __init__(self, data_servers: list[str], tmp_path: Path, rounds: int) -> None:
        self.marker = uuid.uuid4().hex
        self.address = f"127.0.0.1:{free_port()}"
        self.model_out = tmp_path / "model"
        self.aggregator = Worker(
            "flops.runtime.aggregator",
            [
                "--repo", str(DIGITS_REPO), "--rounds", str(rounds), "--strategy", "fedavg",
                "--min-available-clients", "2", "--min-fit-clients", "2", "--min-evaluate-clients", "2",
                "--address", self.address, "--model-out", str(self.model_out), "--client-wait-timeout", "120",
                "--work-dir", str(tmp_path / "aggregator"),
            ],
            self.marker,
            tmp_path / "aggregator.log",
        )  # fmt: skip
        self.learners = [
            Worker(
                "flops.runtime.learner",
                [
                    *("--repo", str(DIGITS_REPO), "--aggregator", self.address),
                    *("--data-server", location, "--data-tags", TAG),
                ],
                self.marker,
                tmp_path / f"learner{i}.log",
            )
            for i, location in enumerate(data_servers)
        ]

    def started(self) -> None:
        assert self.aggregator.next_report(60) == ("aggregator.started", {"address": self.address})
        for learner in self.learners:
            kind, payload = learner.next_report(120)
            assert kind == "learner.ready", payload

    def rounds(self) -> tuple[list[dict[str, Any]], str, dict[str, Any]]:
        """Round reports until the aggregator's terminal one: (rounds, its kind, its payload)."""
        completed = []
        while True:
            kind, payload = self.aggregator.next_report(120)
            if kind != "round.completed":
                return completed, kind, payload
            completed.append(payload)

    def worker_of(self, learner: Worker) -> int:
        """The pid of a learner's warm ClientApp worker (its child)."""
        for pid in _processes_with_marker(self.marker):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if int(stat[1]) == learner.proc.pid and b"flops.runtime.clientapp_worker" in cmdline:
                return pid
        raise AssertionError(f"learner {learner.proc.pid} has no ClientApp worker")

    def stop(self) -> None:
        for worker in (self.aggregator, *self.learners):
            worker.stop()
        assert _wait_no_processes(self.marker) == []


@pytest.mark.timeout(300)
def test_two_learners_three_rounds_fedavg(data_servers: list[str], tmp_path: Path) -> None:
    started = time.monotonic()
    training = Training(data_servers, tmp_path, rounds=3)
    try:
        training.started()
        completed, kind, payload = training.rounds()
        assert kind == "training.succeeded", payload
        assert [r["round"] for r in completed] == [1, 2, 3]
        assert all(r["examples"] > 0 and r["duration_s"] > 0 for r in completed)
        assert payload["accuracy"] >= 0.85
        assert payload["best_round"] in {1, 2, 3}
        model = np.load(payload["model_ref"])
        assert [model[k].shape for k in model.files] == [(10, 64), (10,)]
        metrics = json.loads((training.model_out / "metrics.json").read_text())
        assert metrics["best_round"] == payload["best_round"]
        assert training.aggregator.proc.wait(timeout=30) == 0
        print(f"3 rounds x 2 learners: {time.monotonic() - started:.1f}s wall")
    finally:
        training.stop()


@pytest.mark.timeout(300)
def test_a_learner_whose_clientapp_worker_dies_reports_it_at_once(data_servers: list[str], tmp_path: Path) -> None:
    # Before: the SuperNode kept taking the aggregator's messages with nobody to run them, and the round
    # waited for its whole timeout (an hour by default); in CI a cluster's link hung a project that way.
    training = Training(data_servers, tmp_path, rounds=50)
    try:
        training.started()
        assert training.aggregator.next_report(120)[0] == "round.completed"
        victim = training.learners[0]
        os.kill(training.worker_of(victim), signal.SIGKILL)
        kind, payload = victim.next_report(30)
        assert kind == "learner.failed", payload
        assert payload["reason"].startswith("its ClientApp worker exited with status -9"), payload
        assert victim.proc.wait(timeout=30) != 0
    finally:
        training.stop()


@pytest.mark.timeout(300)
def test_a_sigint_to_a_learners_clientapp_worker_does_not_stop_training(
    data_servers: list[str], tmp_path: Path
) -> None:
    # Flower's HTTP retry code sends its own process SIGINT when a heartbeat is refused (401): a heartbeat sent
    # as a task ended killed the warm worker in CI. The worker serves every task, so it keeps going.
    training = Training(data_servers, tmp_path, rounds=4)
    try:
        training.started()
        assert training.aggregator.next_report(120)[0] == "round.completed"
        os.kill(training.worker_of(training.learners[0]), signal.SIGINT)
        completed, kind, payload = training.rounds()
        assert kind == "training.succeeded", payload
        assert [r["round"] for r in completed] == [2, 3, 4]
    finally:
        training.stop()


@pytest.mark.timeout(120)
def test_learner_with_broken_repo_reports_failed(tmp_path: Path) -> None:
    repo = tmp_path / "broken_repo"
    repo.mkdir()
    (repo / "model_manager.py").write_text("import definitely_not_a_module_xyz\n")
    marker = uuid.uuid4().hex
    learner = Worker(
        "flops.runtime.learner",
        ["--repo", str(repo), "--aggregator", "127.0.0.1:9", "--data-server", "grpc://127.0.0.1:9", "--data-tags", TAG],
        marker,
        tmp_path / "learner.log",
    )
    try:
        kind, payload = learner.next_report(60)
        assert kind == "learner.failed"
        assert "ModuleNotFoundError" in payload["reason"]
        assert "definitely_not_a_module_xyz" in payload["reason"]
        assert learner.proc.wait(timeout=30) != 0
    finally:
        learner.stop()
    assert _wait_no_processes(marker) == []


@pytest.mark.timeout(120)
def test_aggregator_fails_when_too_few_learners(tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    aggregator = Worker(
        "flops.runtime.aggregator",
        [
            "--repo", str(DIGITS_REPO), "--rounds", "1",
            "--min-available-clients", "2", "--min-fit-clients", "2", "--min-evaluate-clients", "2",
            "--address", f"127.0.0.1:{free_port()}", "--model-out", str(tmp_path / "model"),
            "--client-wait-timeout", "2", "--work-dir", str(tmp_path / "aggregator"),
        ],
        marker,
        tmp_path / "aggregator.log",
    )  # fmt: skip
    try:
        assert aggregator.next_report(60)[0] == "aggregator.started"
        kind, payload = aggregator.next_report(60)
        assert kind == "training.failed"
        assert "0 of 2 learners connected" in payload["reason"]
        assert aggregator.proc.wait(timeout=30) != 0
    finally:
        aggregator.stop()
    assert _wait_no_processes(marker) == []


class _ErrorReply:
    """What the strategy hook reads from a learner's error reply (``has_error()``, ``error.reason``)."""

    def __init__(self, reason: str) -> None:
        self.error = type("E", (), {"reason": reason})()

    def has_error(self) -> bool:
        return True


def test_identical_learner_failures_report_their_traceback_once() -> None:
    from flops.runtime.reports import ReportWriter
    from flops.runtime.training import RoundTracker, TrainingError

    reason = (
        "ValueError: boom\nTraceback (most recent call last):\n"
        '  File "model_manager.py", line 9, in fit_model\nValueError: boom'
    )
    tracker = RoundTracker(ReportWriter(io.StringIO()))
    with pytest.raises(TrainingError) as caught:
        tracker.train_done(1, [_ErrorReply(reason), _ErrorReply(reason)], None)  # type: ignore[list-item]
    assert str(caught.value).count("Traceback") == 1, str(caught.value)
    assert "2 learners" in str(caught.value)
