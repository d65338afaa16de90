"""The image backend with real buildah, Debian's docker-registry, skopeo and podman.

One build of the example repo (linux/amd64, ``tests.image_support.built``) is shared by every image test of
the run; the arm64 build runs under QEMU user emulation (~5 min cold on 2 cores, its runtime cached after).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from flops.builder import BuildFailure, BuildResult
from flops.builder import image_backend as backend
from flops.builder.image_backend import ImageBuilder, ImageBuilderSettings
from flops.builder.images import image_names
from tests.builder.conftest import DATA_MANAGER, MODEL_MANAGER, GitRepo
from tests.image_support import PODMAN, PODMAN_RUN, Built, buildah, forget_local, inspect_raw

pytestmark = [pytest.mark.timeout(1800)]


def is_buildah_bud(proc: psutil.Process) -> bool:
    try:
        return proc.name() == "buildah" and "bud" in proc.cmdline()
    except psutil.NoSuchProcess:
        return False


def ok(built: Built) -> BuildResult:
    return built.ok()


def test_the_build_pushes_three_manifest_lists_with_linux_amd64(built: Built) -> None:
    result = ok(built)
    artifact = result.artifact
    assert artifact.kind == "image" and not result.cached
    commit = artifact.commit
    prefix = f"{built.registry.address}/images0/digits_sklearn"  # owner: the tmp dir holding the repo
    assert artifact.images == {r: f"{prefix}/{r}:{commit}" for r in ("base", "learner", "aggregator")}
    assert artifact.ref == f"image://{prefix}:{commit}"
    assert artifact.platforms == ("linux/amd64",)
    for role, ref in artifact.images.items():
        index = inspect_raw(ref)
        assert index["mediaType"] == "application/vnd.oci.image.index.v1+json", role
        assert [m["platform"] for m in index["manifests"]] == [{"architecture": "amd64", "os": "linux"}]
        assert artifact.digests[role].startswith("sha256:")
    assert artifact.digest == artifact.digests["learner"]
    assert artifact.dependency_file == "conda.yaml" and "scikit-learn>=1.4" in artifact.requirements
    # buildah's output was streamed, step by step, as it ran
    steps = {step for step, _ in built.lines}
    assert {"base", "learner", "aggregator", "push"} <= steps
    assert any(line.startswith("STEP 1/") for step, line in built.lines if step == "learner")


def test_a_second_build_is_a_registry_cache_hit_without_buildah(built: Built, monkeypatch: pytest.MonkeyPatch) -> None:
    first = ok(built)

    def no_tools(*args: object, **kwargs: object) -> list[str]:
        raise AssertionError(f"a cached build ran {args[:2]}")

    monkeypatch.setattr(backend, "stream", no_tools)
    again = built.builder.build(
        {"repo_url": built.repo_url, "commit": first.artifact.commit, "flavor": "sklearn"}, built.workdir
    )
    assert isinstance(again, BuildResult), again
    assert again.cached
    assert again.artifact.images == first.artifact.images
    assert again.artifact.digest == first.artifact.digest
    assert again.artifact.requirements == first.artifact.requirements  # from the build that pushed them


def test_the_learner_image_runs_with_podman_from_the_registry(built: Built) -> None:
    learner = ok(built).artifact.images["learner"]  # type: ignore[union-attr]
    code = "import flops, flwr, sklearn, flops_utils.ml_repo_templates, model_manager, os; print(os.getcwd())"
    out = subprocess.run(
        [*PODMAN, *PODMAN_RUN, "--pull", "always", "--entrypoint", "python", learner, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "/opt/flops/repo"
    config = json.loads(
        subprocess.run(
            ["skopeo", "inspect", "--config", "--tls-verify=false", f"docker://{learner}"],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    )
    assert config["config"]["Entrypoint"] == ["python", "-m", "flops.runtime.learner"]


def test_a_repo_without_model_manager_fails_the_contract(built: Built, make_repo: GitRepo) -> None:
    repo, _ = make_repo({"data_manager.py": DATA_MANAGER, "requirements.txt": "numpy\n"})
    failure = built.builder.build({"repo_url": str(repo)}, built.workdir)
    assert isinstance(failure, BuildFailure)
    assert failure.step == "contract"
    assert "model_manager.py is missing" in failure.reason


def test_a_buildah_failure_names_the_step_and_quotes_buildah(built: Built, make_repo: GitRepo) -> None:
    """A base image the registry lacks: buildah fails at FROM (cheap to provoke; a pip failure inside a RUN
    step is reported the same way, with pip's lines in the tail)."""
    files = {"model_manager.py": MODEL_MANAGER, "data_manager.py": DATA_MANAGER, "requirements.txt": "numpy\n"}
    repo, commit = make_repo(files)
    missing = f"{built.registry.address}/nobody/debian:none"
    settings = ImageBuilderSettings(registry=built.registry.address, base_image=missing)
    failure = ImageBuilder(settings).build({"repo_url": str(repo), "platforms": ["linux/amd64"]}, built.workdir)
    assert isinstance(failure, BuildFailure), failure
    assert failure.step == "runtime"
    assert failure.reason.startswith("building the runtime image for linux/amd64 failed (exit")
    assert "nobody/debian" in failure.reason  # buildah's own error line
    assert "nobody/debian" in failure.log_tail
    assert not built.registry.client().tags(image_names(built.registry.address, str(repo), commit).repository("base"))


def test_a_platform_that_cannot_be_built_is_named_and_nothing_is_pushed(built: Built) -> None:
    first = ok(built)
    spec = {"repo_url": built.repo_url, "commit": first.artifact.commit, "platforms": ["linux/amd64", "linux/bogus"]}
    failure = built.builder.build(spec, built.workdir)
    assert isinstance(failure, BuildFailure), failure
    assert failure.step == "platform"
    assert "cannot build linux/bogus" in failure.reason and "linux/amd64" not in failure.reason.split("on this")[0]
    index = inspect_raw(first.artifact.images["learner"])  # type: ignore[union-attr]
    assert len(index["manifests"]) == 1  # the amd64 images are untouched, no partial list was pushed


def test_stopping_the_build_worker_stops_buildah(built: Built, make_repo: GitRepo, tmp_path: Path) -> None:
    """The agent stops a build by killing the worker's process group: buildah must go with it."""
    files = {"model_manager.py": MODEL_MANAGER, "data_manager.py": DATA_MANAGER, "requirements.txt": "numpy\n"}
    repo, _ = make_repo(files)
    spec = json.dumps({"repo_url": str(repo), "platforms": ["linux/amd64"]})
    before = {c["id"] for c in (json.loads(buildah("containers", "--json").stdout or "[]") or [])}
    argv = [sys.executable, "-m", "flops.builder.worker", "--spec", spec, "--workdir", str(built.workdir)]
    argv += ["--backend", "image", "--registry", built.registry.address]
    worker = subprocess.Popen(argv, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        tools: list[psutil.Process] = []
        while not tools:
            assert worker.poll() is None, "the worker ended before buildah started"
            assert time.monotonic() < deadline, "buildah never started"
            tools = [p for p in psutil.Process(worker.pid).children(recursive=True) if is_buildah_bud(p)]
            time.sleep(0.2)
        assert all(os.getpgid(p.pid) == worker.pid for p in tools)  # in the worker's group, not a session of its own
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)
        _, alive = psutil.wait_procs(tools, timeout=10)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
        # the killed bud's working container: remove only what appeared during this test
        for ctr in json.loads(buildah("containers", "--json").stdout or "[]") or []:
            if ctr["id"] not in before and "flops/runtime" in ctr.get("imagename", ""):
                buildah("rm", ctr["id"])


def test_two_platforms_make_one_manifest_list_with_both(built: Built) -> None:
    first = ok(built)
    spec = {"repo_url": built.repo_url, "commit": first.artifact.commit, "platforms": ["linux/arm64", "linux/amd64"]}
    result = built.builder.build(spec, built.workdir)
    assert isinstance(result, BuildResult), result
    assert not result.cached  # the amd64-only images did not satisfy the cache check
    assert result.artifact.platforms == ("linux/amd64", "linux/arm64")
    for ref in result.artifact.images.values():  # type: ignore[union-attr]
        archs = sorted(m["platform"]["architecture"] for m in inspect_raw(ref)["manifests"])
        assert archs == ["amd64", "arm64"]
    learner = result.artifact.images["learner"]  # type: ignore[union-attr]
    code = "import platform, flwr, sklearn; print(platform.machine())"
    argv = [*PODMAN, *PODMAN_RUN, "--arch", "arm64", "--pull", "always", "--entrypoint", "python", learner, "-c", code]
    try:
        machine = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        # The pull left the arm64 image under the run's shared names: a later podman run of them on this amd64 host
        # would take it from local storage and emulate it (the Oakestra demo test's containers did). They pull again.
        forget_local(list(result.artifact.images.values()), ("linux/amd64", "linux/arm64"))  # type: ignore[union-attr]
    assert machine.stdout.strip().splitlines()[-1] == "aarch64", machine.stderr[-2000:]
