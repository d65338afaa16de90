"""A real ``flops agent`` process: idempotent by command_id, and honest after a restart about what it no
longer runs (children killed, builds lost)."""

from __future__ import annotations

import json
import queue
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from flops import topics
from flops.bus import Bus, BusOptions
from flops.messages import Command, new_id
from tests.support import AgentProc


def _reports(bus: Bus, want: int, timeout: float = 30.0) -> list[dict]:
    out: list[dict] = []
    deadline = time.monotonic() + timeout
    while len(out) < want and (left := deadline - time.monotonic()) > 0:
        try:
            out.append(json.loads(bus.inbox.get(timeout=left).payload))
        except queue.Empty:
            break
    return out


@pytest.fixture
def listener(broker):
    bus = Bus(broker, BusOptions(client_id=new_id("t-reports"), subscriptions=[topics.ALL_AGENT_REPORTS])).connect()
    yield bus
    bus.close()


def test_a_repeated_command_is_acted_on_once(broker, listener: Bus, tmp_path: Path) -> None:
    agent = AgentProc("idem", tmp_path / "idem", "learner,serve", broker).start()
    try:
        agent.wait_online()
        # serve_model of a package that does not exist: the agent reports command.failed, once per command.
        repeated = Command(
            command_id="p-idem.1.serve_model",
            project_id="p-idem",
            kind="serve_model",
            agent_id="idem",
            spec={"image_ref": "dir:///nowhere"},
        )
        other = repeated.model_copy(update={"command_id": "p-idem.2.serve_model"})
        for cmd in (repeated, repeated, repeated, other):
            listener.publish_wait(topics.agent_commands("idem"), cmd.to_bytes())
        got = _reports(listener, 2)
        # Starts run on a pool of threads, so the two failures may come in either order.
        assert sorted(r["command_id"] for r in got) == [repeated.command_id, other.command_id]
        assert all(r["kind"] == "command.failed" for r in got)
        # A repeat acted on would have failed as fast as the two did: give it that long, bounded.
        assert _reports(listener, 1, timeout=3.0) == []
    finally:
        agent.stop()


def test_a_restarted_agent_kills_leftovers_and_reports_what_it_no_longer_runs(
    broker, listener: Bus, tmp_path: Path
) -> None:
    data_dir = tmp_path / "phoenix"
    (data_dir / "state").mkdir(parents=True)
    # What a killed agent leaves behind: a learner child still running (own session; recorded with its start
    # time, so the restarted agent knows the pid is still its own) and a build in flight.
    orphan = subprocess.Popen(["sleep", "300"], start_new_session=True)
    started = psutil.Process(orphan.pid).create_time()
    (data_dir / "state" / "running.json").write_text(
        json.dumps(
            {
                "p-x.3.run_learner": {
                    "project_id": "p-x",
                    "kind": "run_learner",
                    "pid": orphan.pid,
                    "started": started,
                },
                "p-y.1.build": {"project_id": "p-y", "kind": "build", "pid": None},
            }
        )
    )
    agent = AgentProc("phoenix", data_dir, "learner,serve", broker).start()
    try:
        got = {r["command_id"]: r for r in _reports(listener, 2)}
        assert got["p-x.3.run_learner"]["kind"] == "learner.failed"
        assert got["p-x.3.run_learner"]["agent_id"] == "phoenix"
        assert "restarted" in got["p-x.3.run_learner"]["reason"]
        assert got["p-y.1.build"]["kind"] == "build.failed"
        assert orphan.wait(10) != 0  # killed, not left running
    finally:
        if orphan.poll() is None:
            orphan.kill()
        agent.stop()
