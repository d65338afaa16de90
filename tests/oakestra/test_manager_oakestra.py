"""``flops manager --deployer oakestra``: the manager process with the Oakestra adapter, a project submitted as
any user would, its actors placed on the fake System Manager by the unchanged stages.

The fake runs no images here (no podman), so the test plays the actors: for each service Oakestra was asked for,
it publishes what ``flops.oakestra.shim`` would from inside it, named by the service's environment. A builder no
cluster has room for fails the project with Oakestra's reason instead. Either way the application is deleted.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from flops import topics
from flops.bus import Bus, BusOptions
from flops.client import Client
from flops.lifecycle_stages import Outcome
from flops.messages import ProjectEvent, ProjectState, new_id
from flops.oakestra.actors import service_ip
from flops.oakestra.client import SystemManager
from flops.oakestra.deploy import application_name
from flops.oakestra.fake import FakeSystemManager
from flops.settings import BrokerAddress
from flops.sla import ProjectSLA
from tests.oakestra.support import FakeControl, paths
from tests.support import ManagerProcess, StateWatcher, cli, make_git_repo, received, sla, wait_until


@pytest.fixture
def cluster() -> str:
    return f"edge{uuid.uuid4().hex[:8]}"


@pytest.fixture
def manager(
    broker: BrokerAddress, fake: FakeSystemManager, control: FakeControl, cluster: str, tmp_path: Path
) -> Iterator[ManagerProcess]:
    yield from oakestra_manager(broker, fake, control, [cluster], tag=cluster, tmp_path=tmp_path)


def oakestra_manager(
    broker: BrokerAddress,
    fake: FakeSystemManager,
    control: FakeControl,
    clusters: list[str],
    *,
    tag: str,
    tmp_path: Path,
    plain: tuple[str, ...] = (),
) -> Iterator[ManagerProcess]:
    """A manager deploying on the fake whose active clusters are ``clusters``, each with two ``FLOps-learner``
    nodes (two learner seats) holding data ``tag``; the first also builds."""
    offers = [{"cluster_name": name, "supported_addons": []} for name in plain]  # no learners: aggregators only
    control.clusters(
        [
            {"cluster_name": name, "supported_addons": [*(["image-builder"] if i == 0 else []), *["FLOps-learner"] * 2]}
            for i, name in enumerate(clusters)
        ]
        + offers
    )
    # Only this test's seats count: other agents' statuses may be retained on the run's shared broker.
    roles: dict[str, list[str]] = {}
    for i, name in enumerate(clusters):
        roles[f"oak-{name}"] = ["aggregator", "serve", *(["builder"] if i == 0 else []), "learner"]
        roles[f"oak-{name}-2"] = ["learner"]
    for name in plain:
        roles[f"oak-{name}"] = ["aggregator", "serve"]
    agents = tmp_path / "agents.json"
    agents.write_text(json.dumps({"agents": {seat: {"roles": granted} for seat, granted in roles.items()}}))
    proc = ManagerProcess(
        broker,
        tmp_path / "manager",
        extra_env={
            "FLOPS_DEPLOYER": "oakestra",
            "FLOPS_OAKESTRA_URL": fake.url,
            "FLOPS_OAKESTRA_DATA_TAGS": json.dumps({tag: 100}),
            "FLOPS_OAKESTRA_BUILDER_IMAGE": "reg/builder:1",
            "FLOPS_OAKESTRA_POLL_S": "0.1",
            "FLOPS_ARTIFACTS": "image",
            "FLOPS_AGENTS_FILE": str(agents),
        },
    )
    proc.start()
    yield proc
    proc.stop()
    with Bus(broker, BusOptions(client_id=new_id("test-clean"))) as bus:
        bus.connect()
        for seat in roles:  # the retained offline statuses of this test's seats
            bus.publish_wait(topics.agent_status(seat), b"", retain=True)


def test_a_builder_oakestra_cannot_place_fails_the_project_with_its_reason_and_the_application_is_deleted(
    manager: ManagerProcess,
    broker: BrokerAddress,
    control: FakeControl,
    cluster: str,
    sm: SystemManager,
    tmp_path: Path,
) -> None:
    control.script("^builder", "sched_fail")
    repo = make_git_repo(tmp_path / "repo")
    watcher = StateWatcher(broker)
    try:
        with Client(broker) as client:
            reply = client.submit(ProjectSLA.model_validate(sla(repo, data_tags=[cluster], training_rounds=1)))
        assert reply.project_id, reply
        state = watcher.wait_stage(reply.project_id, "finished", timeout=60)
    finally:
        watcher.close()

    assert state.outcome is Outcome.FAILED, manager.log_tail()
    assert "NoActiveClusterWithCapacity" in (state.reason or "") and "build failed" in (state.reason or "")
    created = [c for c in control.calls() if c["method"] == "POST" and c["path"] == "/api/service/"]
    service = created[0]["body"]["applications"][0]["microservices"][0]
    assert service["code"] == "reg/builder:1" and {"type": "direct", "cluster": cluster} in service["constraints"]
    application_deleted(sm, reply.project_id)
    assert any(p.startswith("DELETE /api/application/") for p in paths(control.calls()))


def test_deployer_oakestra_without_its_url_is_refused_naming_the_field(broker: BrokerAddress, tmp_path: Path) -> None:
    done = cli(broker, "manager", "--deployer", "oakestra", data_dir=tmp_path, timeout=30)

    assert done.returncode == 78
    assert "oakestra_url" in done.stderr and "required when deployer is oakestra" in done.stderr


def submit(broker: BrokerAddress, tmp_path: Path, cluster: str, **top: Any) -> str:
    """A one-round project on the data this test's learner seats announce (``top``: more SLA fields); its id."""
    repo = make_git_repo(tmp_path / "repo")
    with Client(broker) as client:
        request = sla(repo, data_tags=[cluster], training_rounds=1, post_training_steps=[]) | top
        reply = client.submit(ProjectSLA.model_validate(request))
    assert reply.project_id, reply
    return reply.project_id


def application_deleted(sm: SystemManager, project: str) -> None:
    name = application_name(project)
    wait_until(lambda: sm.find_application(name) is None, 20, f"the application of {project} deleted")


IMAGES = {"kind": "image", "images": {"learner": "reg/p-learner:abc", "aggregator": "reg/p-aggregator:abc"}}


class Actors:
    """Plays the actors of the services Oakestra was asked for, reporting as the seat each service names."""

    def __init__(self, broker: BrokerAddress, control: FakeControl) -> None:
        self.control = control
        self.bus = Bus(broker, BusOptions(client_id=new_id("test-actors"))).connect()

    @staticmethod
    def created(control: FakeControl, prefix: str) -> list[dict[str, Any]]:
        """The services created so far whose name starts with ``prefix``, as the System Manager was sent them."""
        found = []
        for call in control.calls():
            if call["method"] == "POST" and call["path"] == "/api/service/" and call["response"]["job_id"]:
                service = call["body"]["applications"][0]["microservices"][0]
                if service["microservice_name"].startswith(prefix):
                    found.append(service)
        return found

    def services(self, prefix: str, n: int = 1) -> list[dict[str, Any]]:
        """The first ``n`` services created whose name starts with ``prefix`` (waiting for them)."""

        def enough() -> list[dict[str, Any]] | None:
            found = self.created(self.control, prefix)
            return found if len(found) >= n else None

        return list(wait_until(enough, 30, f"{n} {prefix} services"))[:n]

    def report(self, service: dict[str, Any], kind: str, **fields: Any) -> None:
        env = dict(e.split("=", 1) for e in service["environment"])
        seat, command_id = env["FLOPS_AGENT_ID"], env["FLOPS_COMMAND_ID"]
        body = {"event_id": f"{command_id}.r1", "project_id": env["FLOPS_PROJECT_ID"], "source": f"oakestra/{seat}"}
        body.update(command_id=command_id, kind=kind, **fields)
        if kind.startswith("learner."):
            body["agent_id"] = seat
        self.bus.publish_wait(topics.agent_reports(seat), json.dumps(body).encode())

    def close(self) -> None:
        self.bus.close()


class Events:
    """Every project's event stream, from before the project is submitted (events are not retained)."""

    def __init__(self, broker: BrokerAddress) -> None:
        self.events: list[ProjectEvent] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        options = BusOptions(client_id=new_id("test-events"), subscriptions=[topics.ALL_PROJECT_EVENTS])
        self.bus = Bus(broker, options).connect()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for message in received(self.bus, self._stop):
            event = ProjectEvent.model_validate_json(message.payload)
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()

    def messages(self, project: str) -> list[str]:
        with self._cond:
            return [e.message for e in sorted(self.events, key=lambda e: e.seq) if e.project_id == project]

    def wait(self, project: str, *parts: str, timeout: float = 30.0) -> str:
        """The first message of ``project`` holding every one of ``parts``."""

        def found() -> str | None:
            return next((m for m in self.messages(project) if all(p in m for p in parts)), None)

        with self._cond:
            if not self._cond.wait_for(lambda: found() is not None, timeout):
                raise AssertionError(f"no event with {parts} on {project} in {timeout} s: {self.messages(project)}")
        return found() or ""

    def close(self) -> None:
        self._stop.set()
        self.bus.close()


@dataclass
class Run:
    project: str
    state: ProjectState
    learners: list[dict[str, Any]]
    aggregator: dict[str, Any]


def run_project(
    manager: ManagerProcess,
    broker: BrokerAddress,
    control: FakeControl,
    cluster: str,
    tmp_path: Path,
    *,
    kill9_with_learners: bool = False,
    events: Events | None = None,
    **top: Any,
) -> Run:
    """Submit a project and play its actors until it finishes; with ``kill9_with_learners`` the manager is killed
    and started again while its learners run on Oakestra."""
    watcher = StateWatcher(broker)
    actors = Actors(broker, control)
    try:
        project = submit(broker, tmp_path, cluster, **top)
        [builder] = actors.services("builder")
        actors.report(builder, "build.succeeded", artifact={"ref": "image://reg/p", "details": IMAGES})
        learners = actors.services("flearner", 2)
        if kill9_with_learners:
            manager.kill9()
            manager.start()
        for learner in learners:
            if events is not None:  # a learner on Oakestra reports ready once its service runs
                events.wait(project, learner["microservice_name"], "running on node")
            actors.report(learner, "learner.ready", examples=10)
        [aggregator] = actors.services("aggregator")
        if events is not None:
            events.wait(project, aggregator["microservice_name"], "running on node")
        actors.report(aggregator, "training.succeeded", best_round=1, loss=0.1, accuracy=0.9, model_ref="/m")
        return Run(project, watcher.wait_stage(project, "finished", timeout=60), learners, aggregator)
    finally:
        actors.close()
        watcher.close()


def test_a_project_runs_through_every_stage_with_its_actors_as_oakestra_services(
    manager: ManagerProcess,
    broker: BrokerAddress,
    control: FakeControl,
    cluster: str,
    sm: SystemManager,
    tmp_path: Path,
) -> None:
    run = run_project(manager, broker, control, cluster, tmp_path)

    assert run.state.outcome is Outcome.COMPLETED, (run.state.reason, manager.log_tail())
    seats = {dict(e.split("=", 1) for e in s["environment"])["FLOPS_AGENT_ID"] for s in run.learners}
    assert seats == {f"oak-{cluster}", f"oak-{cluster}-2"}  # one learner per learner seat, as on agents
    assert {learner["code"] for learner in run.learners} == {"reg/p-learner:abc"}
    cmd = run.aggregator["cmd"]
    port = int(cmd[cmd.index("--address") + 1].rpartition(":")[2])
    ip = service_ip(run.project, f"oak-{cluster}", port)
    assert run.aggregator["addresses"]["rr_ip"] == ip
    assert all(learner["cmd"][learner["cmd"].index("--aggregator") + 1] == f"{ip}:{port}" for learner in run.learners)
    # No resource_constraints in the SLA: the adapter's own sizes.
    assert {(s["memory"], s["vcpus"]) for s in [*run.learners, run.aggregator]} == {(1000, 1)}
    application_deleted(sm, run.project)


def test_the_slas_resource_constraints_size_the_learner_and_aggregator_services(
    manager: ManagerProcess,
    broker: BrokerAddress,
    control: FakeControl,
    cluster: str,
    sm: SystemManager,
    tmp_path: Path,
) -> None:
    constraints = {"memory": 768, "vcpus": 2, "storage": 0}
    run = run_project(manager, broker, control, cluster, tmp_path, resource_constraints=constraints)

    assert run.state.outcome is Outcome.COMPLETED, (run.state.reason, manager.log_tail())
    assert [(s["memory"], s["vcpus"]) for s in [*run.learners, run.aggregator]] == [(768, 2)] * 3
    [builder] = Actors.created(control, "builder")
    assert (builder["memory"], builder["vcpus"]) == (2000, 1)  # building an image needs what the builder needs
    application_deleted(sm, run.project)


def test_the_projects_events_say_where_oakestra_scheduled_and_runs_its_actors(
    manager: ManagerProcess, broker: BrokerAddress, control: FakeControl, cluster: str, tmp_path: Path
) -> None:
    events = Events(broker)
    try:
        run = run_project(manager, broker, control, cluster, tmp_path, events=events)
        builder = events.wait(run.project, "builder", f"scheduled on cluster {cluster}")
        aggregator = events.wait(run.project, run.aggregator["microservice_name"], "scheduled on cluster")
    finally:
        events.close()

    assert run.state.outcome is Outcome.COMPLETED, (run.state.reason, manager.log_tail())
    assert "(build on oak-" in builder and "(run_aggregator on oak-" in aggregator
    for learner in run.learners:
        seat = dict(e.split("=", 1) for e in learner["environment"])["FLOPS_AGENT_ID"]
        name = learner["microservice_name"]
        assert any(
            name in m and f"(run_learner on {seat}): running on node {cluster}-node1" in m
            for m in events.messages(run.project)
        )
    assert not [e.message for e in events.events if e.project_id == run.project and e.kind == "rejected"]


def test_a_manager_killed_mid_project_resumes_on_oakestra_and_completes(
    manager: ManagerProcess,
    broker: BrokerAddress,
    control: FakeControl,
    cluster: str,
    sm: SystemManager,
    tmp_path: Path,
) -> None:
    run = run_project(manager, broker, control, cluster, tmp_path, kill9_with_learners=True)

    assert run.state.outcome is Outcome.COMPLETED, (run.state.reason, manager.log_tail())
    assert "oakestra projects adopted" in manager.log_tail(100_000)
    application_deleted(sm, run.project)


def test_a_cancelled_project_has_its_application_deleted(
    manager: ManagerProcess,
    broker: BrokerAddress,
    control: FakeControl,
    cluster: str,
    sm: SystemManager,
    tmp_path: Path,
) -> None:
    control.script("^builder", "ok")  # a build that keeps running until it is stopped
    watcher = StateWatcher(broker)
    actors = Actors(broker, control)
    try:
        project = submit(broker, tmp_path, cluster)
        actors.services("builder")
        wait_until(lambda: sm.find_application(application_name(project)), 20, "the project's application")
        with Client(broker) as client:
            client.cancel(project, "changed my mind")
        state = watcher.wait_stage(project, "finished", timeout=60)
    finally:
        actors.close()
        watcher.close()

    assert state.outcome is Outcome.CANCELLED, (state.reason, manager.log_tail())
    application_deleted(sm, project)


def env_of(service: dict[str, Any]) -> dict[str, str]:
    return dict(e.split("=", 1) for e in service["environment"])


def direct_cluster(service: dict[str, Any]) -> str:
    [cluster] = [c["cluster"] for c in service["constraints"] if c["type"] == "direct"]
    return str(cluster)


def test_a_hierarchical_project_gets_one_aggregator_per_active_cluster_with_its_learners_beside_it(
    broker: BrokerAddress,
    fake: FakeSystemManager,
    control: FakeControl,
    cluster: str,
    sm: SystemManager,
    tmp_path: Path,
) -> None:
    clusters = [f"{cluster}a", f"{cluster}b"]
    plain = f"{cluster}c"  # active, but no FLOps-learner node: no cluster of the project
    running = oakestra_manager(broker, fake, control, clusters, tag=cluster, tmp_path=tmp_path, plain=(plain,))
    manager = next(running)
    watcher = StateWatcher(broker)
    actors = Actors(broker, control)
    try:
        hierarchical = {"mode": "hierarchical", "training_cycles": 1, "data_tags": [cluster], "training_rounds": 1}
        repo = make_git_repo(tmp_path / "repo")
        with Client(broker) as client:
            reply = client.submit(ProjectSLA.model_validate(sla(repo, post_training_steps=[], **hierarchical)))
        assert reply.project_id, reply
        project = reply.project_id
        [builder] = actors.services("builder")
        actors.report(builder, "build.succeeded", artifact={"ref": "image://reg/p", "details": IMAGES})
        learners = actors.services("flearner", 4)
        for learner in learners:
            actors.report(learner, "learner.ready", examples=10)
        aggregators = actors.services("aggregator", 3)
        [root] = [a for a in aggregators if "--cluster" not in a["cmd"]]
        actors.report(root, "training.succeeded", best_round=1, loss=0.1, accuracy=0.9, model_ref="/m")
        state = watcher.wait_stage(project, "finished", timeout=60)
        application_deleted(sm, project)  # while the manager runs: its adapter deletes it
    finally:
        actors.close()
        watcher.close()
        next(running, None)  # the rest of the generator: stops the manager and clears its seats' statuses

    assert state.outcome is Outcome.COMPLETED, (state.reason, manager.log_tail())
    assert len(Actors.created(control, "aggregator")) == 3  # the root and one per cluster with learners
    by_cluster = {a["cmd"][a["cmd"].index("--cluster") + 1]: a for a in aggregators if a is not root}
    assert sorted(by_cluster) == clusters  # one cluster aggregator per active cluster with learners
    for name, aggregator in by_cluster.items():
        assert direct_cluster(aggregator) == name and env_of(aggregator)["FLOPS_AGENT_ID"] == f"oak-{name}"
        cmd = aggregator["cmd"]
        address = f"{aggregator['addresses']['rr_ip']}:{cmd[cmd.index('--address') + 1].rpartition(':')[2]}"
        mine = [learner for learner in learners if direct_cluster(learner) == name]
        assert {env_of(learner)["FLOPS_AGENT_ID"] for learner in mine} == {f"oak-{name}", f"oak-{name}-2"}
        assert {learner["cmd"][learner["cmd"].index("--aggregator") + 1] for learner in mine} == {address}
