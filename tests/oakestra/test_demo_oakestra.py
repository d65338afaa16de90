"""``flops demo --oakestra`` (and ``--hierarchical``) on the run's shared image build (``tests.image_support.built``):
the example project's build is an Oakestra service of the builder image (``tests.image_support.builder_image``) in a
container, which clones the repo from ``git daemon`` and finds the run's images in the registry (a cache hit, so no
buildah work); its learners and aggregators are placed by the manager's Oakestra adapter through the fake System
Manager, which runs them as podman containers. The learners read their own node's data server, reach their
aggregator at its service IP (on loopback), cluster aggregators reach the root at its own, and all report over MQTT
through the shim; the project's aggregator's shim hands its model over to the registry.
"""

from __future__ import annotations

import io
import re
import subprocess
from pathlib import Path
from typing import Any

from rich.console import Console

from flops.demo import DemoResult
from flops.demo_hierarchical import hierarchical_sla
from flops.demo_oakestra import HIERARCHICAL_CLUSTERS, run_on_fake_oakestra
from flops.lifecycle_stages import Outcome
from flops.settings import Settings
from tests.image_support import PODMAN, Built

SERVICE_IP = re.compile(r"10\.30\.\d+\.\d+")


def container_logs(work: Path) -> dict[str, str]:
    """The fake's container logs by container name (one per actor it started)."""
    return {p.stem: p.read_text(errors="replace") for p in (work / "logs" / "oakestra").iterdir()}


def data_server(log: str) -> str:
    return log.split("data.fetched")[1].split("data_server=")[1].split()[0]


def assert_nothing_left(names: list[str], logs: dict[str, str]) -> None:
    """None of the run's containers left, and none of its actors' service IPs still on loopback (other runs on this
    host may hold their own)."""
    left = subprocess.run(
        [*PODMAN, "ps", "-a", "--filter", "name=fakeoak-", "--format", "{{.Names}}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert set(left.stdout.split()) & set(names) == set()
    loopback = subprocess.run(["ip", "addr", "show", "lo"], capture_output=True, text=True, timeout=10, check=True)
    used = {ip for text in logs.values() for ip in SERVICE_IP.findall(text)}
    assert used and not used & set(SERVICE_IP.findall(loopback.stdout))


def run_demo(built: Built, builder_image: str, work: Path, **project: Any) -> tuple[DemoResult, str]:
    """The Oakestra demo's project on the run's images and builder image: its result and what it printed."""
    built.ok()
    settings = Settings(data_dir=work, artifacts="image", registry=built.registry.address)
    out = io.StringIO()
    result = run_on_fake_oakestra(
        settings, work, Console(file=out, width=1000), built.repo_url, builder_image, **project
    )
    return result, out.getvalue()


def test_the_base_case_builds_trains_and_serves_in_containers_the_fake_oakestra_runs(
    built: Built, builder_image: str, tmp_path: Path
) -> None:
    result, printed = run_demo(built, builder_image, tmp_path)

    state = result.state
    assert state.outcome == Outcome.COMPLETED, printed[-3000:]
    assert re.fullmatch(r"model served at http://10\.30\.\d+\.\d+:\d+/", state.reason or ""), state.reason
    assert state.progress.round == 3 and (state.progress.accuracy or 0) > 0.8
    # The aggregator's model outlived its container: its shim pushed the model files, tagged with the project; the
    # model builder made the trained-model image from them, and its server answered held-out digits.
    assert result.project_id in built.registry.client().tags("demo/model-files")
    assert state.model_url and state.model_token
    right = sum(int(p == y) for p, y in zip(result.predictions, result.labels, strict=True))
    assert result.labels and right / len(result.labels) > 0.8
    logs = container_logs(tmp_path)
    assert len(logs) == 7  # the builder, three learners, the aggregator, the model builder and server: one each
    (build_log,) = [text for text in logs.values() if "image build succeeded" in text]
    assert "cached=True" in build_log and "git://127.0.0.1:" in build_log  # found by the worker in its container
    assert "builder_at" in state.stage_timestamps
    fetched = [text for text in logs.values() if "data.fetched" in text]
    assert len(fetched) == 3 and len({data_server(t) for t in fetched}) == 3
    assert_nothing_left(list(logs), logs)


def test_the_hierarchical_project_trains_on_two_fake_oakestra_clusters(
    built: Built, builder_image: str, tmp_path: Path
) -> None:
    """2 cycles of 1 round (the example has 3): the root's second cycle starts the clusters from its model."""
    result, printed = run_demo(
        built,
        builder_image,
        tmp_path,
        clusters=HIERARCHICAL_CLUSTERS,
        sla=lambda url: hierarchical_sla(url, post_training=False, training_rounds=1),
    )

    state = result.state
    assert (state.outcome, state.reason) == (Outcome.COMPLETED, "training completed"), printed[-3000:]
    p = state.progress
    assert (p.cycle, p.cycles, p.round) == (2, 2, 2) and (p.accuracy or 0) > 0.8
    assert {name: (c.cycle, c.round) for name, c in p.clusters.items()} == {"east": (2, 1), "west": (2, 1)}
    logs = container_logs(tmp_path)
    learners = {name: text for name, text in logs.items() if "data.fetched" in text}
    aggregators = {name: text for name, text in logs.items() if "flower-superlink" in text}
    assert (len(logs), len(learners), len(aggregators)) == (8, 4, 3)  # one container per actor, and the builder
    # Cluster aggregators join the root at its service IP; the root joins nobody.
    roots = {m for text in aggregators.values() for m in re.findall(r"'--superlink', '([\d.:]+)'", text)}
    assert len(roots) == 1 and sum("root-supernode" in text for text in aggregators.values()) == 2
    # Each learner reads its own node's data server; the two learners of a cluster share its aggregator.
    [servers_line] = [line for line in printed.splitlines() if line.startswith("node data servers: ")]
    seat_of = {where: seat for seat, where in re.findall(r"(oak-\S+) (\S+?)(?:,|$)", servers_line)}
    by_aggregator: dict[str, set[str]] = {}
    for text in learners.values():
        [aggregator] = set(re.findall(r"'--superlink', '([\d.:]+)'", text))
        by_aggregator.setdefault(aggregator, set()).add(seat_of[data_server(text)])
    assert sorted(map(sorted, by_aggregator.values())) == [["oak-east", "oak-east-2"], ["oak-west", "oak-west-2"]]
    assert_nothing_left(list(logs), logs)
