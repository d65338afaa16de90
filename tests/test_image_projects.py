"""Projects whose artifacts are container images (``FLOPS_ARTIFACTS=image``), every part real: the manager and
three ``flops agent`` processes, the FLOps registry (Debian's docker-registry on loopback), images built with
buildah (``tests.image_support.built``: the shared build of the example repo), learners, the aggregator and
the trained-model server as podman containers pulled from the registry. node-1 has an image storage of its
own and no builder role: it pulls, it never builds.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import numpy as np
import psutil
import pytest

from flops.client import Client
from flops.containers import LABEL_PROJECT, Podman, PodmanSettings
from flops.settings import BrokerAddress
from tests.base_support import held_out_digits, invoke_model, wait_no_processes
from tests.builder.conftest import DATA_MANAGER, MODEL_MANAGER
from tests.fleet_support import CLEANUP_TIMEOUT, Fleet, running_fleet
from tests.image_support import PODMAN, Built, inspect_raw
from tests.support import make_git_repo, wait_until

pytestmark = [pytest.mark.timeout(1800)]
IMAGE_PROJECT_TIMEOUT = 900.0  # pulls into an empty storage and the trained-model image's build


@pytest.fixture(scope="module")
def fleet(broker: BrokerAddress, built: Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("image_projects")
    registry = {"FLOPS_REGISTRY": built.registry.address}
    agent_env = {
        "node-0": registry,
        "node-1": {**registry, "FLOPS_CONTAINER_STORAGE": str(tmp / "node-1-containers")},
        "node-2": registry,
    }
    manager_env = {"FLOPS_ARTIFACTS": "image", "FLOPS_AGENT_GRACE_S": "3"}
    try:
        with running_fleet(broker, tmp, manager_env, agent_env=agent_env, repo_url=built.repo_url) as fleet:
            yield fleet
    finally:
        # node-1's storage holds the images it pulled (GBs); the agents are gone, so nothing is mounted.
        storage = Podman(PodmanSettings(root=tmp / "node-1-containers"), "test").global_args()
        subprocess.run([*storage, "system", "reset", "--force"], capture_output=True, timeout=300)


def containers(*filters: str) -> list[dict]:
    args = [*PODMAN, "ps", "--all", "--format", "json", *[f"--filter={f}" for f in filters]]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout or "[]") or []


def test_a_project_trains_in_pulled_containers_and_serves_its_trained_model_image(fleet: Fleet, built: Built) -> None:
    body = fleet.sla(post_training=True)
    project_id, state = fleet.run(body, timeout=IMAGE_PROJECT_TIMEOUT)
    assert state.outcome is not None and state.outcome.value == "completed", (
        f"{state.failed_stage}: {state.reason}\n" + "\n".join(fleet.feed.messages(project_id))
    )
    images = built.ok().artifact.images  # type: ignore[union-attr]
    # The builder found the images in the registry (the shared build pushed them): nothing was built again.
    build = fleet.feed.commands(project_id, "build")[0]
    assert build.spec["backend"] == "image"
    # Learners and the aggregator ran the registry's images as containers.
    for kind, role in (("run_learner", "learner"), ("run_aggregator", "aggregator")):
        for command in fleet.feed.commands(project_id, kind):
            log = fleet.work_dir(command.agent_id, project_id, command.command_id) / f"{kind}.log"
            assert log.is_file(), log
            assert command.spec["artifact"]["details"]["images"][role] == images[role]
    # node-1 has its own image storage, holding the learner image it pulled, and never built anything.
    node1 = fleet.agents["node-1"].home
    storage = node1.parent.parent / "node-1-containers"
    listed = subprocess.run(
        [*Podman(PodmanSettings(root=storage), "test").global_args(), "images", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    names = {n for image in json.loads(listed.stdout or "[]") for n in image.get("Names") or []}
    assert images["learner"] in names, names
    assert not any((node1 / "builds").iterdir()), list((node1 / "builds").iterdir())
    # The trained-model image is in the registry and MLflow's scoring server answers behind the token.
    built_events = [e for e in fleet.feed.events(project_id) if "model packaged" in e.message]
    assert built_events, fleet.feed.messages(project_id)
    ref = built_events[0].message.split("image://", 1)[1]
    assert ref.endswith(f"/trained_model:{project_id}")
    config = json.loads(
        subprocess.run(
            ["skopeo", "inspect", "--config", "--tls-verify=false", f"docker://{ref}"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    )
    assert config["config"]["Entrypoint"][:3] == ["python", "-m", "flops.runtime.mlflow_serve"]
    assert inspect_raw(ref)
    assert state.model_url and state.model_token
    x_test, y_test = held_out_digits()
    predictions = invoke_model(state.model_url, x_test, state.model_token)
    accuracy = float(np.mean(predictions == y_test))
    assert accuracy > 0.85, accuracy

    # Only the model server's container is left of the project; the learners' and aggregator's are gone.
    def only_the_server() -> list[str] | None:
        names = [c["Names"][0] for c in containers(f"label={LABEL_PROJECT}={project_id}")]
        return names if len(names) == 1 and "serve_model" in names[0] else None

    wait_until(only_the_server, CLEANUP_TIMEOUT, "only the model server's container left", interval=0.5)


def test_a_repo_whose_dependencies_cannot_install_fails_the_build_with_pip_in_the_reason(fleet: Fleet) -> None:
    files = {
        "model_manager.py": MODEL_MANAGER,
        "data_manager.py": DATA_MANAGER,
        "requirements.txt": "flops-no-such-package-anywhere==9.9.9\n",
    }
    repo_url = make_git_repo(fleet.tmp / "broken-deps", files)
    _, state = fleet.run(fleet.sla(repo_url), timeout=IMAGE_PROJECT_TIMEOUT)
    assert state.outcome is not None and state.outcome.value == "failed", state
    assert state.failed_stage is not None and state.failed_stage.value == "builder"
    assert "building the deps image for linux/amd64 failed" in (state.reason or ""), state.reason
    assert "flops-no-such-package-anywhere" in (state.reason or ""), state.reason  # pip's words, from the tail


def test_cancel_during_an_image_build_stops_buildah(fleet: Fleet) -> None:
    files = {"model_manager.py": MODEL_MANAGER, "data_manager.py": DATA_MANAGER, "requirements.txt": "numpy\n"}
    repo_url = make_git_repo(fleet.tmp / "slow-build", {**files, "marker.txt": "cancel me\n"})
    project_id = fleet.feed.submit(fleet.sla(repo_url))
    agent = psutil.Process(fleet.agents["node-0"].proc.pid)  # type: ignore[union-attr]

    def buildah_running() -> list[psutil.Process]:
        return [p for p in agent.children(recursive=True) if _is_buildah(p)]

    tools = wait_until(buildah_running, IMAGE_PROJECT_TIMEOUT, "buildah building the project's images", interval=0.1)
    with Client(fleet.broker) as client:
        reply = client.cancel(project_id, "changed my mind")
    assert reply.project_id == project_id and not reply.errors, reply
    state = fleet.feed.wait_finished(project_id, 60)
    assert state.outcome is not None and state.outcome.value == "cancelled", state
    _, alive = psutil.wait_procs(tools, timeout=CLEANUP_TIMEOUT)
    assert not alive, [p.cmdline() for p in alive]
    wait_no_processes(project_id, timeout=CLEANUP_TIMEOUT)


def test_stopping_the_agents_leaves_no_container_and_no_process(fleet: Fleet) -> None:
    projects = list(fleet.feed.projects)
    for agent in fleet.agents.values():
        agent.stop()
    for project_id in projects:
        wait_no_processes(project_id, timeout=CLEANUP_TIMEOUT)
        assert containers(f"label={LABEL_PROJECT}={project_id}") == []


def _is_buildah(proc: psutil.Process) -> bool:
    try:
        return proc.name() == "buildah" and "bud" in proc.cmdline()
    except psutil.NoSuchProcess:
        return False
