"""The generated Containerfiles and pip configuration, as text (no buildah)."""

from __future__ import annotations

import configparser
import json

import pytest

from flops.builder.containerfile import (
    BUILD_MOUNT,
    REPO_DIR,
    VENV,
    actor_containerfile,
    base_containerfile,
    deps_containerfile,
    pip_conf,
    requirements_txt,
    runtime_containerfile,
    wheelhouse_pip_options,
)


def instructions(text: str) -> list[str]:
    """The Containerfile's instructions (continuations joined, comments dropped)."""
    joined = text.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_runtime_builds_a_venv_on_the_configurable_debian_base() -> None:
    steps = instructions(runtime_containerfile())
    assert steps[:2] == ["ARG FLOPS_BASE", "FROM ${FLOPS_BASE}"]
    run = next(s for s in steps if s.startswith("RUN"))
    # Build inputs are bind-mounted, never copied: no CA bundle or pip.conf stays in the image.
    assert f"--mount=type=bind,source=build,target={BUILD_MOUNT}" in run
    assert "apt-get install" in run and "python3-venv" in run  # only when the base lacks venv
    assert f"python3 -m venv {VENV}" in run
    assert f"PIP_CONFIG_FILE={BUILD_MOUNT}/pip.conf" in run
    assert f"-r {BUILD_MOUNT}/runtime-requirements.txt" in run
    assert any(s.startswith("ENV ") and f"PATH={VENV}/bin:" in s for s in steps)


def test_deps_resolve_the_repo_with_the_runtime() -> None:
    steps = instructions(deps_containerfile({"org.flops.role": "deps"}))
    assert steps[:2] == ["ARG FLOPS_RUNTIME", "FROM ${FLOPS_RUNTIME}"]
    run = next(s for s in steps if s.startswith("RUN"))
    assert f"--mount=type=bind,source=build,target={BUILD_MOUNT}" in run
    assert f"-r {BUILD_MOUNT}/runtime-requirements.txt -r {BUILD_MOUNT}/requirements.txt" in run
    assert not any(s.startswith("COPY") for s in steps)  # nothing of the commit: a new one reuses the layer


def test_base_adds_our_packages_to_the_deps_and_smoke_imports() -> None:
    steps = instructions(base_containerfile({"org.opencontainers.image.revision": "abc"}))
    assert steps[:2] == ["ARG FLOPS_DEPS", "FROM ${FLOPS_DEPS}"]
    assert "COPY src/ /opt/flops/src/" in steps
    run = next(s for s in steps if s.startswith("RUN"))
    assert "pip install" not in run
    assert "_flops_src.pth" in run
    assert "import flops, flops_utils, flwr, sklearn" in run
    assert 'LABEL org.opencontainers.image.revision="abc"' in steps


@pytest.mark.parametrize("role", ["learner", "aggregator"])
def test_actors_add_the_repo_and_their_entrypoint(role: str) -> None:
    steps = instructions(actor_containerfile(role, {"org.flops.role": role}))
    assert steps[:2] == ["ARG FLOPS_IMAGE_BASE", "FROM ${FLOPS_IMAGE_BASE}"]
    assert f"COPY repo/ {REPO_DIR}/" in steps
    assert f"WORKDIR {REPO_DIR}" in steps
    entry = steps[-1]
    assert entry.startswith("ENTRYPOINT ")
    assert json.loads(entry.removeprefix("ENTRYPOINT ")) == ["python", "-m", f"flops.runtime.{role}"]


def test_the_learner_build_can_prove_model_manager_loads_offline() -> None:
    steps = instructions(actor_containerfile("learner", import_check=True))
    run = next(s for s in steps if s.startswith("RUN"))
    assert f"python {BUILD_MOUNT}/import_check.py {REPO_DIR}" in run
    assert "HF_HUB_OFFLINE=1" in run and f"--mount=type=bind,source=build,target={BUILD_MOUNT}" in run
    assert steps.index(run) > steps.index(f"COPY repo/ {REPO_DIR}/")
    assert not any(s.startswith("RUN") for s in instructions(actor_containerfile("aggregator")))


def test_no_entrypoint_for_the_base_role() -> None:
    with pytest.raises(ValueError, match="base"):
        actor_containerfile("base")


def test_requirements_and_pip_conf() -> None:
    assert requirements_txt([]) == ""
    assert requirements_txt(["numpy>=1.26", "scikit-learn"]) == "numpy>=1.26\nscikit-learn\n"
    parser = configparser.ConfigParser()
    parser.read_string(pip_conf({"cert": f"{BUILD_MOUNT}/ca.crt", "timeout": "180"}))
    assert dict(parser["global"]) == {"cert": f"{BUILD_MOUNT}/ca.crt", "timeout": "180"}
    parser.read_string(pip_conf(wheelhouse_pip_options()))
    assert parser["global"]["no-index"] == "true"
    assert parser["global"]["find-links"] == "/flops-wheels"
