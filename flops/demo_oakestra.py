"""``flops demo --oakestra``: the base case with its actors placed through a (fake) Oakestra System Manager.

The same project as ``flops demo --images`` (the example digits repo, three learners, three rounds), but the
manager runs the Oakestra adapter (``--deployer oakestra``) against the fake System Manager
(:mod:`flops.oakestra.fake`), which runs every service it is given as a podman container on this machine
(:mod:`flops.oakestra.fake_podman`, host network). The fake has one cluster with three ``FLOps-learner`` worker
nodes, so the adapter announces three learner seats; the learners and the aggregator are Oakestra services whose
images come from the FLOps registry, and their reports reach the manager over MQTT through
:mod:`flops.oakestra.shim`.

Each fake worker node's data is served by its own data server: the Arrow Flight server FLOps agents embed
(:class:`flops.data.server.DataServer`, the original ml-data-server's protocol), one per node on a loopback port,
holding that node's digits partition. It stands in for the node's ml-data-server add-on at :11027 (the nodes share
this host, so they cannot all listen there); learners are told their node's server per seat
(``FLOPS_OAKESTRA_DATA_SERVERS``) and present a node read token (``FLOPS_OAKESTRA_DATA_TOKEN``).

With ``hierarchical`` (``flops demo --oakestra --hierarchical``) it runs the example hierarchical project
(``examples/projects/digits_hierarchical.json``: 2 cycles x 3 rounds, two learners per cluster) instead, on two fake
clusters ``east`` and ``west`` of two ``FLOps-learner`` nodes each: the adapter announces the seats ``oak-east``,
``oak-east-2``, ``oak-west``, ``oak-west-2``, the manager places one cluster aggregator on each cluster's first
seat and the root aggregator where the adapter's placement puts it (the first aggregator seat, ``oak-east``: every
seat has a cluster), and every actor (root, cluster aggregators, learners) is a podman container of the fake,
with real Flower at both levels. Cluster aggregators reach the root at its service IP as learners reach theirs.

The build is an Oakestra service too: the fake's first cluster offers ``image-builder``, so the adapter announces a
builder seat and places the project's ``build`` as a one-shot service of the builder image
(:mod:`flops.builder.builder_image`: buildah, git and the build worker on our Debian base), made once per key on
this machine and pushed to the demo's registry with the Debian base and the runtime image it builds FROM. In its
container (unprivileged) buildah uses ``vfs`` storage and ``chroot`` isolation. The example repo is served to it by
``git daemon`` on loopback (containers share the host network). With the repo's images in the registry the build is
a cache hit; otherwise it builds them in the container (~3.5 min, vfs copies).

Post-training runs there as well: the aggregator's shim hands its model files over to the registry before it reports
success (:mod:`flops.runtime.model_files`), the model builder (a one-shot service of the builder image on the
aggregator's cluster) pulls them and makes the trained-model image, and the model server runs that image at its
service IP, where the demo asks it about held-out digits with the project's token.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from rich.console import Console

from flops.demo import (
    DemoResult,
    artifacts,
    ask_model,
    classic_sla,
    example_repo,
    running_system,
    stage_seconds,
    submit_and_follow,
)
from flops.errors import FlopsError
from flops.settings import Settings
from flops.sla import ProjectSLA

CLUSTER = "demo"
HIERARCHICAL_CLUSTERS = {"east": 2, "west": 2}  # as flops demo --hierarchical: two clusters of two learners
DATA_TAG = "digits"
READ_GRANT = "oakestra-demo"  # the data servers' grant name for the node read token (no project owns it)


@contextlib.contextmanager
def served_repo(repo_url: str, timeout_s: float = 30.0) -> Iterator[str]:
    """The ``file://`` repo as containers on the host network reach it: ``git daemon`` on a free loopback port,
    serving the repo's grandparent directory, so the URL ``git://127.0.0.1:PORT/<parent>/<repo>`` keeps the
    owner and name the image names come from (``images.repo_owner_and_name``). Yields that URL."""
    from flops.builder.repo import local_path
    from flops.ports import free_port, port_open
    from flops.supervisor import popen, stop_groups

    repo = local_path(repo_url)
    if repo is None:  # already remote: whatever serves it
        yield repo_url
        return
    root, port = repo.resolve().parent.parent, free_port()
    argv = ["git", "daemon", "--export-all", "--reuseaddr", "--listen=127.0.0.1", f"--port={port}"]
    proc = popen([*argv, f"--base-path={root}", str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout_s
        while not port_open("127.0.0.1", port):
            if proc.poll() is not None or time.monotonic() > deadline:
                error = proc.stderr.read().decode(errors="replace")[-300:] if proc.poll() is not None else ""
                raise FlopsError(f"git daemon did not serve {repo} on 127.0.0.1:{port}: {error or 'timed out'}")
            time.sleep(0.05)
        yield f"git://127.0.0.1:{port}/{repo.parent.name}/{repo.name}"
    finally:
        stop_groups([proc])  # the daemon and the upload-pack children it forked for clones


@contextlib.contextmanager
def node_data(work: Path, seats: list[str], read_token: str) -> Iterator[dict[str, str]]:
    """One data server per fake worker node (seat), each holding its IID partition of digits' train split;
    yields seat -> data server location."""
    from flops.data.mock import load_dataset, push_partitions, split_iid
    from flops.data.server import DataServer

    servers: list[DataServer] = []
    try:
        for seat in seats:
            data_dir = work / "nodes" / seat / "data"
            shutil.rmtree(data_dir, ignore_errors=True)
            server = DataServer(data_dir, "127.0.0.1", 0)
            server.start()
            server.grant(READ_GRANT, read_token, [DATA_TAG])
            servers.append(server)
        partitions = split_iid(load_dataset("digits", split="train"), len(seats), seed=0)
        push_partitions(partitions, [s.location for s in servers], DATA_TAG, tokens=[s.admin_token for s in servers])
        yield {seat: s.location for seat, s in zip(seats, servers, strict=True)}
    finally:
        for server in servers:
            server.stop()


@contextlib.contextmanager
def fake_oakestra(work: Path, clusters: Mapping[str, int]) -> Iterator[str]:
    """The fake System Manager on a free loopback port with one cluster per entry of ``clusters`` (name -> how many
    learner nodes it has), running its services as podman containers (logs under ``work/logs/oakestra``); yields
    its URL."""
    from flops.oakestra.fake import FakeSystemManager
    from flops.oakestra.fake_podman import PodmanOptions, PodmanRunner
    from flops.oakestra.fake_state import FakeState, cluster_doc

    log_dir = work / "logs" / "oakestra"
    shutil.rmtree(log_dir, ignore_errors=True)  # the fake numbers its services from 1 again: no stale logs
    log_dir.mkdir(parents=True, exist_ok=True)
    state = FakeState(runner=PodmanRunner(PodmanOptions(tls_verify=False), log_dir=log_dir))
    # supported_addons repeats FLOps-learner once per node offering it: one learner seat each; the first cluster
    # also offers image-builder once: the builder seat, where the build runs in the builder image.
    state.clusters = [
        cluster_doc(
            {"cluster_name": name, "supported_addons": ["FLOps-learner"] * nodes + ["image-builder"][index:]}, index
        )
        for index, (name, nodes) in enumerate(clusters.items())
    ]
    with FakeSystemManager(state=state) as fake:
        yield fake.url


def run_oakestra_demo(
    settings: Settings,
    work: Path,
    console: Console,
    *,
    agents: int = 3,
    hierarchical: bool = False,
    timeout: float = 1800.0,
) -> DemoResult:
    """The demo: the registry and the builder image, then the project (the base case, or the hierarchical one on
    two clusters) with its build and actors as services of the fake Oakestra."""
    from flops.demo_hierarchical import hierarchical_sla

    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    repo_url = example_repo(work)
    with artifacts(settings, work, console, True) as (settings, _):
        builder_image = make_builder_image(settings.registry, work, console)
        project: dict[str, Any] = (
            {"clusters": HIERARCHICAL_CLUSTERS, "sla": hierarchical_sla} if hierarchical else {"agents": agents}
        )
        result = run_on_fake_oakestra(settings, work, console, repo_url, builder_image, timeout=timeout, **project)
    result.total_seconds = time.monotonic() - started
    return result


def make_builder_image(registry: str, work: Path, console: Console) -> str:
    """The builder image in ``registry`` (made once per key on this machine), with the Debian base and the runtime
    image a build in it starts FROM shared there; its reference."""
    from flops.builder.builder_image import ensure_builder_image
    from flops.builder.image_backend import ImageBuilder, ImageBuilderSettings

    started = time.monotonic()
    builder = ImageBuilder(ImageBuilderSettings(registry=registry, share_bases=True))
    ref = ensure_builder_image(builder, work / "builder-image")
    console.print(f"builder image: {ref} ({time.monotonic() - started:.1f} s)")
    return ref


def run_on_fake_oakestra(
    settings: Settings,
    work: Path,
    console: Console,
    repo_url: str,
    builder_image: str,
    *,
    agents: int = 3,
    clusters: Mapping[str, int] | None = None,
    sla: Callable[[str], ProjectSLA] | None = None,
    timeout: float = 1800.0,
) -> DemoResult:
    """A project of ``repo_url`` with ``settings`` naming the registry (image artifacts): node data servers, the
    fake System Manager with ``clusters`` (name -> learner nodes; default one cluster of ``agents``) running podman
    containers (the build too, in ``builder_image``), the manager with its Oakestra adapter; stops all of it before
    returning. The project is ``sla(repo URL as the containers reach it)``, by default the example's base case for
    ``agents`` learners, with post-training: then the model server is asked about held-out digits."""
    from flops.demo_hierarchical import print_clusters
    from flops.oakestra.adapter import from_settings
    from flops.oakestra.seats import seat_id
    from flops.ports import free_port

    started = time.monotonic()
    clusters = clusters or {CLUSTER: agents}
    seats = [seat_id(name, n) for name, nodes in clusters.items() for n in range(1, nodes + 1)]
    read_token = secrets.token_urlsafe(24)
    with (
        node_data(work, seats, read_token) as data_servers,
        fake_oakestra(work, clusters) as oakestra_url,
        served_repo(repo_url) as repo_url,
    ):
        project = sla(repo_url) if sla else classic_sla(repo_url, agents)
        settings = settings.model_copy(
            update={
                "deployer": "oakestra",
                "oakestra_url": oakestra_url,
                "oakestra_builder_image": builder_image,
                "oakestra_data_tags": {DATA_TAG: 1},
                "oakestra_data_servers": data_servers,
                "oakestra_data_token": SecretStr(read_token),
                "oakestra_poll_s": 1.0,
                # The fake's containers share this host's network: a free port, not 8080, which may be taken.
                "oakestra_serve_port": free_port(),
            }
        )
        with running_system(settings, work, 0) as (address, _):  # no agents: every actor is an Oakestra service
            adapter_settings = settings.model_copy(update={"data_dir": work / "oakestra-adapter"})
            shutil.rmtree(work / "oakestra-adapter", ignore_errors=True)
            adapter = from_settings(adapter_settings, address).start()
            try:
                nodes = ", ".join(f"cluster {name}: {n} learner nodes" for name, n in clusters.items())
                console.print(
                    f"[bold]FLOps demo on Oakestra[/]: broker {address.url}, manager, fake System Manager "
                    f"{oakestra_url} ({nodes}, an image builder; podman; {work})"
                )
                console.print("node data servers: " + ", ".join(f"{k} {v}" for k, v in data_servers.items()))
                console.print(f"repo: {repo_url} (git daemon)")
                project_id, state = submit_and_follow(address, project, console, timeout)
                if project.training_configuration.mode == "hierarchical":
                    print_clusters(state, console)
                # Asked while the fake still runs the server's container (its application goes with the fake).
                predictions, labels = (
                    ask_model(state.model_url, console, token=state.model_token) if state.model_url else ([], [])
                )
            finally:
                adapter.stop()
    return DemoResult(project_id, state, stage_seconds(state), time.monotonic() - started, predictions, labels)
