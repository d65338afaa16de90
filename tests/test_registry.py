"""The FLOps image registry: Debian's docker-registry started and stopped, and the cache-check client.

Tiny images (``buildah from scratch`` + a config, ~0.1 s each) stand in for real ones: what is checked is
tags and platforms, single manifests and manifest lists.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from flops.errors import ConfigError
from flops.ports import free_port, port_open
from flops.registry import (
    RegistryClient,
    RunningRegistry,
    has_image,
    platform_provided,
    registry_config,
    registry_port,
    start_registry,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="docker-registry and buildah are Linux tools")
BUILDAH = ("buildah", "--storage-driver", "overlay")


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is not installed: run bash scripts/test.sh, which installs it")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    need("docker-registry")
    running = start_registry(tmp_path_factory.mktemp("registry"), port=free_port())
    try:
        yield running
    finally:
        running.stop()
        subprocess.run([*BUILDAH, "manifest", "rm", f"{running.address}/acme/multi/learner:c1"], capture_output=True)
        for ref in ("acme/single/learner:c1", "acme/multi/learner:c1-amd64", "acme/multi/learner:c1-arm64"):
            subprocess.run([*BUILDAH, "rmi", f"{running.address}/{ref}"], check=False, capture_output=True)


def tiny_image(ref: str, arch: str) -> str:
    """Commit an empty image for ``linux/arch`` to local storage as ``ref``; returns its id."""
    need("buildah")
    ctr = subprocess.run([*BUILDAH, "from", "scratch"], check=True, capture_output=True, text=True).stdout.strip()
    try:
        subprocess.run(
            [*BUILDAH, "config", "--os", "linux", "--arch", arch, "--label", f"arch={arch}", ctr], check=True
        )
        return subprocess.run(
            [*BUILDAH, "commit", "-q", ctr, ref], check=True, capture_output=True, text=True
        ).stdout.strip()
    finally:
        subprocess.run([*BUILDAH, "rm", ctr], check=False, capture_output=True)


def push(ref: str, *, manifest: bool = False) -> None:
    verb = ["manifest", "push", "--all"] if manifest else ["push"]
    subprocess.run([*BUILDAH, *verb, "--tls-verify=false", "-q", ref, f"docker://{ref}"], check=True)


def test_the_registry_answers_v2_and_stores_under_its_data_dir(registry: RunningRegistry) -> None:
    assert registry.client().ping()
    assert registry.url == f"http://127.0.0.1:{registry.port}"
    assert '"rootdirectory"' in registry.config_file.read_text()
    assert registry.client().tags("nobody/nothing/learner") == []
    assert not has_image(f"{registry.address}/nobody/nothing/learner:abc", ["linux/amd64"])


def test_a_single_manifest_provides_its_config_platform(registry: RunningRegistry) -> None:
    ref = f"{registry.address}/acme/single/learner:c1"
    tiny_image(ref, "arm64")
    push(ref)
    client = registry.client()
    assert client.tags("acme/single/learner") == ["c1"]
    assert client.platforms("acme/single/learner", "c1") == {"linux/arm64"}
    assert client.has_image(ref, ["linux/arm64"])
    assert not client.has_image(ref, ["linux/amd64"])
    assert not client.has_image(ref.replace(":c1", ":c2"), ["linux/arm64"])


def test_a_manifest_list_provides_every_platform_it_names(registry: RunningRegistry) -> None:
    ref = f"{registry.address}/acme/multi/learner:c1"
    ids = [tiny_image(f"{ref}-{arch}", arch) for arch in ("amd64", "arm64")]
    subprocess.run([*BUILDAH, "rmi", ref], check=False, capture_output=True)
    subprocess.run([*BUILDAH, "manifest", "create", ref], check=True, capture_output=True)
    for image in ids:
        subprocess.run([*BUILDAH, "manifest", "add", ref, image], check=True, capture_output=True)
    push(ref, manifest=True)
    assert registry.client().platforms("acme/multi/learner", "c1") == {"linux/amd64", "linux/arm64"}
    assert has_image(ref, ["linux/amd64", "linux/arm64"])
    assert has_image(ref, [])  # no platform asked: the tag is enough
    assert not has_image(ref, ["linux/amd64", "linux/riscv64"])
    assert (
        registry.client()
        .digest(
            "acme/multi/learner",
            "c1",
        )
        .startswith("sha256:")
    )


def test_an_unreachable_registry_is_a_cache_miss() -> None:
    assert not has_image(f"127.0.0.1:{free_port()}/a/b/learner:c", ["linux/amd64"])


def test_platform_matching() -> None:
    assert platform_provided("linux/arm64", {"linux/arm64/v8"})
    assert platform_provided("linux/arm64/v8", {"linux/arm64/v8"})
    assert not platform_provided("linux/arm64/v8", {"linux/arm64"})
    assert not platform_provided("linux/amd64", {"linux/arm64"})


def test_tls_needs_both_certificate_and_key(tmp_path: Path) -> None:
    config = registry_config(tmp_path, "127.0.0.1", 5000, cert_file=tmp_path / "c.pem", key_file=tmp_path / "k.pem")
    assert config["http"]["tls"] == {"certificate": str(tmp_path / "c.pem"), "key": str(tmp_path / "k.pem")}
    assert "tls" not in registry_config(tmp_path, "127.0.0.1", 5000)["http"]
    with pytest.raises(ConfigError, match="FLOPS_TLS_KEY_FILE"):
        registry_config(tmp_path, "127.0.0.1", 5000, cert_file=tmp_path / "c.pem")
    assert registry_port("127.0.0.1:5055") == 5055
    assert registry_port("registry.local") == 5000


def test_flops_registry_serves_until_sigterm(tmp_path: Path) -> None:
    need("docker-registry")
    port = free_port()
    env = {**os.environ, "FLOPS_DATA_DIR": str(tmp_path), "FLOPS_REGISTRY": f"127.0.0.1:{port}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flops.cli", "registry"],
        env=env,
        start_new_session=True,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # its signal handlers are in place once it says so
            if "registry listening on" in line:
                break
        else:
            pytest.fail(f"flops registry exited {proc.wait()} without serving")
        assert RegistryClient(f"127.0.0.1:{port}").ping()
        assert (tmp_path / "registry" / "config.yml").is_file()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, proc.stderr.read()
        assert not port_open("127.0.0.1", port)  # the docker-registry child went with it
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
