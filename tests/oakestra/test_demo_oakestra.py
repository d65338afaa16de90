"""``flops demo --oakestra`` without its build: the example project, whose images the run's shared build
(``tests.image_support.built``) pushed to its registry (so the builder stage is a cache hit), trains with three
learners and an aggregator that the manager's Oakestra adapter places through the fake System Manager, which runs
them as podman containers. The learners read their own node's data server, reach the aggregator at its service IP
(on loopback) and report over MQTT through the shim; the aggregator's shim hands its model over to the registry.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from rich.console import Console

from flops.demo_oakestra import run_on_fake_oakestra
from flops.lifecycle_stages import Outcome
from flops.settings import Settings
from tests.image_support import PODMAN, Built


def test_the_base_case_trains_in_containers_the_fake_oakestra_runs(built: Built, tmp_path: Path) -> None:
    built.ok()
    settings = Settings(data_dir=tmp_path, artifacts="image", registry=built.registry.address)

    result = run_on_fake_oakestra(
        settings, tmp_path, Console(quiet=True), built.repo_url, {"FLOPS_REGISTRY": built.registry.address}
    )

    state = result.state
    assert (state.outcome, state.reason) == (Outcome.COMPLETED, "training completed")
    assert state.progress.round == 3 and (state.progress.accuracy or 0) > 0.8
    # The aggregator's model outlived its container: its shim pushed the model files, tagged with the project.
    assert result.project_id in built.registry.client().tags("demo/model-files")
    logs = {p.name: p.read_text(errors="replace") for p in (tmp_path / "logs" / "oakestra").iterdir()}
    assert len(logs) == 4  # three learners and the aggregator, one container each
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
