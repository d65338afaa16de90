"""The trained-model image: the best model in MLflow's format, served by MLflow's scoring server.

``python -m flops.builder.model_image --spec JSON --workdir DIR --registry HOST:PORT [--registry-tls]
[--report-fd FD]`` runs on the agent that holds the model (where the aggregator ran). From the project's
learner image (the repo, its dependencies and our runtime, pulled from the registry) it makes
``<registry>/<customer>/trained_model:<project id>``:

- ``/opt/flops/mlflow``: a virtual environment with mlflow-skinny only, installed offline from wheels the
  host downloads; it sees the learner image's packages *after* its own (a ``site.addsitedir`` line), so the
  repo's dependencies are used but never changed by MLflow's;
- ``/opt/flops/model``: the model saved with its flavor (``flops.runtime.mlflow_model``), or for a tracked
  project the one the aggregator logged to MLflow;
- the entrypoint ``python -m flops.runtime.mlflow_serve --model /opt/flops/model``.

The model is ``spec.model.model_ref``: a path on this host (an agent's aggregator left it there) or an
``oci://`` reference to the model files an Oakestra aggregator pushed (:mod:`flops.runtime.model_files`), pulled
into the workdir first. Our packages are copied in again, so the serving code is the agent's version whatever
built the learner image. Reports ``model.built`` ``{image_ref: "image://<ref>"}`` or ``model.failed``
``{reason, log_tail}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from flops.builder import containerfile as cf
from flops.builder.buildah import stream, succeeds
from flops.builder.image_backend import copy_own_packages, download_wheels, native_platform
from flops.builder.images import component
from flops.builder.model_package import DEFAULT_MODEL_FILE
from flops.builder.process import StepFailed
from flops.registry import RegistryError
from flops.runtime import model_files
from flops.runtime.reports import MODEL_BUILT, MODEL_FAILED, ReportWriter

log = structlog.get_logger(__name__)

MLFLOW_REQUIREMENT = "mlflow-skinny>=3,<4"
# The builder image (flops.builder.builder_image) carries those wheels here: a model builder on Oakestra needs no
# download (a node may reach no package index, or only through a proxy whose CA the image lacks).
BAKED_WHEELS = Path("/opt/flops/wheels-mlflow")
MLFLOW_VENV, MODEL_DIR, BASE_VENV, SRC_DIR, REPO_DIR = cf.MLFLOW_VENV, cf.MODEL_DIR, cf.VENV, cf.SRC_DIR, cf.REPO_DIR
WHEELS = "/flops-wheels"
PYTHON_VERSION = "3.11.2"  # the Debian base's python3 (as ImageBuilderSettings.python_version)
PARAMS = "/flops-params"


@dataclass(frozen=True)
class ModelImageSpec:
    learner_image: str  # the project's learner image in the registry
    model_file: Path  # the aggregator's best parameters (model.npz) on this host, or in its pulled model files
    flavor: str
    customer: str
    project_id: str
    model_uri: str | None = None  # the best model logged to MLflow (tracked projects)
    tracking_uri: str | None = None
    # oci://…: the aggregator's model files in the registry (an Oakestra aggregator's: its container is gone),
    # pulled to this builder's workdir first; model_file is then the name of the parameters among them.
    model_files: str | None = None

    def ref(self, registry: str) -> str:
        return f"{registry}/{component(self.customer, 'customer')}/trained_model:{component(self.project_id, 'p')}"


class ModelImageBuilder:
    """Builds and pushes one trained-model image with buildah (``build``)."""

    def __init__(
        self, registry: str, workdir: Path, *, registry_tls: bool = False, storage_driver: str = "overlay"
    ) -> None:
        self.registry = registry
        self.registry_tls = registry_tls
        self.workdir = workdir
        self.tls = [] if registry_tls else ["--tls-verify=false"]
        self.storage_driver = storage_driver
        self.storage = ["--storage-driver", storage_driver]

    def build(self, spec: ModelImageSpec) -> str:
        """Build and push the image; returns its reference. Raises StepFailed naming the step."""
        model_file = self.model_file(spec)
        ref = spec.ref(self.registry)
        wheels = self._wheels()
        ctr = self._buildah("pull", f"pulling {spec.learner_image}", ["from", *self.tls, spec.learner_image])[-1]
        try:
            src = self.workdir / "src" / component(spec.project_id, "p")
            shutil.rmtree(src, ignore_errors=True)
            copy_own_packages(src)
            self._buildah("copy", "copying our runtime", ["copy", ctr, str(src), SRC_DIR])
            shutil.rmtree(src, ignore_errors=True)
            base_site = "$(" + BASE_VENV + "/bin/python -c 'import sysconfig; print(sysconfig.get_path(\"purelib\"))')"
            script = (
                f"set -eu; python3 -m venv {MLFLOW_VENV}; "
                f"{MLFLOW_VENV}/bin/python -m pip install --no-index --find-links {WHEELS} --progress-bar off "
                f"'{MLFLOW_REQUIREMENT}'; "
                f"site={base_site}; "
                f"echo \"import site; site.addsitedir('$site')\" > "
                f'"$({MLFLOW_VENV}/bin/python -c \'import sysconfig; print(sysconfig.get_path("purelib"))\')/'
                'zz_flops_base.pth"'
            )
            self._run(ctr, "mlflow", "installing mlflow-skinny", ["sh", "-c", script], {str(wheels): WHEELS})
            params = {str(model_file.parent): PARAMS}
            save = [f"{MLFLOW_VENV}/bin/python", "-m", "flops.runtime.mlflow_model", "--repo", REPO_DIR]
            save += ["--params", f"{PARAMS}/{model_file.name}", "--flavor", spec.flavor, "--out", MODEL_DIR]
            if spec.model_uri and spec.tracking_uri:  # tracked: the model logged to MLflow is the one served
                save += ["--model-uri", spec.model_uri, "--tracking-uri", spec.tracking_uri]
            self._run(ctr, "model", "saving the model in MLflow's format", save, params)
            entrypoint = json.dumps(["python", "-m", "flops.runtime.mlflow_serve", "--model", MODEL_DIR])
            config = ["config", "--entrypoint", entrypoint, "--cmd", "", "--workingdir", REPO_DIR]
            config += ["--env", f"PATH={MLFLOW_VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
            config += ["--env", f"VIRTUAL_ENV={MLFLOW_VENV}", "--label", "org.flops.role=trained_model"]
            config += ["--label", f"org.flops.project={spec.project_id}", "--label", f"org.flops.flavor={spec.flavor}"]
            self._buildah("config", "configuring the image", [*config, ctr])
            self._buildah("commit", "committing the image", ["commit", "--quiet", ctr, ref])
        finally:
            succeeds("buildah", [*self.storage, "rm", ctr])
            if spec.model_files:
                shutil.rmtree(model_file.parent, ignore_errors=True)
        try:
            self._buildah("push", f"pushing {ref}", ["push", *self.tls, ref, f"docker://{ref}"])
        finally:
            if self.storage_driver == "vfs":
                succeeds("buildah", [*self.storage, "rmi", ref])  # the registry has it; vfs copies cost GBs
        return ref

    def model_file(self, spec: ModelImageSpec) -> Path:
        """The parameters file on this host: the aggregator's, or pulled from its model files in the registry."""
        model_file = spec.model_file
        if spec.model_files:
            dest = self.workdir / "model-files" / component(spec.project_id, "p")
            try:
                model_file = model_files.pull(spec.model_files, dest, tls=self.registry_tls) / spec.model_file.name
            except (RegistryError, OSError) as exc:  # OSError: the registry unreachable
                raise StepFailed("model", f"trained model not fetched from {spec.model_files}: {exc}") from exc
            where = f"in {spec.model_files}"
        else:
            where = "on this agent"
        if not model_file.is_file():
            raise StepFailed("model", f"trained model not found {where}: {model_file}")
        return model_file

    def _wheels(self) -> Path:
        """mlflow-skinny and its dependencies as wheels for this host's platform (baked in, or downloaded once)."""
        if (BAKED_WHEELS / ".complete").exists():
            return BAKED_WHEELS
        wheels = self.workdir / "cache" / "wheels-mlflow"
        if not (wheels / ".complete").exists():
            arch = native_platform().split("/")[1]
            download_wheels(sys.executable, wheels, arch, PYTHON_VERSION, [MLFLOW_REQUIREMENT], self._line, 1800.0)
            (wheels / ".complete").touch()
        return wheels

    def _run(self, ctr: str, step: str, what: str, argv: list[str], volumes: dict[str, str]) -> None:
        args = ["run", "--isolation", "chroot"]
        for source, target in volumes.items():
            args += ["--volume", f"{source}:{target}:ro"]
        self._buildah(step, what, [*args, ctr, "--", *argv])

    def _buildah(self, step: str, what: str, args: list[str]) -> list[str]:
        lines = stream("buildah", [*self.storage, *args], step=step, what=what, on_line=self._line, timeout_s=1800.0)
        return [ln for ln in lines if ln.strip()] or [""]

    @staticmethod
    def _line(step: str, line: str) -> None:
        if line.strip():
            log.info(line, step=step)


def parse_spec(raw: dict[str, Any]) -> ModelImageSpec:
    """The ``build_model_image`` command's spec: the project's image artifact and the trained model."""
    details = raw.get("artifact", {}).get("details", {})
    reference = str(raw["model"]["model_ref"])
    remote = model_files.is_remote(reference)
    model_ref = Path(DEFAULT_MODEL_FILE if remote else reference)  # pushed model files hold model.npz at their top
    return ModelImageSpec(
        learner_image=str(details["images"]["learner"]),
        model_file=model_ref if model_ref.suffix else model_ref / DEFAULT_MODEL_FILE,
        model_files=reference if remote else None,
        flavor=str(details.get("flavor") or "sklearn"),
        customer=str(raw.get("customer") or "default"),
        project_id=str(raw.get("project_id") or raw["model"].get("project_id") or "model"),
        model_uri=(raw.get("tracking") or {}).get("model_uri"),
        tracking_uri=(raw.get("tracking") or {}).get("url"),
    )


def main(argv: list[str] | None = None) -> int:
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    p = argparse.ArgumentParser(prog="python -m flops.builder.model_image", description=__doc__)
    p.add_argument("--spec", required=True)
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--registry", default="127.0.0.1:5000")
    p.add_argument("--registry-tls", action="store_true")
    p.add_argument("--report-fd", type=int, default=None)
    p.add_argument("--storage-driver", default="overlay", help="buildah's storage driver (overlay or vfs)")
    args = p.parse_args(argv)
    reports = ReportWriter.open(args.report_fd)
    started = time.monotonic()
    try:
        spec = parse_spec(json.loads(args.spec))
        ref = ModelImageBuilder(
            args.registry, args.workdir, registry_tls=args.registry_tls, storage_driver=args.storage_driver
        ).build(spec)
    except StepFailed as exc:
        reports.emit(MODEL_FAILED, reason=f"trained-model image: {exc.reason}", log_tail=exc.log_tail[-4000:])
        return 1
    except (KeyError, ValueError) as exc:
        reports.emit(MODEL_FAILED, reason=f"trained-model image: bad build_model_image spec: {exc}")
        return 1
    log.info("trained-model image pushed", ref=ref, duration_s=round(time.monotonic() - started, 1))
    reports.emit(MODEL_BUILT, image_ref=f"image://{ref}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
