"""``flops manager --deployer oakestra``: the manager process with the Oakestra adapter, a project submitted as
any user would, its actors placed on the fake System Manager by the unchanged stages.

The fake cannot run the builder's image (no podman here), so the project runs up to what Oakestra itself decides:
a builder no cluster has room for fails the project with Oakestra's reason, and the application is deleted.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from flops import topics
from flops.bus import Bus, BusOptions
from flops.client import Client
from flops.lifecycle_stages import Outcome
from flops.messages import new_id
from flops.oakestra.client import SystemManager
from flops.oakestra.deploy import application_name
from flops.oakestra.fake import FakeSystemManager
from flops.settings import BrokerAddress
from flops.sla import ProjectSLA
from tests.oakestra.support import FakeControl, paths
from tests.support import ManagerProcess, StateWatcher, cli, make_git_repo, sla, wait_until


@pytest.fixture
def cluster() -> str:
    return f"edge{uuid.uuid4().hex[:8]}"


@pytest.fixture
def manager(
    broker: BrokerAddress, fake: FakeSystemManager, control: FakeControl, cluster: str, tmp_path: Path
) -> Iterator[ManagerProcess]:
    control.clusters(
        [{"cluster_name": cluster, "supported_addons": ["image-builder", "FLOps-learner", "FLOps-learner"]}]
    )
    seats = [f"oak-{cluster}", f"oak-{cluster}-2"]
    # Only this test's seats count: other agents' statuses may be retained on the run's shared broker.
    agents = tmp_path / "agents.json"
    roles = {seats[0]: ["aggregator", "serve", "builder", "learner"], seats[1]: ["learner"]}
    agents.write_text(json.dumps({"agents": {seat: {"roles": granted} for seat, granted in roles.items()}}))
    proc = ManagerProcess(
        broker,
        tmp_path / "manager",
        extra_env={
            "FLOPS_DEPLOYER": "oakestra",
            "FLOPS_OAKESTRA_URL": fake.url,
            "FLOPS_OAKESTRA_DATA_TAGS": json.dumps({cluster: 100}),
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
        for seat in seats:  # the retained offline statuses of this test's seats
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
    name = application_name(reply.project_id)
    wait_until(lambda: sm.find_application(name) is None, 20, "the project's application deleted")
    assert any(p.startswith("DELETE /api/application/") for p in paths(control.calls()))


def test_deployer_oakestra_without_its_url_is_refused_naming_the_field(broker: BrokerAddress, tmp_path: Path) -> None:
    done = cli(broker, "manager", "--deployer", "oakestra", data_dir=tmp_path, timeout=30)

    assert done.returncode == 78
    assert "oakestra_url" in done.stderr and "required when deployer is oakestra" in done.stderr
