"""The builder image: what a node with Oakestra's ``image-builder`` add-on runs a FLOps build in.

``<registry>/flops/builder:<key>`` is the local Debian base (``ImageBuilder``'s, the one the runtime is built FROM)
with buildah and git from Debian's archive (apt inside the build; the mirror is the base's ``sources.list``), a
virtual environment at :data:`flops.builder.containerfile.VENV` holding only what ``flops.builder.worker``,
``flops.builder.model_image`` and ``flops.oakestra.shim`` import (no Flower: the images it builds carry that), the
wheels of mlflow-skinny the model builder installs into a trained-model image (so it downloads nothing), and
our ``flops`` / ``flops_utils`` packages. Inside it buildah keeps its storage with ``vfs`` (no overlay on overlay,
no fuse device) and runs ``RUN`` steps with ``chroot`` isolation (no nested runtime, no user namespaces), set in
``/etc/containers`` so any buildah call there uses them. So it runs in a container with the default capabilities,
unprivileged (measured: :mod:`flops.oakestra.fake_podman`).

Two layers, each made once per key: the **tools** (``localhost/flops/builder-tools:<key>``: the Debian base's
image id, the packages, the requirements, the Containerfile; ~75 s, apt and pip) and the **builder** on them (the
tools' id and our code's digest: a few seconds after a change to FLOps). A registry that has the builder's tag is
a hit with no work at all; local storage that has it is pushed; else it is built and pushed. A build in it starts
FROM nothing that is not in that registry: the worker pulls the Debian base and (``share_bases``) the runtime.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

from flops.builder import containerfile as cf
from flops.builder.image_backend import ImageBuilder, copy_own_packages, native_platform, shared_ref
from flops.builder.model_image import BAKED_WHEELS, MLFLOW_REQUIREMENT
from flops.builder.runtime_base import own_code_digest

DEBIAN_PACKAGES = ("buildah", "git", "ca-certificates", "python3", "python3-venv")
# What the worker, the model-image worker and the shim import (pyproject's core and agent extras, trimmed).
REQUIREMENTS = (
    "sh>=2",
    "structlog>=24.1",
    "pydantic>=2.7,<3",
    "pydantic-settings>=2.3,<3",
    "paho-mqtt>=2.1,<3",
    "pyyaml>=6",
    "packaging>=23",
)
REQUIREMENTS_FILE = "builder-requirements.txt"
SMOKE = "flops.builder.worker, flops.builder.model_image, flops.oakestra.shim"
# printf'd into /etc/containers/storage.conf (a file replaces the defaults: the roots must be named too).
STORAGE_CONF = (
    '[storage]\\ndriver = "vfs"\\nrunroot = "/run/containers/storage"\\ngraphroot = "/var/lib/containers/storage"\\n'
)


def tools_containerfile(labels: Mapping[str, str] | None = None) -> str:
    """Debian (``ARG FLOPS_BASE``) + buildah and git (apt) + the builder's venv: what changes rarely."""
    return f"""\
# FLOps builder tools: buildah (vfs, chroot), git and the worker's Python environment (generated).
ARG FLOPS_BASE
FROM ${{FLOPS_BASE}}
ENV VIRTUAL_ENV={cf.VENV} PATH={cf.VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \\
    STORAGE_DRIVER=vfs BUILDAH_ISOLATION=chroot
RUN --mount=type=bind,source=build,target={cf.BUILD_MOUNT} set -eu; \\
    apt-get update -q; \\
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends {" ".join(DEBIAN_PACKAGES)}; \\
    rm -rf /var/lib/apt/lists/*; \\
    mkdir -p /etc/containers; \\
    printf '{STORAGE_CONF}' > /etc/containers/storage.conf; \\
    python3 -m venv {cf.VENV}; \\
    PIP_CONFIG_FILE={cf.BUILD_MOUNT}/{cf.PIP_CONF} {cf.VENV}/bin/python -m pip install --progress-bar off \\
        -r {cf.BUILD_MOUNT}/{REQUIREMENTS_FILE}; \\
    PIP_CONFIG_FILE={cf.BUILD_MOUNT}/{cf.PIP_CONF} {cf.VENV}/bin/python -m pip download --only-binary=:all: \\
        --progress-bar off -d {BAKED_WHEELS} '{MLFLOW_REQUIREMENT}'; \\
    touch {BAKED_WHEELS}/.complete
{cf._labels(labels or {})}"""


def builder_containerfile(labels: Mapping[str, str] | None = None) -> str:
    """The tools (``ARG FLOPS_TOOLS``) + our packages on the venv's path, smoke-imported."""
    pth = '"$(python -c \'import sysconfig; print(sysconfig.get_path("purelib"))\')/_flops_src.pth"'
    return f"""\
# FLOps builder: the build worker on buildah, for Oakestra's image-builder nodes (generated).
ARG FLOPS_TOOLS
FROM ${{FLOPS_TOOLS}}
COPY src/ {cf.SRC_DIR}/
RUN set -eu; echo {cf.SRC_DIR} > {pth}; python -c 'import {SMOKE}'; buildah --version; git --version
{cf._labels(labels or {})}WORKDIR /tmp
"""


def ensure_builder_image(builder: ImageBuilder, workdir: Path) -> str:
    """``<registry>/flops/builder:<key>`` for this host's platform in ``builder``'s registry: found there, pushed
    from local storage, or built; the Debian base it is made FROM is pushed there too (the worker in it pulls it),
    and with ``share_bases`` the runtime image as well (so a build in it need not make one). Returns the
    reference (what ``FLOPS_OAKESTRA_BUILDER_IMAGE`` names)."""
    platform = native_platform()
    debian = builder._ensure_debian(platform, workdir)
    ctx = workdir / "contexts" / "builder"
    shutil.rmtree(ctx, ignore_errors=True)
    volumes = builder._prepare_context(ctx, platform, (), workdir)
    if builder.settings.share_bases:
        builder._ensure_runtime(debian, platform, ctx, volumes)
    (ctx / "build" / REQUIREMENTS_FILE).write_text(cf.requirements_txt(REQUIREMENTS), encoding="utf-8")
    identity = {
        "base": debian,
        "base_id": builder._image_id(debian),
        "packages": sorted(DEBIAN_PACKAGES),
        "requirements": sorted(REQUIREMENTS),
        "platform": platform,
        "containerfile": tools_containerfile(),
    }
    tools = builder._ensure_local("builder-tools", identity, tools_containerfile, {"FLOPS_BASE": debian}, ctx, volumes)
    material = [builder._image_id(tools), own_code_digest(), builder_containerfile()]
    key = hashlib.sha256(json.dumps(material).encode()).hexdigest()[:16]
    local = f"localhost/flops/builder:{key}"
    if not builder._remote_has(shared_ref(builder.settings.registry, local), platform):
        if not builder._local_image(local):
            started = time.monotonic()
            copy_own_packages(ctx / "src")
            labels = {"org.flops.role": "builder", "org.flops.builder-key": key}
            builder._bud("builder", builder_containerfile(labels), ctx, platform, local, {"FLOPS_TOOLS": tools}, {})
            builder._progress("builder", f"builder image {local} made in {time.monotonic() - started:.1f} s")
        builder.share(local, platform)
    shutil.rmtree(ctx, ignore_errors=True)
    return shared_ref(builder.settings.registry, local)
