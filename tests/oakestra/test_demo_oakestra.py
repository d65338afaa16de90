"""``flops demo --oakestra`` on the run's shared image build (``tests.image_support.built``): the example project
trains with three learners and an aggregator that the manager's Oakestra adapter places through the fake System
Manager, which runs them as podman containers, and its build is an Oakestra service too: the builder image
(``tests.image_support.builder_image``) in a container, which clones the repo from ``git daemon`` and finds the
run's images in the registry (a cache hit, so no buildah work). The learners read their own node's data server,
reach the aggregator at its service IP (on loopback) and report over MQTT through the shim.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from rich.console import Console

from flops.demo_oakestra import run_on_fake_oakestra
from flops.lifecycle_stages import Outcome
from flops.settings import Settings
from tests.image_support import PODMAN, Built


def test_the_base_case_builds_and_trains_in_containers_the_fake_oakestra_runs(
    built: Built, builder_image: str, tmp_path: Path
) -> None:
    built.ok()
    settings = Settings(data_dir=tmp_path, artifacts="image", registry=built.registry.address)

    result = run_on_fake_oakestra(settings, tmp_path, Console(quiet=True), built.repo_url, builder_image)

    state = result.state
    assert (state.outcome, state.reason) == (Outcome.COMPLETED, "training completed")
    assert state.progress.round == 3 and (state.progress.accuracy or 0) > 0.8
    logs = {p.name: p.read_text(errors="replace") for p in (tmp_path / "logs" / "oakestra").iterdir()}
    assert len(logs) == 5  # the builder, three learners and the aggregator, one container each
    (build_log,) = [text for text in logs.values() if "image build succeeded" in text]
    assert "cached=True" in build_log and "git://127.0.0.1:" in build_log  # found by the worker in its container
    assert "builder_at" in state.stage_timestamps
    fetched = [text for text in logs.values() if "data.fetched" in text]
    assert len(fetched) == 3 and len({t.split("data_server=")[1].split()[0] for t in fetched}) == 3
    left = subprocess.run(
        [*PODMAN, "ps", "-a", "--filter", "name=fakeoak-", "--format", "{{.Names}}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert left.stdout.split() == []
    loopback = subprocess.run(["ip", "addr", "show", "lo"], capture_output=True, text=True, timeout=10, check=True)
    assert "10.30." not in loopback.stdout
