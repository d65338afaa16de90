"""``flops demo``: the base case on one machine, start to finish.

Starts the embedded broker, the manager and three agents (real processes, each with its own data
directory), pushes IID partitions of scikit-learn's digits to them, submits the example project (the
example ML repo, three learners, three rounds, both post-training steps), shows stage and round progress,
prints the final accuracy, asks the inference server about held-out digits, and stops everything it started.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from flops import topics
from flops.bus import Bus, BusOptions
from flops.errors import FlopsError, TimedOut
from flops.lifecycle_stages import Outcome, Stage
from flops.messages import AgentStatus, ProjectEvent, ProjectState, new_id
from flops.settings import BrokerAddress, Settings
from flops.sla import ProjectSLA

log = structlog.get_logger(__name__)

SOURCE_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_REPO = SOURCE_ROOT / "examples" / "ml_repos" / "digits_sklearn"
EXAMPLE_SLA = SOURCE_ROOT / "examples" / "projects" / "digits.json"


@dataclass
class DemoResult:
    project_id: str
    state: ProjectState
    stage_seconds: dict[str, float]
    total_seconds: float
    predictions: list[int]
    labels: list[int]


def example_repo(work: Path) -> str:
    """The example ML repo as a git repository (the builder clones repos); reused while unchanged."""
    if not EXAMPLE_REPO.is_dir():
        raise FlopsError(f"example repo not found at {EXAMPLE_REPO}: run flops demo from a source checkout")
    repo = work / "digits_sklearn"
    same = repo.is_dir() and all(
        (repo / f.name).exists() and (repo / f.name).read_bytes() == f.read_bytes()
        for f in EXAMPLE_REPO.iterdir()
        if f.is_file()
    )
    if not same:
        shutil.rmtree(repo, ignore_errors=True)
        shutil.copytree(EXAMPLE_REPO, repo, ignore=shutil.ignore_patterns("__pycache__"))
        git = ["git", "-C", str(repo), "-c", "user.email=demo@flops", "-c", "user.name=flops demo"]
        subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True, timeout=30)
        subprocess.run([*git, "add", "."], check=True, timeout=30)
        subprocess.run([*git, "commit", "-qm", "example ML repo"], check=True, timeout=30)
    return f"file://{repo}"


class Fleet:
    """Three ``flops agent`` processes on this machine."""

    def __init__(self, work: Path, address: BrokerAddress, n: int, env: dict[str, str] | None = None) -> None:
        self.work = work
        self.address = address
        self.ids = [f"node-{i}" for i in range(n)]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.env = env or {}

    def start(self) -> None:
        env = {**os.environ, "FLOPS_BROKER_URL": self.address.url, "FLOPS_LOG_FORMAT": "json", **self.env}
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        for agent_id in self.ids:
            agent_dir = self.work / "agents" / agent_id
            # Fresh data and state every run; builds (and so the builder cache) survive between runs.
            for sub in ("data", "state", "work"):
                shutil.rmtree(agent_dir / sub, ignore_errors=True)
            roles = "learner,builder,aggregator,serve" if agent_id == self.ids[0] else "learner"
            with (self.work / "logs" / f"{agent_id}.log").open("wb") as out:
                self.procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "flops.cli",
                            "agent",
                            "--id",
                            agent_id,
                            "--data-dir",
                            str(agent_dir),
                            "--roles",
                            roles,
                        ],
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )

    def wait_online(self, timeout: float = 60.0) -> dict[str, AgentStatus]:
        seen: dict[str, AgentStatus] = {}
        with Bus(
            self.address, BusOptions(client_id=new_id("demo-fleet"), subscriptions=[topics.ALL_AGENT_STATUS])
        ) as bus:
            deadline = time.monotonic() + timeout
            # Ready: online with its data server (learners get data pushed).
            while set(self.ids) - {k for k, v in seen.items() if v.online and v.data_server}:
                left = deadline - time.monotonic()
                if left <= 0 or any(p.poll() is not None for p in self.procs):
                    raise TimedOut("all demo agents online (see the logs in the demo directory)", timeout)
                with contextlib.suppress(Exception):
                    message = bus.inbox.get(timeout=min(left, 0.5))
                    if message.payload:
                        status = AgentStatus.model_validate_json(message.payload)
                        seen[status.agent_id] = status
        return seen

    def push_digits(
        self, statuses: dict[str, AgentStatus], learners: list[str], ca_file: Path | None = None
    ) -> list[Any]:
        """IID partitions of digits' train split pushed to ``learners``' data servers; returns the partitions."""
        from flops.data.mock import load_dataset, push_partitions, split_iid

        partitions = split_iid(load_dataset("digits", split="train"), len(learners), seed=0)
        push_partitions(
            partitions,
            [statuses[a].data_server for a in learners],
            "digits",
            tokens=[self.data_token(a) for a in learners],
            ca_file=ca_file,
        )
        return partitions

    def data_token(self, agent_id: str) -> str:
        """The agent's data admin token (written before it announces its data server, so after wait_online)."""
        from flops.data.server import ADMIN_TOKEN_FILE

        return (self.work / "agents" / agent_id / "state" / ADMIN_TOKEN_FILE).read_text().strip()

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


IMAGE_TOOLS = ("buildah", "podman", "skopeo", "docker-registry", "debootstrap")


@contextlib.contextmanager
def image_registry(work: Path, console: Console) -> Iterator[str]:
    """``flops demo --images``: the FLOps registry on a free loopback port, its storage under the demo dir."""
    from flops.ports import free_port
    from flops.registry import start_registry

    missing = [t for t in IMAGE_TOOLS if shutil.which(t) is None and not Path(f"/usr/sbin/{t}").exists()]
    if missing:
        raise FlopsError(
            f"flops demo --images needs {', '.join(missing)}: "
            "install them with FLOPS_IMAGE_TOOLS=1 bash scripts/install.sh"
        )
    registry = start_registry(_registry_storage(work / "registry"), port=free_port())
    console.print(f"registry: {registry.url} (images are built with buildah and run with podman)")
    try:
        yield registry.address
    finally:
        registry.stop()


def _registry_storage(root: Path) -> Path:
    """The registry's storage for this FLOps code: images are found by (repo, commit), and they carry our own
    packages, so a demo after a change to FLOps must not reuse images built with the old code. Storages of other
    code are removed (nothing else uses them)."""
    from flops.builder.runtime_base import own_code_digest

    storage = root / own_code_digest()[:16]
    if root.is_dir():
        for other in root.iterdir():
            if other != storage:
                shutil.rmtree(other, ignore_errors=True)
    return storage


@contextlib.contextmanager
def artifacts(
    settings: Settings, work: Path, console: Console, images: bool
) -> Iterator[tuple[Settings, dict[str, str]]]:
    """The demo's settings and agents' environment: as given, or with ``images`` a registry (running while the
    block runs) that the manager builds images into and the agents pull from."""
    if not images:
        yield settings, {}
        return
    with image_registry(work, console) as registry:
        yield settings.model_copy(update={"artifacts": "image", "registry": registry}), {"FLOPS_REGISTRY": registry}


@contextlib.contextmanager
def running_system(
    settings: Settings,
    work: Path,
    agents: int,
    agent_env: dict[str, str] | None = None,
    fleet_class: type[Fleet] = Fleet,
) -> Iterator[tuple[BrokerAddress, Fleet]]:
    from flops.broker import start_embedded
    from flops.manager import Manager
    from flops.store_sqlite import SQLiteStore

    broker = start_embedded() if not settings.broker_url else None
    address = broker.address if broker else settings.broker()
    shutil.rmtree(work / "manager", ignore_errors=True)
    manager = Manager(
        settings.model_copy(update={"data_dir": work / "manager"}),
        SQLiteStore(work / "manager" / "manager.sqlite3"),
        address,
        client_id=new_id("flops-demo-manager"),
    ).start()
    fleet = fleet_class(work, address, agents, agent_env)
    try:
        fleet.start()
        yield address, fleet
    finally:
        fleet.stop()
        manager.stop()
        if broker is not None:
            broker.stop()


def run_demo(
    settings: Settings,
    work: Path,
    console: Console,
    *,
    agents: int = 3,
    timeout: float = 600.0,
    images: bool = False,
    ui_port: int | None = None,
) -> DemoResult:
    """The demo; with ``images`` its artifacts are container images (registry, buildah, podman)."""
    work.mkdir(parents=True, exist_ok=True)
    with artifacts(settings, work, console, images) as (settings, agent_env):
        return _run_demo(settings, work, console, agents, timeout, agent_env, ui_port)


def _run_demo(
    settings: Settings,
    work: Path,
    console: Console,
    agents: int,
    timeout: float,
    agent_env: dict[str, str],
    ui_port: int | None,
) -> DemoResult:

    started = time.monotonic()
    repo_url = example_repo(work)
    with (
        _tracked(settings, work, console, on=ui_port is not None) as settings,
        running_system(settings, work, agents, agent_env) as (address, fleet),
        contextlib.ExitStack() as extras,
    ):
        console.print(f"[bold]FLOps demo[/]: broker {address.url}, manager, {agents} agents ({work})")
        ui_url = extras.enter_context(_web_view(settings, address, ui_port, console)) if ui_port else None
        statuses = fleet.wait_online()
        partitions = fleet.push_digits(statuses, fleet.ids, settings.tls_ca_file)
        shares = ", ".join(f"{a}: {p.num_rows} rows" for a, p in zip(fleet.ids, partitions, strict=True))
        console.print(f"data: digits train split → {shares}")
        project_id, state = submit_and_follow(address, classic_sla(repo_url, agents), console, timeout, ui_url=ui_url)
        predictions: list[int] = []
        labels: list[int] = []
        if state.model_url:
            predictions, labels = ask_model(state.model_url, console, token=state.model_token)
        if ui_url and sys.stdin.isatty():
            with contextlib.suppress(KeyboardInterrupt, EOFError):
                input(f"the web view stays at {ui_url} until you press Enter (then the demo stops everything) ")
    total = time.monotonic() - started
    return DemoResult(project_id, state, stage_seconds(state), total, predictions, labels)


def classic_sla(repo_url: str, learners: int) -> ProjectSLA:
    """The example (classic) SLA for the demo's repo and ``learners`` learners."""
    body = example_sla(EXAMPLE_SLA, repo_url)
    tc = body["training_configuration"]
    tc["min_available_clients"] = tc["min_fit_clients"] = tc["min_evaluate_clients"] = learners
    return ProjectSLA.model_validate(body)


def example_sla(path: Path, repo_url: str, *, post_training: bool = True) -> dict[str, Any]:
    """An example SLA's body for the demo's repo, without its post-training steps if asked."""
    body: dict[str, Any] = json.loads(path.read_text())
    body["ml_repo_url"] = repo_url
    if not post_training:
        body["post_training_steps"] = []
    return body


def submit_and_follow(
    address: BrokerAddress, sla: ProjectSLA, console: Console, timeout: float, *, ui_url: str | None = None
) -> tuple[str, ProjectState]:
    """``sla`` submitted and followed to its end (every round of every cycle): (project id, final state)."""
    from flops.client import Client

    tc = sla.training_configuration
    with Client(address) as client:
        reply = client.submit(sla)
        if reply.errors or not reply.project_id:
            raise FlopsError(f"project rejected: {reply.errors}")
        project_id = reply.project_id
        cycles = f": {tc.training_cycles} cycles x {tc.training_rounds} rounds" if tc.mode == "hierarchical" else ""
        console.print(f"project [bold]{project_id}[/] submitted{cycles}")
        if ui_url:
            console.print(f"watch it at {ui_url}/projects/{project_id}", markup=False)
        # training_cycles is 1 in classic mode
        return project_id, follow(client, project_id, tc.training_cycles * tc.training_rounds, console, timeout)


def stage_seconds(state: ProjectState) -> dict[str, float]:
    """How long the project spent in each stage it went through, from its stage timestamps."""
    ts = state.stage_timestamps
    order = [f"{s.value}_at" for s in Stage if f"{s.value}_at" in ts]
    return {order[i].removesuffix("_at"): ts[order[i + 1]] - ts[order[i]] for i in range(len(order) - 1)}


@contextlib.contextmanager
def _tracked(settings: Settings, work: Path, console: Console, *, on: bool) -> Iterator[Settings]:
    """``--ui``: MLflow tracking too, when its extra is installed and no FLOPS_TRACKING_URI names a server."""
    if not on or settings.tracking_uri or importlib.util.find_spec("mlflow") is None:
        yield settings
        return
    from flops.ports import free_port
    from flops.tracking.server import start_tracking

    console.print("starting MLflow tracking (its database is kept in the demo directory) …")
    server = start_tracking(work / "tracking", port=free_port())
    console.print(f"MLflow tracking: {server.url}", markup=False)
    try:
        yield settings.model_copy(update={"tracking_uri": server.url})
    finally:
        server.stop()


@contextlib.contextmanager
def _web_view(settings: Settings, address: BrokerAddress, port: int, console: Console) -> Iterator[str]:
    """``--ui``: the web view (its extra must be installed) for as long as the demo runs."""
    try:
        from flops.ui.serve import alongside
    except ImportError as exc:
        raise FlopsError(f"--ui needs the web view's extra: pip install 'flops-mqtt[ui]' ({exc})") from exc
    with alongside(settings, address, port) as running:
        console.print(f"web view: {running.url}", markup=False)
        yield running.url


def follow(client: object, project_id: str, rounds: int, console: Console, timeout: float) -> ProjectState:
    last: ProjectState | None = None
    with Progress(
        TextColumn("[cyan]{task.fields[stage]:<14}"),
        BarColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task(f"round 0/{rounds}", total=rounds, stage="preparation")
        for item in client.follow(project_id, timeout=timeout):  # type: ignore[attr-defined]
            if isinstance(item, ProjectEvent):
                if item.kind in {"stage.changed", "warning", "rejected"} or item.data.get("level") == "root":
                    progress.console.print(f"  {item.stage or '':<14} {item.message}")
                continue
            last = item
            acc = f"  accuracy {item.progress.accuracy:.3f}" if item.progress.accuracy is not None else ""
            progress.update(
                task,
                completed=item.progress.round,
                stage=item.stage.value,
                description=f"round {item.progress.round}/{rounds}{acc}",
            )
    assert last is not None
    return last


def ask_model(url: str, console: Console, n: int = 12, *, token: str | None = None) -> tuple[list[int], list[int]]:
    """Held-out digits (never pushed to any agent) sent to the inference server."""
    import urllib.request

    from flops.data.mock import load_dataset

    test = load_dataset("digits", split="test")
    # Prepared as the example repo's DataManager prepares its rows: 64 pixels scaled from 0..16 to 0..1.
    rows = [
        [v / 16.0 for row in image for v in row] if isinstance(image[0], list) else [v / 16.0 for v in image]
        for image in test.column("image").to_pylist()
    ]
    labels = test.column("label").to_pylist()
    request = urllib.request.Request(
        url.rstrip("/") + "/invocations",
        data=json.dumps({"inputs": rows}).encode(),
        headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        predictions = [int(p) for p in json.loads(response.read())["predictions"]]
    right = sum(int(p == y) for p, y in zip(predictions, labels, strict=True))
    console.print(f"inference server {url}: {right}/{len(labels)} held-out digits right ({right / len(labels):.3f})")
    console.print("  predicted: " + " ".join(str(p) for p in predictions[:n]))
    console.print("  labels:    " + " ".join(str(y) for y in labels[:n]))
    return predictions, labels


def print_result(result: DemoResult, console: Console) -> int:
    state = result.state
    color = {Outcome.COMPLETED: "green", Outcome.FAILED: "red", Outcome.CANCELLED: "yellow"}[
        state.outcome or Outcome.FAILED
    ]
    console.print(f"[{color}]{state.outcome.value if state.outcome else '?'}[/]: {state.reason}")
    if state.progress.accuracy is not None:
        console.print(f"final federated accuracy (round {state.progress.round}): {state.progress.accuracy:.3f}")
    console.print(
        "stage durations: "
        + ", ".join(f"{k} {v:.1f}s" for k, v in result.stage_seconds.items())
        + f"; total {result.total_seconds:.1f}s"
    )
    return {Outcome.COMPLETED: 0, Outcome.FAILED: 1, Outcome.CANCELLED: 2}[state.outcome or Outcome.FAILED]
