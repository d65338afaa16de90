"""Package a trained model for serving (post-training step `build_image_for_trained_model`).

The package is one self-contained directory: the trained model file(s), the repo's model code, the
requirements, and `manifest.json` saying how to serve it: the built environment's interpreter
(`python`), the entry module (`flops.runtime.serve`, started as `python -m ENTRY --package DIR`), the
parameters file (`model_file`, the aggregator's `model.npz`) and the HTTP paths it answers.
It is assembled in a temporary sibling directory and renamed into place, so a reader never sees a
half-written package.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flops.builder.result import ArtifactRef

MANIFEST = "manifest.json"
PACKAGE_FORMAT = "flops-model-package/1"
DEFAULT_ENTRY_MODULE = "flops.runtime.serve"
MLFLOW_ENTRY_MODULE = "flops.runtime.mlflow_serve"  # a tracked project's package: MLflow's scoring server
MLFLOW_MODEL_DIR = "mlflow-model"  # where such a package keeps the model the aggregator logged to MLflow
# The aggregator saves the best round's parameters under this name (flops.runtime.training).
DEFAULT_MODEL_FILE = "model.npz"
# Not model code: VCS data, caches, and local datasets that must never leave the node.
CODE_IGNORE = shutil.ignore_patterns(".git", "__pycache__", "*.pyc", ".venv", "*.parquet", "data")


def _model_file(model_files: list[str]) -> str | None:
    """The parameters file the server loads: `model.npz` if present, else the only file, else None."""
    if DEFAULT_MODEL_FILE in model_files:
        return DEFAULT_MODEL_FILE
    return model_files[0] if len(model_files) == 1 else None


@dataclass(frozen=True)
class ModelPackage:
    """A packaged model: its directory and the manifest written into it."""

    path: Path
    manifest: dict[str, Any]


def package_model(
    model_dir: Path,
    env_ref: ArtifactRef | Mapping[str, Any],
    repo_dir: Path,
    out_dir: Path,
    *,
    entry_module: str = DEFAULT_ENTRY_MODULE,
) -> ModelPackage:
    """Assemble the serving package for the model in `model_dir` (a file or a directory) at `out_dir`."""
    ref = env_ref if isinstance(env_ref, ArtifactRef) else ArtifactRef.model_validate(env_ref)
    if not model_dir.exists():
        raise FileNotFoundError(f"trained model not found: {model_dir}")
    if out_dir.exists():
        raise FileExistsError(f"model package already exists: {out_dir}")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if model_dir.is_dir():
            shutil.copytree(model_dir, tmp / "model")
        else:
            (tmp / "model").mkdir(parents=True)
            shutil.copy2(model_dir, tmp / "model" / model_dir.name)
        shutil.copytree(repo_dir, tmp / "code", ignore=CODE_IGNORE)
        (tmp / "requirements.txt").write_text("".join(f"{r}\n" for r in ref.requirements), encoding="utf-8")
        model_files = sorted(str(p.relative_to(tmp / "model")) for p in (tmp / "model").rglob("*") if p.is_file())
        manifest = {
            "format": PACKAGE_FORMAT,
            "python": ref.python,
            "entry_module": entry_module,
            "model_dir": "model",
            "model_files": model_files,
            "model_file": _model_file(model_files),
            "code_dir": "code",
            "requirements_file": "requirements.txt",
            "health_path": "/health",
            "invocations_path": "/invocations",
            "repo_url": ref.repo_url,
            "commit": ref.commit,
            "build_key": ref.key,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ModelPackage(path=out_dir, manifest=manifest)
