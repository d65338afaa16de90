"""The shared "runtime base" environment every project environment extends.

It holds what every learner and aggregator needs (Flower, scikit-learn, datasets, pyarrow, numpy,
pandas) plus our own `flops` / `flops_utils` packages, built once per (interpreter, requirement set)
and reused by all projects: a project env only adds what its repo needs on top. Project envs reach it
through a `.pth` file (`site.addsitedir`, so the base's own `.pth` files are honoured too).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

import flops
from flops.builder.installer import Installer
from flops.builder.locking import file_lock
from flops.builder.process import CommandFailed, StepFailed, run, tail

DEFAULT_RUNTIME_REQUIREMENTS: tuple[str, ...] = (
    "flwr==1.42.*",
    "scikit-learn>=1.4",
    "datasets>=3,<4",
    "pyarrow>=15",
    "numpy>=1.26",
    "pandas>=2",
    # What our own runtime modules import (flops.runtime.*, flops.data.client).
    "structlog>=24.1",
    "pydantic>=2.7",
    # The aggregator logs to MLflow when the project is tracked (flops.runtime.tracking); system metrics.
    "mlflow-skinny>=3.1,<4",
    "skops<1",  # MLflow's safe format for scikit-learn models
    "psutil>=5.9",
    # An actor on Oakestra runs under flops.oakestra.shim, which publishes its reports over MQTT itself
    # (flops.bus) and reads the broker address with flops.settings.
    "paho-mqtt>=2.1,<3",
    "pydantic-settings>=2.3,<3",
)
OWN_PACKAGES = ("flops", "flops_utils")
READY = "ready.json"


@dataclass(frozen=True)
class RuntimeBase:
    """A ready runtime base: its interpreter and the site-packages directory projects extend."""

    key: str
    python: Path
    site_packages: Path


def own_packages_dir() -> Path:
    """The directory holding our `flops/` (and `flops_utils/`) packages, source checkout or install."""
    return Path(flops.__file__).resolve().parent.parent


def own_code_digest() -> str:
    """A digest of our packages' Python sources: what an image carrying them (the builder image, the demo's
    registry) is keyed by, so a change to FLOps never reuses one made with the old code."""
    digest = hashlib.sha256()
    for name in OWN_PACKAGES:
        for path in sorted((own_packages_dir() / name).rglob("*.py")):
            digest.update(str(path.relative_to(own_packages_dir())).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def runtime_base_key(python_version: str, requirements: tuple[str, ...], installer_mode: str) -> str:
    """Identity of a base env: changing the interpreter, the runtime pins or our source location
    makes a new one instead of mutating one that project envs already point at."""
    material = json.dumps([python_version, sorted(requirements), installer_mode, str(own_packages_dir())])
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def site_packages(python: Path) -> Path:
    """The purelib directory of the environment `python` belongs to."""
    code = "import sysconfig; print(sysconfig.get_path('purelib'))"
    return Path(run(python, ["-c", code], timeout_s=60).strip().splitlines()[-1])


def ensure_runtime_base(
    root: Path,
    installer: Installer,
    *,
    python_version: str,
    requirements: tuple[str, ...] = DEFAULT_RUNTIME_REQUIREMENTS,
    lock_timeout_s: float = 3600.0,
) -> RuntimeBase:
    """The runtime base under `root`, built now if it is missing or was left half-built."""
    key = runtime_base_key(python_version, requirements, installer.mode)
    home = root / key
    log = structlog.get_logger(__name__).bind(runtime_base=key)
    ready = _read_ready(home)
    if ready is not None:
        return ready
    with file_lock(root / f"{key}.lock", timeout_s=lock_timeout_s):
        ready = _read_ready(home)  # another builder may have finished it while we waited
        if ready is not None:
            return ready
        started = time.monotonic()
        shutil.rmtree(home, ignore_errors=True)  # leftovers of a crashed build: start clean
        home.mkdir(parents=True)
        try:
            python = installer.create_venv(home / "venv", with_pip=True)
            installer.install(python, list(requirements))
            sp = site_packages(python)
            _link_own_packages(home, sp)
            smoke = "import flwr, sklearn, datasets, pyarrow, numpy, pandas, flops"
            run(python, ["-c", smoke], timeout_s=300)
        except CommandFailed as exc:
            what = "timed out" if exc.timed_out else "failed"
            reason = f"building the runtime base env {what}"
            raise StepFailed("runtime_base", reason, tail(exc.output)) from exc
        base = RuntimeBase(key=key, python=python, site_packages=sp)
        record = {
            "python": str(python),
            "site_packages": str(sp),
            "requirements": list(requirements),
            "duration_s": round(time.monotonic() - started, 3),
        }
        _atomic_write(home / READY, json.dumps(record, indent=2))
        log.info("runtime base built", duration_s=record["duration_s"], installer=installer.mode)
        return base


def _link_own_packages(home: Path, sp: Path) -> None:
    """Expose our packages without their manager dependencies: a directory of symlinks to them on the
    base's path. Works the same for a source checkout (edits show up) and an installed distribution
    (where pointing at the parent would expose every package of the agent's site-packages)."""
    src = home / "flops-src"
    src.mkdir(exist_ok=True)
    for name in OWN_PACKAGES:
        # Linked even if not there yet (flops_utils in an early checkout): the link comes alive
        # when the package appears, without a rebuild of the base.
        (src / name).symlink_to(own_packages_dir() / name, target_is_directory=True)
    (sp / "_flops_own_packages.pth").write_text(f"{src}\n", encoding="utf-8")


def _read_ready(home: Path) -> RuntimeBase | None:
    try:
        record = json.loads((home / READY).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    python = Path(record["python"])
    if not python.exists():
        return None
    return RuntimeBase(key=home.name, python=python, site_packages=Path(record["site_packages"]))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
