"""The Oakestra adapter between a real Mosquitto and the fake System Manager, seen from the manager's side of the
agent protocol: seats announced per active cluster, a command receipted and placed as exactly one service, a
service Oakestra cannot run reported as the command's failure and deleted, stop_project deleting the application.
"""

from __future__ import annotations

import json
import queue
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from flops import topics
from flops.bus import Bus, BusOptions, Inbound
from flops.messages import AgentStatus, Command, CommandReceipt, ReportAck, new_id
from flops.oakestra.actors import ActorConfig, service_ip
from flops.oakestra.adapter import AdapterConfig, OakestraAdapter
from flops.oakestra.client import SystemManager
from flops.oakestra.deploy import Timing, application_name
from flops.oakestra.fake import FakeSystemManager
from flops.settings import BrokerAddress
from tests.oakestra.support import FakeControl, paths
from tests.support import wait_until

TIMING = Timing(poll_interval=0.05, schedule_deadline=5, node_deadline=5, start_deadline=5, failure_grace=5)
IMAGES = {"kind": "image", "images": {"learner": "reg/p-learner:abc", "aggregator": "reg/p-aggregator:abc"}}
WAIT = 20.0


class ManagerSide:
    """The manager's end of the agent protocol for the seats of one test: what they announce and report."""

    def __init__(self, broker: BrokerAddress, tag: str) -> None:
        self.tag = tag
        self.bus = Bus(
            broker,
            BusOptions(
                client_id=new_id("test-manager"),
                subscriptions=[topics.ALL_AGENT_STATUS, topics.ALL_AGENT_REPORTS, topics.ALL_AGENT_RECEIPTS],
            ),
        ).connect()
        self.seen: list[Inbound] = []

    def _ours(self, message: Inbound) -> bool:
        return self.tag in (topics.parse(message.topic).ident or "")

    def wait(self, what: str, match: Callable[[Inbound], bool], timeout: float = WAIT) -> Inbound:
        """The first message of ours (seen already or arriving within ``timeout``) that ``match`` accepts."""
        deadline = time.monotonic() + timeout
        index = 0
        while True:
            while index < len(self.seen):
                message = self.seen[index]
                index += 1
                if match(message):
                    return message
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}; saw {self.topics()}")
            try:
                message = self.bus.inbox.get(timeout=left)
            except queue.Empty:
                continue
            if self._ours(message):
                self.seen.append(message)

    def status(self, agent_id: str, *, online: bool = True) -> AgentStatus:
        def match(message: Inbound) -> bool:
            if message.topic != topics.agent_status(agent_id) or not message.payload:
                return False
            return AgentStatus.model_validate_json(message.payload).online is online

        return AgentStatus.model_validate_json(self.wait(f"{agent_id} online={online}", match).payload)

    def report(self, command_id: str, kind: str, timeout: float = WAIT) -> dict[str, Any]:
        def match(message: Inbound) -> bool:
            if topics.parse(message.topic).kind != "agent_reports":
                return False
            body = json.loads(message.payload)
            return bool(body.get("command_id") == command_id and body.get("kind") == kind)

        return dict(json.loads(self.wait(f"{kind} for {command_id}", match, timeout).payload))

    def receipt(self, agent_id: str, command_id: str) -> None:
        def match(message: Inbound) -> bool:
            if message.topic != topics.agent_receipts(agent_id):
                return False
            return command_id in CommandReceipt.model_validate_json(message.payload).command_ids

        self.wait(f"receipt of {command_id}", match)

    def command(self, agent_id: str, project_id: str, kind: str, **spec: Any) -> Command:
        cmd = Command(command_id=new_id("c"), project_id=project_id, kind=kind, agent_id=agent_id, spec=spec)  # type: ignore[arg-type]
        self.bus.publish_wait(topics.agent_commands(agent_id), cmd.to_bytes())
        return cmd

    def resend(self, cmd: Command) -> None:
        self.bus.publish_wait(topics.agent_commands(cmd.agent_id), cmd.to_bytes())

    def ack(self, agent_id: str, event_id: str) -> None:
        self.bus.publish_wait(topics.agent_acks(agent_id), ReportAck(event_ids=[event_id]).to_bytes())

    def reported(self, command_id: str) -> list[str]:
        """The event ids of every report seen so far for ``command_id`` (failure and placement news alike)."""
        bodies = [json.loads(m.payload) for m in self.seen if topics.parse(m.topic).kind == "agent_reports"]
        return [body["event_id"] for body in bodies if body.get("command_id") == command_id]

    def topics(self) -> list[str]:
        return [m.topic for m in self.seen]

    def close(self) -> None:
        # Retained statuses of this test's seats would outlive it: clear them for the tests that follow.
        for topic in sorted({m.topic for m in self.seen if topics.parse(m.topic).kind == "agent_status"}):
            self.bus.publish_wait(topic, b"", retain=True)
        self.bus.close()


@pytest.fixture
def tag() -> str:
    """In this test's cluster names alone: the broker is shared by the whole run, and statuses are retained."""
    return uuid.uuid4().hex[:8]


@pytest.fixture
def names(tag: str) -> dict[str, str]:
    return {"edge": f"edge{tag}", "core": f"core{tag}"}


@pytest.fixture
def side(broker: BrokerAddress, tag: str) -> Iterator[ManagerSide]:
    manager = ManagerSide(broker, tag)
    yield manager
    manager.close()


@pytest.fixture
def adapter(
    broker: BrokerAddress, fake: FakeSystemManager, control: FakeControl, names: dict[str, str], tmp_path: Path
) -> Iterator[OakestraAdapter]:
    control.clusters(
        [
            {"cluster_name": names["edge"], "supported_addons": ["image-builder", "FLOps-learner", "FLOps-learner"]},
            {"cluster_name": names["core"], "supported_addons": []},
        ]
    )
    running = start_adapter(broker, fake.url, tmp_path / "oakestra")
    yield running
    running.stop()


def start_adapter(broker: BrokerAddress, url: str, state_dir: Path) -> OakestraAdapter:
    config = AdapterConfig(
        actors=ActorConfig(broker_url="mqtt://broker.example:1883", builder_image="reg/builder:1"),
        state_dir=state_dir,
        data_tags={"digits": 100},
        timing=TIMING,
        client_id=new_id("test-oakestra"),
    )
    return OakestraAdapter(SystemManager(url, timeout=5), broker, config).start()


def run_aggregator(side: ManagerSide, seat: str, project: str) -> Command:
    """A classic aggregator of one round for ``project``, sent to ``seat`` once it is announced."""
    side.status(seat)
    training = {"rounds": 1, "min_available_clients": 1, "min_fit_clients": 1, "min_evaluate_clients": 1}
    return side.command(seat, project, "run_aggregator", artifact={"details": IMAGES}, port=19100, **training)


def running(adapter: OakestraAdapter, project: str) -> int:
    """How many of the project's actors run (read while the adapter's worker may change them: a snapshot)."""
    placement = adapter.placements.get(project)
    return 0 if placement is None else sum(1 for a in list(placement.actors.values()) if a.settled and not a.done)


def posted_services(control: FakeControl) -> list[dict[str, Any]]:
    return [c for c in control.calls() if c["method"] == "POST" and c["path"] == "/api/service/"]


def test_one_seat_per_active_cluster_is_announced_with_roles_from_its_addons(
    adapter: OakestraAdapter, side: ManagerSide, names: dict[str, str]
) -> None:
    edge, core = names["edge"], names["core"]

    first = side.status(f"oak-{edge}")
    second = side.status(f"oak-{edge}-2")
    plain = side.status(f"oak-{core}")

    assert (first.cluster, sorted(first.roles)) == (edge, ["aggregator", "builder", "learner", "serve"])
    assert first.data_tags == {"digits": 100}
    assert (second.cluster, second.roles) == (edge, ["learner"])
    assert (plain.cluster, sorted(plain.roles), plain.data_tags) == (core, ["aggregator", "serve"], {})


def test_a_command_is_receipted_and_deployed_as_exactly_one_service_on_its_seats_cluster(
    adapter: OakestraAdapter, side: ManagerSide, control: FakeControl, names: dict[str, str]
) -> None:
    seat = f"oak-{names['edge']}-2"
    side.status(seat)
    project = new_id("p")
    cmd = side.command(
        seat,
        project,
        "run_learner",
        artifact={"details": IMAGES},
        aggregator_address="10.30.0.9:19100",
        data_tags=["digits"],
        data_token="tok",
    )
    side.receipt(seat, cmd.command_id)

    wait_until(
        lambda: any(p.endswith("/instance") for p in paths(control.calls())), WAIT, "the instance to be requested"
    )
    side.resend(cmd)  # a redelivered command is receipted again and deploys nothing more
    side.receipt(seat, cmd.command_id)
    wait_until(lambda: adapter.placements[project].actors and not adapter.placements[project].pending(), WAIT, "run")

    [created] = posted_services(control)
    service = created["body"]["applications"][0]["microservices"][0]
    assert created["body"]["applications"][0]["application_name"] == application_name(project)
    assert service["code"] == "reg/p-learner:abc"
    assert (
        service["cmd"][:4] == ["python", "-m", "flops.oakestra.shim", "flops.runtime.learner"]
        and "10.30.0.9:19100" in service["cmd"]
    )
    env = dict(e.split("=", 1) for e in service["environment"])
    assert env["FLOPS_PROJECT_ID"] == project and env["FLOPS_COMMAND_ID"] == cmd.command_id
    assert env["FLOPS_AGENT_ID"] == seat and env["FLOPS_BROKER_URL"] == "mqtt://broker.example:1883"
    assert env["FLOPS_DATA_TOKEN"] == "tok"
    assert {"type": "direct", "cluster": names["edge"]} in service["constraints"]
    assert (service["memory"], service["vcpus"]) == (1000, 1)
    service_id = created["response"]["job_id"]
    assert paths(control.calls()).count(f"POST /api/service/{service_id}/instance") == 1


@pytest.mark.parametrize(
    ("kind", "script", "report", "words"),
    [
        ("run_learner", "pull_fail", "learner.failed", "FAILED"),
        ("build", "sched_fail", "build.failed", "NoActiveClusterWithCapacity"),
        ("run_aggregator", "stuck", "training.failed", "still CLUSTER_SCHEDULED"),
    ],
)
def test_a_service_oakestra_cannot_run_is_the_commands_failure_report_and_is_deleted(
    adapter: OakestraAdapter,
    side: ManagerSide,
    control: FakeControl,
    names: dict[str, str],
    kind: str,
    script: str,
    report: str,
    words: str,
) -> None:
    control.script("^(flearner|builder|aggregator)", script)
    seat = f"oak-{names['edge']}"
    side.status(seat)
    spec: dict[str, Any] = {
        "run_learner": {"artifact": {"details": IMAGES}, "aggregator_address": "a:1", "data_tags": []},
        "build": {"repo_url": "https://x/r.git", "commit": "a" * 40, "backend": "image"},
        "run_aggregator": {"artifact": {"details": IMAGES}, "port": 19100, "rounds": 1, "min_available_clients": 1,
                           "min_fit_clients": 1, "min_evaluate_clients": 1},
    }[kind]  # fmt: skip
    cmd = side.command(seat, new_id("p"), kind, **spec)

    failed = side.report(cmd.command_id, report)

    assert words in failed["reason"] and failed["source"] == f"oakestra/{seat}"
    if report == "learner.failed":
        assert failed["agent_id"] == seat
    [created] = posted_services(control)
    service_id = created["response"]["job_id"]
    wait_until(lambda: f"DELETE /api/service/{service_id}" in paths(control.calls()), WAIT, "the service deleted")
    for event_id in side.reported(cmd.command_id):  # the placement news before the failure wait for acks too
        side.ack(seat, event_id)
    wait_until(lambda: len(adapter.outbox) == 0, WAIT, "the acknowledged reports to leave the outbox")


def test_where_oakestra_schedules_runs_and_restarts_an_actor_is_reported_for_its_seat(
    adapter: OakestraAdapter, side: ManagerSide, control: FakeControl, names: dict[str, str]
) -> None:
    steps = ["CLUSTER_SCHEDULED", "NODE_SCHEDULED", "FAILED", "REQUESTED", "NODE_SCHEDULED", "RUNNING"]
    control.script("^aggregator", steps=steps)
    seat, edge = f"oak-{names['edge']}", names["edge"]
    cmd = run_aggregator(side, seat, new_id("p"))

    def news(what: str) -> dict[str, Any]:
        def match(message: Inbound) -> bool:
            body = json.loads(message.payload) if topics.parse(message.topic).kind == "agent_reports" else {}
            return body.get("command_id") == cmd.command_id and body.get("what") == what

        return dict(json.loads(side.wait(f"actor.placed {what}", match).payload))

    scheduled, restarted, running = news("scheduled"), news("restarted"), news("running")

    assert scheduled["kind"] == "actor.placed" and scheduled["source"] == f"oakestra/{seat}"
    assert scheduled["message"].endswith(f"(run_aggregator on {seat}): scheduled on cluster {edge}")
    assert scheduled["cluster"] == edge and running["node"] == f"{edge}-node1"
    assert "restarted by Oakestra" in restarted["message"] and "FAILED" in restarted["message"]
    assert running["message"].endswith(f"running on node {edge}-node1")
    assert len(set(side.reported(cmd.command_id))) == len(side.reported(cmd.command_id))  # one id per step


def test_a_command_that_cannot_run_on_oakestra_is_refused_with_its_reason_and_creates_nothing(
    adapter: OakestraAdapter, side: ManagerSide, control: FakeControl, names: dict[str, str]
) -> None:
    seat = f"oak-{names['edge']}"
    side.status(seat)
    cmd = side.command(
        seat, new_id("p"), "run_learner", artifact={"details": {"kind": "env"}}, aggregator_address="a:1"
    )

    failed = side.report(cmd.command_id, "learner.failed")

    assert "run images" in failed["reason"]
    assert posted_services(control) == []


@pytest.mark.parametrize("refusals", [0, 2], ids=["at-once", "after-refusals"])
def test_stop_project_deletes_the_projects_application(
    adapter: OakestraAdapter,
    side: ManagerSide,
    control: FakeControl,
    names: dict[str, str],
    sm: SystemManager,
    refusals: int,
) -> None:
    seat = f"oak-{names['core']}"
    project = new_id("p")
    cmd = run_aggregator(side, seat, project)
    side.receipt(seat, cmd.command_id)
    wait_until(lambda: sm.find_application(application_name(project)), WAIT, "the application")
    if refusals:  # the System Manager fails the deletion a few times: the stop is tried again until it takes
        control.fault("DELETE", "/api/application/.*", 500, {"code": 500, "status": "Internal Server Error"}, refusals)

    stop = side.command(seat, project, "stop_project", keep=[])
    side.receipt(seat, stop.command_id)

    wait_until(lambda: sm.find_application(application_name(project)) is None, WAIT, "the application deleted")
    deletes = [p for p in paths(control.calls()) if p.startswith("DELETE /api/application/")]
    assert len(deletes) == refusals + 1
    assert project not in adapter.placements


def test_stop_project_keeping_the_model_server_deletes_every_other_service(
    adapter: OakestraAdapter, side: ManagerSide, control: FakeControl, names: dict[str, str], sm: SystemManager
) -> None:
    seat = f"oak-{names['core']}"
    project = new_id("p")
    run_aggregator(side, seat, project)
    side.command(seat, project, "serve_model", image_ref="image://reg/p-model:abc")
    wait_until(lambda: running(adapter, project) == 2, WAIT, "the aggregator and the model server running")
    ids = {s["body"]["applications"][0]["microservices"][0]["code"]: s["response"]["job_id"]
           for s in posted_services(control)}  # fmt: skip

    stop = side.command(seat, project, "stop_project", keep=["serve_model"])
    side.receipt(seat, stop.command_id)

    wait_until(lambda: f"DELETE /api/service/{ids['reg/p-aggregator:abc']}" in paths(control.calls()), WAIT, "deleted")
    assert sm.service(ids["reg/p-model:abc"]) is not None
    assert sm.find_application(application_name(project)) is not None


def test_an_aggregator_gets_the_service_ip_its_learners_look_for_or_fails_saying_so(
    adapter: OakestraAdapter, side: ManagerSide, control: FakeControl, names: dict[str, str]
) -> None:
    seat = f"oak-{names['core']}"
    first, second = new_id("p"), new_id("p")
    run_aggregator(side, seat, first)
    wait_until(lambda: running(adapter, first) == 1, WAIT, "the first aggregator running")
    control.rr_conflicts(1)  # the next service IP asked for is taken: Oakestra's client retries with another
    cmd = run_aggregator(side, seat, second)

    failed = side.report(cmd.command_id, "training.failed")

    [placed, refused_then_placed] = [s for s in posted_services(control) if s["response"]["deployed_services"]]
    assert placed["body"]["applications"][0]["microservices"][0]["addresses"]["rr_ip"] == service_ip(first, seat, 19100)
    assert service_ip(second, seat, 19100) in failed["reason"] and "where its learners look for it" in failed["reason"]
    service_id = refused_then_placed["response"]["job_id"]
    wait_until(lambda: f"DELETE /api/service/{service_id}" in paths(control.calls()), WAIT, "the service deleted")


def test_stopping_the_adapter_announces_its_seats_offline(
    adapter: OakestraAdapter, side: ManagerSide, names: dict[str, str]
) -> None:
    seat = f"oak-{names['core']}"
    side.status(seat)

    adapter.stop()

    assert side.status(seat, online=False).cluster == names["core"]


def test_a_restarted_adapter_adopts_what_an_earlier_one_left_and_reports_its_failure(
    adapter: OakestraAdapter,
    side: ManagerSide,
    control: FakeControl,
    names: dict[str, str],
    sm: SystemManager,
    broker: BrokerAddress,
    fake: FakeSystemManager,
    tmp_path: Path,
) -> None:
    seat = f"oak-{names['core']}"
    project = new_id("p")
    cmd = run_aggregator(side, seat, project)
    wait_until(lambda: project in adapter.placements and not adapter.placements[project].pending(), WAIT, "running")
    adapter.stop()  # the manager dies: its actors keep running on Oakestra

    again = start_adapter(broker, fake.url, tmp_path / "oakestra-2")
    try:
        assert again.adopted.wait(WAIT) and project in again.placements
        [created] = posted_services(control)
        sm.delete_service(created["response"]["job_id"])  # the actor is lost while the new adapter follows it

        failed = side.report(cmd.command_id, "training.failed")
    finally:
        again.stop()

    assert "no longer exists" in failed["reason"] and failed["source"] == f"oakestra/{seat}"


def test_a_build_redelivered_to_a_restarted_adapter_runs_no_second_builder(
    adapter: OakestraAdapter,
    side: ManagerSide,
    control: FakeControl,
    names: dict[str, str],
    broker: BrokerAddress,
    fake: FakeSystemManager,
) -> None:
    """The handled command ids outlive the adapter: a build that completed (its one-shot service deleted) and that
    the manager re-sends to a restarted adapter (the receipt was lost) is receipted again and not run again."""
    seat = f"oak-{names['edge']}"
    side.status(seat)
    project = new_id("p")
    cmd = side.command(seat, project, "build", backend="image")
    side.receipt(seat, cmd.command_id)
    wait_until(lambda: any(p.startswith("DELETE /api/service/") for p in paths(control.calls())), WAIT, "deleted")
    adapter.stop()
    side.status(seat, online=False)
    side.seen.clear()  # from here on, only what the restarted adapter says

    again = start_adapter(broker, fake.url, adapter.config.state_dir)
    try:
        side.status(seat)  # announced after it subscribed to the seat's commands
        side.resend(cmd)
        side.receipt(seat, cmd.command_id)
        # A later command on the same seat is handled after the resent one: once it is answered, that one was too.
        later = side.command(seat, project, "build", backend="venv")
        refused = side.report(later.command_id, "build.failed")
    finally:
        again.stop()

    assert "make images" in refused["reason"]
    assert len(posted_services(control)) == 1
