"""The fake System Manager with real podman containers (``--run-podman``) under the deployer: a one-shot that
exits 0 completes, one that exits non-zero or cannot start fails with the container's own words, a running
service's container is stopped when the application is closed.

Uses the FLOps Debian image that the run's shared image build (``tests.image_support.built``) leaves in local
storage; real time, short polls.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import replace

import pytest

from flops.oakestra.client import SystemManager
from flops.oakestra.deploy import ActorSpec, EventKind, Phase, Placement, SystemClock, Timing
from flops.oakestra.fake import FakeSystemManager
from flops.oakestra.fake_podman import PodmanOptions, PodmanRunner
from flops.oakestra.fake_state import FakeState
from tests.image_support import DRIVER, Built

IMAGE = "localhost/flops/debian:bookworm-linux-amd64"
PROJECT = "p-00000000podman0"
TIMING = Timing(poll_interval=0.1, schedule_deadline=10, node_deadline=10, start_deadline=60, max_restarts=0)


@pytest.fixture(autouse=True)
def _base_image(built: Built) -> None:
    """The run's shared image build leaves the FLOps Debian image in local storage: our container image."""
    assert shutil.which("podman"), "podman is not installed: run bash scripts/test.sh, which installs it"


def running_names(prefix: str) -> list[str]:
    done = subprocess.run(
        [
            *PodmanOptions(storage_driver=DRIVER).global_args(),
            "ps",
            "--filter",
            f"name={prefix}",
            "--format",
            "{{.Names}}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.split()


@pytest.fixture
def placement() -> Iterator[Placement]:
    with (
        FakeSystemManager(state=FakeState(runner=PodmanRunner(PodmanOptions(storage_driver=DRIVER)))) as fake,
        SystemManager(fake.url) as sm,
    ):
        yield Placement(sm, PROJECT, timing=TIMING, clock=SystemClock())


def actor(name: str, script: str, *, one_shot: bool = True, image: str = IMAGE) -> ActorSpec:
    return ActorSpec(PROJECT, name, image, ["sh", "-c", script], {"MSG": "hello"}, 100, 1, one_shot)


def test_containers_decide_completed_failed_and_running(placement: Placement) -> None:
    placement.deploy(actor("builder", 'test "$MSG" = hello && echo built'))  # the environment reaches it
    placement.deploy(actor("broken", "echo 'no such file: data.csv'; exit 3"))
    placement.deploy(actor("missing", "true", image="localhost/flops/no-such-image:none"))
    placement.deploy(actor("flearner0", "sleep 300", one_shot=False))
    events = list(placement.follow(timeout=120))

    actors = placement.actors
    assert actors["builder"].phase is Phase.COMPLETED
    assert actors["broken"].phase is Phase.FAILED and "exit code 3: no such file: data.csv" in (
        actors["broken"].reason or ""
    )
    assert actors["missing"].phase is Phase.FAILED and "FAILED: exit code 125" in (actors["missing"].reason or "")
    assert actors["flearner0"].phase is Phase.RUNNING
    assert {e.actor for e in events if e.kind is EventKind.DELETED} == {"builder", "broken", "missing"}

    learner_id = actors["flearner0"].service_id
    assert running_names(f"fakeoak-{learner_id}") == [f"fakeoak-{learner_id}-0"]
    placement.close("cancelled")
    assert running_names(f"fakeoak-{learner_id}") == []


def test_an_image_builder_service_runs_buildah_in_a_default_container(
    placement: Placement, builder_image: str, built: Built
) -> None:
    """As on a node with the ``image-builder`` add-on (whose NodeEngine adds no capabilities): buildah in the
    builder image pulls the Debian base from the registry and runs a step in it (vfs storage, chroot isolation)."""
    debian = f"{built.registry.address}/flops/debian:bookworm-linux-amd64"
    script = f"c=$(buildah from -q --tls-verify=false docker://{debian}) && buildah run $c -- sh -c 'echo ran in $c'"
    local = "localhost/" + builder_image.split("/", 1)[1]  # in local storage: no pull over plain HTTP here
    placement.deploy(replace(actor("builder", script, image=local), addon="image-builder"))
    list(placement.follow(timeout=300))

    assert placement.actors["builder"].phase is Phase.COMPLETED, placement.actors["builder"].reason
