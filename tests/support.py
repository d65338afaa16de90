"""Test-side actors: workers played over MQTT (publishing what real agents would) and a manager process."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flops import topics
from flops.bus import Bus, BusOptions, Inbound
from flops.messages import AgentStatus, Command, CommandReceipt, ProjectState, new_id
from flops.settings import BrokerAddress

REPO_ROOT = Path(__file__).resolve().parent.parent


def terminate(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM a test's process, SIGKILL it when it has not exited 10 s later."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def wait_until(
    predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition", *, interval: float = 0.01
) -> Any:
    """Poll a predicate until it is truthy; fail with ``what`` after ``timeout`` seconds. ``interval``: longer
    for a costly predicate (one that runs a program)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)  # polling state that has no event to wait on
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def received(bus: Bus, stop: threading.Event) -> Iterator[Inbound]:
    """Messages arriving on ``bus`` until ``stop`` is set (waking every 0.2 s to notice it)."""
    while not stop.is_set():
        try:
            yield bus.inbox.get(timeout=0.2)
        except queue.Empty:
            continue


class FakeWorkers:
    """Plays agents: announces them (retained status), receives their commands, publishes reports.

    With ``auto=True`` it answers every command the way a healthy worker would, acting on each
    ``command_id`` once (counted in :attr:`acted`) however often it is delivered (:attr:`delivered`).
    """

    def __init__(self, address: BrokerAddress, *, auto: bool = False, rounds_loss: float = 0.5) -> None:
        self.bus = Bus(
            address,
            BusOptions(client_id=new_id("test-workers"), subscriptions=[f"{topics.PREFIX}/agents/+/commands"]),
        ).connect()
        self.commands: queue.Queue[Command] = queue.Queue()
        self.delivered: Counter[str] = Counter()
        self.acted: Counter[str] = Counter()
        self.all_commands: list[Command] = []
        self.auto = auto
        self.hold: set[str] = set()  # command kinds to receive but not answer (auto mode)
        self.held: list[Command] = []
        self.announced: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    # --- agents --------------------------------------------------------------------------------

    def announce(
        self,
        agent_id: str,
        roles: tuple[str, ...] = ("learner", "builder", "aggregator", "serve"),
        tags: dict[str, int] | None = None,
        online: bool = True,
    ) -> None:
        status = AgentStatus(
            agent_id=agent_id, online=online, roles=list(roles), data_tags=tags if tags is not None else {"digits": 100}
        )
        self.bus.publish_wait(topics.agent_status(agent_id), status.to_bytes(), retain=True)
        self.announced.append(agent_id)

    def fleet(self, n: int = 2, tag: str = "digits", prefix: str = "node") -> list[str]:
        ids = [f"{prefix}-{new_id('a')[2:10]}-{i}" for i in range(n)]
        for agent_id in ids:
            self.announce(agent_id, tags={tag: 100})
        return ids

    # --- commands and reports ------------------------------------------------------------------

    def next_command(self, kind: str | None = None, timeout: float = 20.0) -> Command:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {kind or 'command'} within {timeout} s")
            try:
                cmd = self.commands.get(timeout=left)
            except queue.Empty:
                continue
            if kind is None or cmd.kind == kind:
                return cmd

    def report(self, cmd: Command, kind: str, **fields: Any) -> str:
        event_id = fields.pop("event_id", None) or new_id("e")
        body = {
            "event_id": event_id,
            "project_id": cmd.project_id,
            "source": f"test-worker/{cmd.agent_id}",
            "command_id": cmd.command_id,
            "kind": kind,
            **fields,
        }
        self.bus.publish_wait(topics.agent_reports(cmd.agent_id), json.dumps(body).encode())
        return event_id

    def publish_raw(self, topic: str, payload: bytes) -> None:
        self.bus.publish_wait(topic, payload)

    def release(self, kind: str) -> None:
        """Stop holding ``kind`` and answer what was held."""
        self.hold.discard(kind)
        with self._lock:
            held, self.held = [c for c in self.held if c.kind == kind], [c for c in self.held if c.kind != kind]
        for cmd in held:
            self._act(cmd)

    def _pump(self) -> None:
        for message in received(self.bus, self._stop):
            cmd = Command.model_validate_json(message.payload)
            with self._lock:
                self.delivered[cmd.command_id] += 1
                first = self.delivered[cmd.command_id] == 1
                if first:
                    self.all_commands.append(cmd)
            # Like a real agent: the command is recorded, so the manager stops re-sending it.
            self.bus.publish(
                topics.agent_receipts(cmd.agent_id), CommandReceipt(command_ids=[cmd.command_id]).to_bytes()
            )
            if not first:
                continue  # deduplicated by command_id: a redelivery is not acted on again
            self.commands.put(cmd)
            if self.auto:
                if cmd.kind in self.hold:
                    with self._lock:
                        self.held.append(cmd)
                else:
                    self._act(cmd)

    def _act(self, cmd: Command) -> None:
        with self._lock:
            self.acted[cmd.command_id] += 1
        spec = cmd.spec
        if cmd.kind == "build":
            self.report(cmd, "build.started")
            self.report(
                cmd, "build.succeeded", artifact={"ref": f"env://{spec['cache_key']}", "commit": spec["commit"]}
            )
        elif cmd.kind == "run_learner":
            self.report(cmd, "learner.ready", agent_id=cmd.agent_id, examples=100)
        elif cmd.kind == "run_aggregator":
            self.report(cmd, "aggregator.started", address=spec["address"])
            for rnd in range(1, spec["rounds"] + 1):
                self.report(cmd, "round.completed", round=rnd, loss=1.0 / rnd, accuracy=0.5 + rnd / 100, examples=200)
            self.report(cmd, "training.succeeded", best_round=spec["rounds"], loss=0.1, accuracy=0.9, model_ref="/m")
        elif cmd.kind == "build_model_image":
            self.report(cmd, "model.built", image_ref="dir:///model")
        elif cmd.kind == "serve_model":
            self.report(cmd, "model.served", url="http://127.0.0.1:9/")

    def close(self) -> None:
        self._stop.set()
        for agent_id in self.announced:
            # Clear retained statuses so later tests start with an empty fleet.
            self.bus.publish_wait(topics.agent_status(agent_id), b"", retain=True)
        self.bus.close()


class ManagerProcess:
    """``flops manager`` as a real child process (so tests can kill -9 it)."""

    def __init__(
        self,
        broker: BrokerAddress,
        data_dir: Path,
        extra_env: dict[str, str] | None = None,
        watcher: Callable[[], Bus] | None = None,
    ) -> None:
        self.broker = broker
        self.data_dir = data_dir
        self.extra_env = extra_env or {}
        # How to watch for the manager's birth (a production broker needs credentials to read it).
        self.watcher = watcher or (
            lambda: Bus(broker, BusOptions(client_id=new_id("test-watch"), subscriptions=[topics.manager_status()]))
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "FLOPS_BROKER_URL": self.broker.url,
            "FLOPS_DATA_DIR": str(self.data_dir),
            "FLOPS_LOG_FORMAT": "json",
            **self.extra_env,
        }

    def start(self, timeout: float = 20.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        log = (self.data_dir / f"manager-{self.starts}.log").open("wb")
        watcher = self.watcher()
        if not watcher.connected:
            watcher.connect()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "flops.cli", "manager"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
            )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    message = watcher.inbox.get(timeout=0.2)
                except queue.Empty:
                    if self.proc.poll() is not None:
                        break
                    continue
                if not message.retain and json.loads(message.payload or b"{}").get("online"):
                    return
            raise AssertionError(f"manager did not come up: {self.log_tail()}")
        finally:
            watcher.close()

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        terminate(self.proc)

    def log_tail(self, n: int = 4000) -> str:
        logs = sorted(self.data_dir.glob("manager-*.log"))
        return logs[-1].read_text(errors="replace")[-n:] if logs else ""


def read_state(bus_address: BrokerAddress, project_id: str, timeout: float = 5.0) -> ProjectState:
    from flops.client import Client

    with Client(bus_address) as client:
        return client.state(project_id, timeout=timeout)


def cli(
    broker: BrokerAddress, *args: str, timeout: float = 60.0, data_dir: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``flops ARGS`` as a user would, against the test broker."""
    env = {**os.environ, "FLOPS_BROKER_URL": broker.url, "FLOPS_LOG_FORMAT": "json"}
    if data_dir is not None:
        env["FLOPS_DATA_DIR"] = str(data_dir)
    return subprocess.run(
        [sys.executable, "-m", "flops.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
    )


def cli_background(broker: BrokerAddress, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "FLOPS_BROKER_URL": broker.url, "FLOPS_LOG_FORMAT": "json", "FLOPS_LOG_LEVEL": "debug"}
    return subprocess.Popen(
        [sys.executable, "-u", "-m", "flops.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=REPO_ROOT,
    )


def make_git_repo(path: Path, files: dict[str, str] | None = None) -> str:
    """A local git repository with one commit; returns its file:// URL."""
    path.mkdir(parents=True, exist_ok=True)
    for name, text in (files or {"model_manager.py": "# placeholder\n", "requirements.txt": "numpy\n"}).items():
        (path / name).write_text(text)
    git = ["git", "-C", str(path), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q", "-b", "main", str(path)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    return f"file://{path}"


def sla(repo_url: str, **training: Any) -> dict[str, Any]:
    post = training.pop("post_training_steps", ["build_image_for_trained_model", "deploy_trained_model_image"])
    deadlines = training.pop("deadlines", None)
    body: dict[str, Any] = {
        "customerID": "tests",
        "ml_repo_url": repo_url,
        "ml_model_flavor": "sklearn",
        "training_configuration": {
            "data_tags": ["digits"],
            "training_rounds": 3,
            "min_available_clients": 2,
            "min_fit_clients": 2,
            "min_evaluate_clients": 2,
            **training,
        },
        "post_training_steps": post,
    }
    if deadlines:
        body["deadlines"] = deadlines
    return body


class StateWatcher:
    """Follows every project's retained state; lets a test wait for a stage without sleeping."""

    def __init__(self, address: BrokerAddress) -> None:
        self.states: dict[str, ProjectState] = {}
        self._cond = threading.Condition()
        self.bus = Bus(address, BusOptions(client_id=new_id("test-states"), subscriptions=[topics.ALL_PROJECT_STATES]))
        self.bus.connect()
        self._stop = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for message in received(self.bus, self._stop):
            if not message.payload:
                continue
            state = ProjectState.model_validate_json(message.payload)
            with self._cond:
                old = self.states.get(state.project_id)
                if old is None or state.seq >= old.seq:
                    self.states[state.project_id] = state
                self._cond.notify_all()

    def wait(self, predicate: Callable[[dict[str, ProjectState]], bool], timeout: float = 30.0, what: str = "") -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self.states), timeout):
                summary = {k: (v.stage.value, v.reason) for k, v in self.states.items()}
                raise AssertionError(f"timed out after {timeout} s waiting for {what}: {summary}")

    def wait_stage(self, project_id: str, stage: str, timeout: float = 30.0) -> ProjectState:
        self.wait(lambda s: project_id in s and s[project_id].stage.value == stage, timeout, f"{project_id} in {stage}")
        return self.states[project_id]

    def close(self) -> None:
        self._stop.set()
        self.bus.close()


def transitions_of(db_path: Path, project_id: str) -> list[tuple[str | None, str, str]]:
    """The manager's transition log of one project, read from its SQLite file."""
    import sqlite3

    with sqlite3.connect(db_path) as db:
        return db.execute(
            "SELECT source, dest, trigger FROM transitions WHERE project_id = ? ORDER BY id", (project_id,)
        ).fetchall()


@dataclass
class AgentProc:
    """One ``python -m flops.cli agent`` process with its own directory (data/, work/, builds/, state/)."""

    agent_id: str
    home: Path
    roles: str
    broker: BrokerAddress
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    env: dict[str, str] = field(default_factory=dict)  # added to the agent's environment
    cluster: str | None = None  # the agent's --cluster label (hierarchical mode)

    def start(self) -> AgentProc:
        self.starts += 1
        self.home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "FLOPS_BROKER_URL": self.broker.url, "FLOPS_LOG_FORMAT": "json", **self.env}
        with (self.home / f"agent-{self.starts}.log").open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "flops.cli",
                    "agent",
                    "--id",
                    self.agent_id,
                    "--data-dir",
                    str(self.home),
                    "--roles",
                    self.roles,
                    *(["--cluster", self.cluster] if self.cluster else []),
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
                start_new_session=True,
            )
        return self

    def kill9(self) -> None:
        """SIGKILL the agent process only, as on a crash (its children are in their own process groups)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def data_token(self, timeout: float = 30.0) -> str:
        """The agent's data admin token (``state/data-admin.token``), waiting for the agent to write it."""
        path = self.home / "state" / "data-admin.token"
        wait_until(lambda: path.is_file() and len(path.read_text().strip()) >= 16, timeout, f"{path}")
        return path.read_text().strip()

    def wait_online(self, timeout: float = 30.0) -> None:
        """Until the agent's retained status says online with a data server (or roles without one)."""
        from flops.client import Client

        def online() -> bool:
            assert self.proc is not None and self.proc.poll() is None, f"agent exited: {self.log_tail()}"
            with Client(self.broker) as client:
                found = {a.agent_id: a for a in client.agents()}
            status = found.get(self.agent_id)
            return bool(status and status.online and (status.data_server or "learner" not in status.roles))

        wait_until(online, timeout=timeout, what=f"agent {self.agent_id} online")

    def log_tail(self, n: int = 3000) -> str:
        logs = sorted(self.home.glob("agent-*.log"))
        return logs[-1].read_text(errors="replace")[-n:] if logs else ""


def answers_ping(url: str) -> bool:
    """Whether an inference server answers ``/ping`` at ``url`` (no token needed there)."""
    import urllib.request

    try:
        with urllib.request.urlopen(url.rstrip("/") + "/ping", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False
