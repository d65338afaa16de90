"""One FLOps registry and one image build of the example repo per test run, shared by every image test.

The Debian root (debootstrap) and the runtime image stay cached on the machine between runs, as the uv cache
does for environments; a run pays for the repo's base, learner and aggregator images and their push. Image
tests need buildah, skopeo, podman, docker-registry and debootstrap: the README's test command installs them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from flops.builder import BuildFailure, BuildResult
from flops.builder.builder_image import ensure_builder_image
from flops.builder.image_backend import ImageBuilder, ImageBuilderSettings
from flops.builder.images import platform_suffix
from flops.demo import example_repo
from flops.ports import free_port
from flops.registry import RunningRegistry, start_registry

TOOLS = ("buildah", "skopeo", "podman", "docker-registry", "debootstrap")
DRIVER = "overlay"  # what the product uses by default (Settings.container_storage_driver)
PODMAN = ("podman", "--storage-driver", DRIVER, "--runtime", "/usr/sbin/runc")
PODMAN_RUN = ("run", "--rm", "--tls-verify=false", "--network", "host")
PODMAN_RUN += ("--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096")


@dataclass
class Built:
    registry: RunningRegistry
    builder: ImageBuilder
    workdir: Path
    repo_url: str
    result: BuildResult | BuildFailure
    lines: list[tuple[str, str]] = field(default_factory=list)
    refs: list[str] = field(default_factory=list)  # local images to remove afterwards

    def ok(self) -> BuildResult:
        assert isinstance(self.result, BuildResult), self.result
        return self.result


def buildah(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["buildah", "--storage-driver", DRIVER, *args], check=check, capture_output=True, text=True)


def forget_local(refs: list[str], platforms: tuple[str, ...]) -> None:
    """Remove a test's repo images from local storage (they are the run's, nobody reuses them); the Debian base
    and the runtime image stay cached for the next run."""
    for ref in refs:
        buildah("manifest", "rm", ref)
        buildah("rmi", ref)  # what podman pulled
        for platform in platforms:
            buildah("rmi", f"{ref}-{platform_suffix(platform)}")


def inspect_raw(ref: str) -> dict:
    out = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return json.loads(out.stdout)


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    """The run's FLOps registry: Debian's docker-registry on a free loopback port, plain HTTP."""
    if shutil.which("docker-registry") is None:
        pytest.fail("docker-registry not installed: run bash scripts/test.sh, which installs it")
    running = start_registry(tmp_path_factory.mktemp("registry"), port=free_port())
    yield running
    running.stop()


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory, registry: RunningRegistry) -> Iterator[Built]:
    """The example repo built for linux/amd64 and pushed to the run's registry (it lives for the run)."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: run bash scripts/test.sh, which installs them")
    tmp = tmp_path_factory.mktemp("images")
    lines: list[tuple[str, str]] = []
    builder = ImageBuilder(ImageBuilderSettings(registry=registry.address), on_line=lambda s, ln: lines.append((s, ln)))
    repo_url = example_repo(tmp)
    spec = {"repo_url": repo_url, "flavor": "sklearn", "platforms": ["linux/amd64"]}
    result = builder.build(spec, tmp / "builds")
    state = Built(registry, builder, tmp / "builds", repo_url, result, lines)
    if isinstance(result, BuildResult):
        state.refs = list(result.artifact.images.values())  # type: ignore[union-attr]
    try:
        yield state
    finally:
        forget_local(state.refs, ("linux/amd64", "linux/arm64"))


@pytest.fixture(scope="session")
def builder_image(built: Built) -> Iterator[str]:
    """The builder image (buildah and the build worker, what Oakestra's builder services run) in the run's
    registry: made once per key on this machine (its tools layer survives runs, like the runtime image), pushed
    once per run."""
    ref = ensure_builder_image(built.builder, built.workdir)
    yield ref
    buildah("rmi", ref)  # the registry's name podman pulled it under (the image stays as localhost/flops/builder)
