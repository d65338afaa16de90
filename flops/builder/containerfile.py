"""The Containerfiles (and the pip configuration) of the image builder, as plain text.

Three layers, each its own image so the heavy parts are built once and shared:

- **runtime** (``runtime_containerfile``): a Debian base (``ARG FLOPS_BASE``), Python 3 with ``venv`` (installed
  with apt only when the base lacks it), a virtual environment at :data:`VENV` holding what every learner and
  aggregator needs (``DEFAULT_RUNTIME_REQUIREMENTS``). Shared by every repo built on this builder.
- **deps** (``deps_containerfile``): the runtime + the repo's dependencies (the contract's requirement lines,
  resolved together with the runtime's so shared packages are not silently changed); kept in local storage
  per (runtime, requirements, platform), so a new commit with unchanged dependencies skips pip.
- **base** (``base_containerfile``): the deps + our ``flops`` and ``flops_utils`` packages on the venv's
  path, smoke-imported.
- **learner** / **aggregator** (``actor_containerfile``): the base + the repo at its commit in :data:`REPO_DIR`,
  entrypoint ``python -m flops.runtime.learner|aggregator``.

Every build context has the same shape: ``build/`` (requirement files, ``pip.conf``, CA bundle, constraints,
wheels; bind-mounted into ``RUN`` steps only, so none of it stays in the image), ``src/`` (our packages) and
``repo/`` (the ML repo). pip reads only ``build/pip.conf``: whether it reaches an index through the host's
settings or installs offline from a wheelhouse is decided there (:func:`pip_conf`), not in the Containerfiles.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

VENV = "/opt/flops/venv"
SRC_DIR = "/opt/flops/src"
REPO_DIR = "/opt/flops/repo"
MLFLOW_VENV = "/opt/flops/mlflow"  # the trained-model image's MLflow (flops.builder.model_image)
MODEL_DIR = "/opt/flops/model"  # the trained model in MLflow's format, in that image
BUILD_MOUNT = "/flops-build"
WHEELS_MOUNT = "/flops-wheels"  # a wheelhouse mounted into RUN steps (emulated platforms install offline)
PIP_CACHE = "/root/.cache/pip"
RUNTIME_REQUIREMENTS = "runtime-requirements.txt"
REPO_REQUIREMENTS = "requirements.txt"
PIP_CONF = "pip.conf"
IMPORT_CHECK = "import_check.py"  # flops.builder.import_check.CHECK_SCRIPT, written into build/
# What the import check runs with: no downloads, no bytecode in the repo (as flops.builder.import_check).
CHECK_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "PYTHONDONTWRITEBYTECODE": "1"}
ENTRYPOINTS = {"learner": "flops.runtime.learner", "aggregator": "flops.runtime.aggregator"}
SMOKE_IMPORTS = "flops, flops_utils, flwr, sklearn, datasets, pyarrow, numpy, pandas"

_PATH = f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_MOUNT = f"--mount=type=bind,source=build,target={BUILD_MOUNT}"
_PIP = f"PIP_CONFIG_FILE={BUILD_MOUNT}/{PIP_CONF} {VENV}/bin/python -m pip install --progress-bar off"


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    pairs = " \\\n      ".join(f"{k}={json.dumps(v)}" for k, v in sorted(labels.items()))
    return f"LABEL {pairs}\n"


def runtime_containerfile(labels: Mapping[str, str] | None = None) -> str:
    """Debian + Python venv + the runtime requirements (``build/runtime-requirements.txt``)."""
    return f"""\
# FLOps runtime: Python venv with what every learner and aggregator needs (generated).
ARG FLOPS_BASE
FROM ${{FLOPS_BASE}}
ENV VIRTUAL_ENV={VENV} PATH={_PATH} PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN {_MOUNT} set -eu; \\
    if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then \\
        apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \\
            python3 python3-venv ca-certificates && rm -rf /var/lib/apt/lists/*; \\
    fi; \\
    python3 -m venv {VENV}; \\
    {_PIP} -r {BUILD_MOUNT}/{RUNTIME_REQUIREMENTS}
{_labels(labels or {})}"""


def deps_containerfile(labels: Mapping[str, str] | None = None) -> str:
    """The runtime (``ARG FLOPS_RUNTIME``) + the repo's requirements, resolved together with the runtime's so
    shared packages are not silently changed. Cached per (runtime, requirements, platform): a new commit
    with the same dependencies reuses it."""
    return f"""\
# FLOps dependencies of one ML repo (generated).
ARG FLOPS_RUNTIME
FROM ${{FLOPS_RUNTIME}}
RUN {_MOUNT} set -eu; \\
    {_PIP} -r {BUILD_MOUNT}/{RUNTIME_REQUIREMENTS} -r {BUILD_MOUNT}/{REPO_REQUIREMENTS}
{_labels(labels or {})}"""


def base_containerfile(labels: Mapping[str, str] | None = None) -> str:
    """The repo's dependencies (``ARG FLOPS_DEPS``) + our packages on the venv's path, smoke-imported."""
    return f"""\
# FLOps base of one ML repo: its dependencies and our runtime (generated).
ARG FLOPS_DEPS
FROM ${{FLOPS_DEPS}}
COPY src/ {SRC_DIR}/
RUN set -eu; \\
    echo {SRC_DIR} > "$(python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/_flops_src.pth"; \\
    python -c 'import {SMOKE_IMPORTS}'
{_labels(labels or {})}"""


def actor_containerfile(role: str, labels: Mapping[str, str] | None = None, *, import_check: bool = False) -> str:
    """A learner or aggregator: the base (``ARG FLOPS_IMAGE_BASE``) + the repo + its entrypoint.

    With ``import_check`` the build runs ``build/import_check.py`` on the repo (``ModelManager`` imports,
    instantiates and hands out its parameters, offline), so a broken repo fails the build, not the learner.
    """
    if role not in ENTRYPOINTS:
        raise ValueError(f"no entrypoint for role {role!r}; one of {', '.join(ENTRYPOINTS)}")
    entrypoint = json.dumps(["python", "-m", ENTRYPOINTS[role]])
    check = ""
    if import_check:
        offline = " ".join(f"{k}={v}" for k, v in sorted(CHECK_ENV.items()))
        check = f"RUN {_MOUNT} env {offline} python {BUILD_MOUNT}/{IMPORT_CHECK} {REPO_DIR}\n"
    return f"""\
# FLOps {role} of one ML repo at one commit (generated).
ARG FLOPS_IMAGE_BASE
FROM ${{FLOPS_IMAGE_BASE}}
COPY repo/ {REPO_DIR}/
WORKDIR {REPO_DIR}
ENV FLOPS_REPO_DIR={REPO_DIR}
{check}{_labels(labels or {})}ENTRYPOINT {entrypoint}
"""


def requirements_txt(lines: Sequence[str]) -> str:
    """A requirements file of the given lines (an empty file when there are none)."""
    return "".join(f"{line}\n" for line in lines)


def pip_conf(options: Mapping[str, str]) -> str:
    """A ``pip.conf`` with ``options`` (pip option name -> value) in its ``[global]`` section."""
    body = "".join(f"{key} = {value}\n" for key, value in sorted(options.items()))
    return f"[global]\n{body}"


def wheelhouse_pip_options(wheels_dir: str = WHEELS_MOUNT) -> dict[str, str]:
    """pip options for an offline install from a wheelhouse prepared on the host (foreign platforms)."""
    return {"no-index": "true", "find-links": wheels_dir}
