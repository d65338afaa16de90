"""The builder: turns an ML repo at a pinned commit into a runnable artifact for learners/aggregators.

`Builder` is the port; `EnvBuilder` (an isolated Python environment per build key) is the first
adapter, and an OCI/buildah backend can slot in beside it with the same `build(spec, workdir)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from flops.build.env_backend import BuilderSettings, EnvBuilder
from flops.build.model_package import ModelPackage, package_model
from flops.build.repo import RepoError, checkout, resolve_commit
from flops.build.result import ArtifactRef, BuildFailure, BuildResult, BuildSpec


class Builder(Protocol):
    """Builds the artifact for one build spec. An unbuildable repo is a `BuildFailure`, not an exception."""

    def build(self, spec: BuildSpec | Mapping[str, Any], workdir: Path) -> BuildResult | BuildFailure: ...


__all__ = [
    "ArtifactRef",
    "BuildFailure",
    "BuildResult",
    "BuildSpec",
    "Builder",
    "BuilderSettings",
    "EnvBuilder",
    "ModelPackage",
    "RepoError",
    "checkout",
    "package_model",
    "resolve_commit",
]
