"""Faults lose nothing and leave nothing running: real ``flops agent`` processes killed, stopped and restarted.

Slow builds come from a fake ``uv`` put first on the agent's PATH (the builder uses the ``uv`` it finds on
PATH): a Python script that sleeps for ten minutes, so a build started by the agent stays inside an
installer subprocess, the way a slow ``uv pip install`` does, until something kills it. Its command line
holds the fake's path, which is how the tests find it.
"""

from __future__ import annotations

import json
import queue
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from flops import topics
from flops.bus import Bus, BusOptions
from flops.client import Client
from flops.data.mock import load_dataset, push_partitions, split_iid
from flops.demo import EXAMPLE_REPO, example_repo
from flops.messages import Command, new_id
from flops.ports import free_port
from flops.settings import BrokerAddress
from tests.base_support import project_processes, wait_no_processes
from tests.support import AgentProc, answers_ping, wait_until


@pytest.fixture
def listener(broker: BrokerAddress) -> Iterator[Bus]:
    bus = Bus(broker, BusOptions(client_id=new_id("t-reports"), subscriptions=[topics.ALL_AGENT_REPORTS])).connect()
    yield bus
    bus.close()


def wait_report(bus: Bus, match: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, Any]:
    """The first report on ``bus`` that ``match`` accepts (others are dropped)."""
    deadline = time.monotonic() + timeout
    seen = []
    while (left := deadline - time.monotonic()) > 0:
        try:
            report = json.loads(bus.inbox.get(timeout=left).payload)
        except queue.Empty:
            break
        if match(report):
            return report
        seen.append((report.get("command_id"), report.get("kind")))
    raise AssertionError(f"no {what} within {timeout} s; saw {seen}")


def send(bus: Bus, agent: AgentProc, project_id: str, kind: str, spec: dict[str, Any]) -> Command:
    cmd = Command(
        command_id=f"{project_id}.{new_id('c')}.{kind}",
        project_id=project_id,
        kind=kind,
        agent_id=agent.agent_id,
        spec=spec,
    )
    bus.publish_wait(topics.agent_commands(agent.agent_id), cmd.to_bytes())
    return cmd


def pids_gone(pids: list[int], timeout: float) -> None:
    """Wait until none of ``pids`` runs (a zombie no longer runs); fail naming the ones left."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not left:
            return
        if time.monotonic() >= deadline:
            names = [" ".join(psutil.Process(p).cmdline())[:200] for p in left if psutil.pid_exists(p)]
            raise AssertionError(f"still running after {timeout} s: {names}")
        time.sleep(0.05)  # polling the process table: a process ending elsewhere has no event to wait on


def processes_with(needle: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if needle in " ".join(proc.info["cmdline"] or []) and proc.status() != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


@pytest.fixture
def slow_uv(tmp_path: Path) -> Iterator[Path]:
    """A directory holding a ``uv`` that sleeps 600 s; whatever of it is left is killed afterwards."""
    bin_dir = tmp_path / "slow-uv-bin"
    bin_dir.mkdir()
    fake = bin_dir / "uv"
    fake.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(600)\n")
    fake.chmod(0o755)
    yield bin_dir
    for proc in processes_with(str(fake)):
        proc.kill()


def slow_agent(name: str, tmp_path: Path, broker: BrokerAddress, roles: str, bin_dir: Path) -> AgentProc:
    import os

    return AgentProc(name, tmp_path / name, roles, broker, env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})


def start_slow_build(listener: Bus, agent: AgentProc, tmp_path: Path, bin_dir: Path) -> tuple[Command, list[int]]:
    """A build command stuck in the fake uv; returns it and the pids of the build (worker and uv)."""
    agent.start()
    agent.wait_online()
    cmd = send(listener, agent, "p-slow", "build", {"repo_url": example_repo(tmp_path), "flavor": "sklearn"})
    wait_report(listener, lambda r: r["command_id"] == cmd.command_id and r["kind"] == "build.started", 30, "started")
    uv = wait_until(lambda: processes_with(str(bin_dir / "uv")), 60, "the build running the fake uv")
    build = [p.pid for p in uv] + [
        p.pid for p in processes_with("flops.builder.worker") if str(agent.home) in " ".join(p.cmdline())
    ]
    return cmd, build


# --- children die with their agent ---------------------------------------------------------------------------


def test_kill9_of_the_agent_mid_training_takes_its_children_along(
    broker: BrokerAddress, listener: Bus, tmp_path: Path
) -> None:
    agent = AgentProc("hyg-train", tmp_path / "hyg-train", "learner,aggregator", broker).start()
    try:
        agent.wait_online()
        with Client(broker) as client:
            (status,) = [a for a in client.agents() if a.agent_id == agent.agent_id]
        part = split_iid(load_dataset("digits", split="train"), 3, seed=1)[0]
        push_partitions([part], [status.data_server], "hyg", tokens=[agent.data_token()])
        artifact = {"details": {"python": sys.executable, "repo_dir": str(EXAMPLE_REPO)}}
        port = free_port()
        project_id = f"p-train-{new_id('x')[2:10]}"
        one = {"min_available_clients": 1, "min_fit_clients": 1, "min_evaluate_clients": 1}
        send(listener, agent, project_id, "run_aggregator", {"rounds": 1000, "port": port, "artifact": artifact, **one})
        send(
            listener,
            agent,
            project_id,
            "run_learner",
            {"aggregator_address": f"127.0.0.1:{port}", "data_tags": ["hyg"], "artifact": artifact},
        )
        wait_report(listener, lambda r: r["kind"] == "round.completed", 120, "a round.completed")
        running = project_processes(project_id)
        for needle in ("flops.runtime.learner", "flops.runtime.aggregator", "superlink", "supernode", "serverapp"):
            assert any(needle in p.cmdline for p in running), (needle, [str(p) for p in running])

        agent.kill9()
        wait_no_processes(project_id, timeout=10)
    finally:
        agent.stop()


# --- builds stop when told ----------------------------------------------------------------------------------


def test_stop_project_during_the_build_kills_the_build(
    broker: BrokerAddress, listener: Bus, tmp_path: Path, slow_uv: Path
) -> None:
    agent = slow_agent("hyg-cancel", tmp_path, broker, "builder", slow_uv)
    try:
        cmd, build = start_slow_build(listener, agent, tmp_path, slow_uv)
        send(listener, agent, cmd.project_id, "stop_project", {"keep": []})
        pids_gone(build, timeout=5)
    finally:
        agent.stop()


def test_sigterm_mid_build_ends_the_agent_and_the_build_within_5_s(
    broker: BrokerAddress, listener: Bus, tmp_path: Path, slow_uv: Path
) -> None:
    agent = slow_agent("hyg-term", tmp_path, broker, "builder", slow_uv)
    try:
        _, build = start_slow_build(listener, agent, tmp_path, slow_uv)
        assert agent.proc is not None
        started = time.monotonic()
        agent.proc.send_signal(signal.SIGTERM)
        agent.proc.wait(5)
        pids_gone(build, timeout=max(0.5, 5 - (time.monotonic() - started)))
    finally:
        agent.stop()


# --- restarts: nothing lost, nothing killed that is not ours, models served again --------------------------------


def test_a_command_acknowledged_but_not_started_before_a_crash_is_reported_lost(
    broker: BrokerAddress, listener: Bus, tmp_path: Path, slow_uv: Path
) -> None:
    """A run_learner whose environment is not on this node is built here first (slowly): kill -9 the agent
    while it is, and the restarted agent reports the learner lost instead of forgetting it."""
    agent = slow_agent("hyg-lost", tmp_path, broker, "learner", slow_uv)
    try:
        agent.start()
        agent.wait_online()
        elsewhere = {
            "python": "/elsewhere/bin/python",
            "repo_dir": "/elsewhere/repo",
            "repo_url": example_repo(tmp_path),
        }
        cmd = send(
            listener,
            agent,
            "p-lost",
            "run_learner",
            {"aggregator_address": "127.0.0.1:9", "data_tags": ["x"], "artifact": {"details": elsewhere}},
        )
        wait_until(lambda: processes_with(str(slow_uv / "uv")), 60, "the local build running the fake uv")
        agent.kill9()
        agent.start()
        lost = wait_report(listener, lambda r: r["command_id"] == cmd.command_id, 30, "a report on the learner")
        assert lost["kind"] == "learner.failed" and "restarted" in lost["reason"], lost
    finally:
        agent.stop()


def test_a_stale_pid_of_an_unrelated_process_is_not_killed(
    broker: BrokerAddress, listener: Bus, tmp_path: Path
) -> None:
    """running.json names a pid that now belongs to someone else (its start time differs): reported lost,
    not killed."""
    import subprocess

    stranger = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        state = tmp_path / "stale" / "state"
        state.mkdir(parents=True)
        ours_started = psutil.Process(stranger.pid).create_time() - 1000.0  # our learner ran long ago
        (state / "running.json").write_text(
            json.dumps(
                {
                    "p-s.1.run_learner": {
                        "project_id": "p-s",
                        "kind": "run_learner",
                        "pid": stranger.pid,
                        "started": ours_started,
                    }
                }
            )
        )
        agent = AgentProc("stale", tmp_path / "stale", "learner", broker).start()
        try:
            lost = wait_report(listener, lambda r: r["command_id"] == "p-s.1.run_learner", 30, "the lost learner")
            assert lost["kind"] == "learner.failed"
            agent.wait_online()
            assert stranger.poll() is None, "the agent killed a process that was not its own"
        finally:
            agent.stop()
    finally:
        stranger.kill()
        stranger.wait(5)


def _model_package(tmp_path: Path) -> Path:
    """The example repo's model with zero parameters, packaged as build_model_image packages it."""
    from flops.builder import ArtifactRef, package_model

    model = tmp_path / "model"
    model.mkdir()
    np.savez(model / "model.npz", np.zeros((10, 64)), np.zeros(10))
    ref = ArtifactRef(
        key="t",
        python=sys.executable,
        repo_dir=str(EXAMPLE_REPO),
        repo_url="file:///example",
        commit="c" * 40,
        flavor="sklearn",
        platforms=(),
        dependency_file="conda.yaml",
        requirements=(),
    )
    return package_model(model, ref, EXAMPLE_REPO, tmp_path / "package").path


def test_a_restarted_agent_serves_the_finished_projects_model_at_the_same_url(
    broker: BrokerAddress, listener: Bus, tmp_path: Path
) -> None:
    agent = AgentProc("hyg-serve", tmp_path / "hyg-serve", "serve", broker).start()
    try:
        agent.wait_online()
        cmd = send(listener, agent, "p-served", "serve_model", {"image_ref": f"dir://{_model_package(tmp_path)}"})
        served = wait_report(listener, lambda r: r["command_id"] == cmd.command_id, 60, "model.served")
        assert served["kind"] == "model.served", served
        assert answers_ping(served["url"])

        agent.kill9()
        agent.start()
        # No manager acknowledges reports here, so the agent's outbox re-sends the first model.served too.
        again = wait_report(
            listener,
            lambda r: r["command_id"] == cmd.command_id and r["event_id"] != served["event_id"],
            60,
            "the model served again",
        )
        assert again["kind"] == "model.served", again
        assert again["url"] == served["url"] and again["event_id"] != served["event_id"]
        assert answers_ping(again["url"])
    finally:
        agent.stop()
