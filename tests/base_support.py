"""Test-side actors for the base case with real parts: ``flops agent`` processes, a project feed over MQTT
(states, events and commands of every project, recorded from before the first submit) and /proc scans
for what a project left running."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flops import topics
from flops.bus import Bus, BusOptions
from flops.client import Client
from flops.data.mock import load_dataset
from flops.demo import EXAMPLE_REPO
from flops.messages import AgentStatus, Command, ProjectEvent, ProjectState, new_id
from flops.settings import BrokerAddress
from flops.sla import ProjectSLA
from tests.support import received, wait_until

ALL_EVENTS = topics.ALL_PROJECT_EVENTS
ALL_COMMANDS = f"{topics.PREFIX}/agents/+/commands"


# --- agents ------------------------------------------------------------------------------------------


# --- the project feed ----------------------------------------------------------------------------------


@dataclass
class ProjectRecord:
    states: list[ProjectState] = field(default_factory=list)
    events: list[ProjectEvent] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)
    submitted_at: float = 0.0  # time.time() of the submit
    first_round_at: float | None = None  # time.time() the first round.completed event arrived

    @property
    def state(self) -> ProjectState | None:
        return max(self.states, key=lambda s: s.seq) if self.states else None


class ProjectFeed:
    """Every project's states, events and the commands sent for it, plus every agent's status."""

    def __init__(self, address: BrokerAddress, **tls: str | None) -> None:
        self.address = address
        self.tls = tls
        self.projects: dict[str, ProjectRecord] = defaultdict(ProjectRecord)
        self.agents: dict[str, AgentStatus] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self.bus = Bus(
            address,
            BusOptions(
                client_id=new_id("test-feed"),
                subscriptions=[topics.ALL_PROJECT_STATES, ALL_EVENTS, ALL_COMMANDS, topics.ALL_AGENT_STATUS],
                **tls,  # type: ignore[arg-type]
            ),
        ).connect()
        self._thread = threading.Thread(target=self._pump, daemon=True, name="project-feed")
        self._thread.start()

    def _pump(self) -> None:
        for message in received(self.bus, self._stop):
            if not message.payload:
                continue
            kind = topics.parse(message.topic).kind
            with self._cond:
                if kind == "state":
                    state = ProjectState.model_validate_json(message.payload)
                    self.projects[state.project_id].states.append(state)
                elif kind == "events":
                    event = ProjectEvent.model_validate_json(message.payload)
                    record = self.projects[event.project_id]
                    record.events.append(event)
                    if event.kind == "round.completed" and record.first_round_at is None:
                        record.first_round_at = time.time()
                elif kind == "agent_commands":
                    command = Command.model_validate_json(message.payload)
                    self.projects[command.project_id].commands.append(command)
                elif kind == "agent_status":
                    status = AgentStatus.model_validate_json(message.payload)
                    self.agents[status.agent_id] = status
                self._cond.notify_all()

    def wait(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        with self._cond:
            value = self._cond.wait_for(predicate, timeout)
        if not value:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        return value

    # --- agents ---

    def wait_agents(self, ids: list[str], timeout: float = 60.0, *, tag: str | None = None) -> dict[str, AgentStatus]:
        """Wait until every agent in ``ids`` is online with its data server (and, with ``tag``, holds it)."""

        def ready() -> bool:
            return all(
                (s := self.agents.get(a)) is not None
                and s.online
                and s.data_server is not None
                and (tag is None or s.data_tags.get(tag, 0) > 0)
                for a in ids
            )

        self.wait(ready, timeout, f"agents {ids} online" + (f" holding {tag}" if tag else ""))
        return {a: self.agents[a] for a in ids}

    def wait_offline(self, agent_id: str, timeout: float = 30.0) -> None:
        self.wait(lambda: (s := self.agents.get(agent_id)) is not None and not s.online, timeout, f"{agent_id} offline")

    # --- projects ---

    def submit(self, body: dict[str, Any]) -> str:
        with Client(self.address, **self.tls) as client:
            submitted = time.time()
            reply = client.submit(ProjectSLA.model_validate(body))
        assert reply.project_id and not reply.errors, reply.errors
        with self._cond:
            self.projects[reply.project_id].submitted_at = submitted
        return reply.project_id

    def record(self, project_id: str) -> ProjectRecord:
        with self._cond:
            return self.projects[project_id]

    def state(self, project_id: str) -> ProjectState | None:
        with self._cond:
            return self.projects[project_id].state

    def wait_stage(self, project_id: str, stage: str, timeout: float) -> ProjectState:
        def reached() -> ProjectState | None:
            state = self.projects[project_id].state
            return state if state is not None and state.stage.value == stage else None

        try:
            return self.wait(reached, timeout, f"{project_id} in {stage}")
        except AssertionError as exc:
            state = self.state(project_id)
            seen = (state.stage.value, state.reason) if state else None
            raise AssertionError(f"{exc}; last state {seen}; events {self.messages(project_id)[-8:]}") from None

    def wait_finished(self, project_id: str, timeout: float) -> ProjectState:
        return self.wait_stage(project_id, "finished", timeout)

    def wait_event(self, project_id: str, predicate: Callable[[ProjectEvent], bool], timeout: float, what: str) -> Any:
        def found() -> ProjectEvent | None:
            return next((e for e in self.projects[project_id].events if predicate(e)), None)

        return self.wait(found, timeout, f"{what} on {project_id}'s event stream")

    def events(self, project_id: str, kind: str | None = None) -> list[ProjectEvent]:
        with self._cond:
            events = sorted(self.projects[project_id].events, key=lambda e: e.seq)
        return [e for e in events if kind is None or e.kind == kind]

    def messages(self, project_id: str) -> list[str]:
        return [f"{e.kind}: {e.message}" for e in self.events(project_id)]

    def commands(self, project_id: str, kind: str | None = None) -> list[Command]:
        with self._cond:
            commands = list(self.projects[project_id].commands)
        return [c for c in commands if kind is None or c.kind == kind]

    def close(self) -> None:
        self._stop.set()
        self.bus.close()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port_range(width: int = 50) -> tuple[int, int]:
    """A range of ports nobody listens on now, so aggregators of concurrent test sessions (each with its own
    manager handing out ports from the low end of its range) do not collide."""
    import random
    import socket

    rng = random.Random()
    for _ in range(50):
        # Below the kernel's ephemeral range: outgoing connections (MQTT reconnects, Flower's clients) take
        # ports from there and would collide with an aggregator's.
        low = rng.randrange(20000, _ephemeral_low() - width)
        try:
            for port in range(low, low + 5):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return low, low + width - 1
    raise AssertionError("no free port range found")


# --- processes -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Proc:
    pid: int
    cmdline: str

    def __str__(self) -> str:
        return f"{self.pid}: {self.cmdline[:240]}"


def _read(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def project_processes(project_id: str) -> list[Proc]:
    """Live processes that belong to a project: its id appears in their command line, environment
    (``FLWR_HOME`` of Flower's SuperLink / SuperNode and what they start) or working directory."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        cmdline = _read(f"/proc/{entry}/cmdline")
        if not cmdline:
            continue  # a kernel thread, or a zombie / process gone meanwhile
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            cwd = ""
        if project_id in cmdline or project_id in cwd or project_id in _read(f"/proc/{entry}/environ"):
            found.append(Proc(int(entry), cmdline.strip()))
    return found


def find_process(project_id: str, *needles: str, timeout: float = 30.0) -> Proc:
    """The one process of ``project_id`` whose command line contains every needle (waits for it)."""

    def match() -> Proc | None:
        hits = [p for p in project_processes(project_id) if all(n in p.cmdline for n in needles)]
        return hits[0] if len(hits) == 1 else None

    return wait_until(match, timeout, f"one process of {project_id} matching {needles}")


def wait_no_processes(project_id: str, *, allow: tuple[str, ...] = (), timeout: float = 30.0) -> list[Proc]:
    """Wait until nothing of ``project_id`` runs except processes whose command line holds one of ``allow``;
    returns the allowed ones still running."""
    deadline = time.monotonic() + timeout
    while True:
        running = project_processes(project_id)
        left = [p for p in running if not any(a in p.cmdline for a in allow)]
        if not left:
            return [p for p in running if p not in left]
        if time.monotonic() >= deadline:
            listing = "\n".join(map(str, left))
            raise AssertionError(f"{len(left)} process(es) of {project_id} still running after {timeout} s:\n{listing}")
        time.sleep(0.1)  # polling /proc: a process ending has no event to wait on


def digits_features(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Digits as the example's DataManager prepares them: 64 pixels scaled to 0..1, and the labels."""
    table = load_dataset("digits", split=split)  # type: ignore[arg-type]
    images = np.asarray(table.column("image").to_pylist(), dtype=np.float64)
    return images.reshape(len(images), -1) / 16.0, np.asarray(table.column("label").to_pylist())


def held_out_digits() -> tuple[np.ndarray, np.ndarray]:
    """The test split (never pushed to any agent) as the example DataManager prepares rows: pixels / 16."""
    return digits_features("test")


def train_example_model() -> tuple[list[np.ndarray], Any]:
    """(parameters, model) fitted through the example's ModelManager, handed the data directly instead of through
    a data server. The repo's modules are imported by their top-level names, so they are removed again afterwards
    to keep other tests' repos importable in this process."""
    from flops.runtime.repo import new_model_manager

    saved_path = list(sys.path)
    try:
        manager = new_model_manager(EXAMPLE_REPO)
        # set_model_data() would call the DataManager, which needs a data server; the data is the same.
        manager.x_train, manager.y_train = digits_features("train")
        manager.fit_model()
        return [np.array(p) for p in manager.get_model_parameters()], manager.get_model()
    finally:
        sys.path[:] = saved_path
        for name in ("model_manager", "data_manager"):
            sys.modules.pop(name, None)


def invoke_model(url: str, rows: np.ndarray, token: str | None) -> np.ndarray:
    request = urllib.request.Request(
        url.rstrip("/") + "/invocations",
        data=json.dumps({"inputs": rows.tolist()}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return np.asarray(json.loads(response.read())["predictions"])


def example_model(model_npz: Path) -> Any:
    """The example repo's own ModelManager holding the saved best parameters (imported, then forgotten)."""
    from flops.runtime.repo import new_model_manager

    saved_path = list(sys.path)
    try:
        manager = new_model_manager(EXAMPLE_REPO)
        with np.load(model_npz) as archive:
            manager.set_model_parameters([archive[n] for n in sorted(archive.files, key=lambda n: (len(n), n))])
        return manager.get_model()
    finally:
        sys.path[:] = saved_path
        for name in ("model_manager", "data_manager"):
            sys.modules.pop(name, None)
