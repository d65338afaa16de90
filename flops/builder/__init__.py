"""The builder: turns an ML repo at a pinned commit into a runnable artifact for learners/aggregators.

`Builder` is the port; `EnvBuilder` (an isolated Python environment per build key, the fast development
path) and `ImageBuilder` (container images with buildah, pushed to the FLOps registry) are its adapters,
with the same `build(spec, workdir)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from flops.builder.result import ArtifactRef, BuildFailure, BuildResult, BuildSpec, ImageArtifactRef

# The heavy parts (sh, uv, git) load on first use, so that runtime modules such as the model server can
# import flops.builder.model_package inside learner environments that do not carry the builder's dependencies.
_LAZY = {
    "BuilderSettings": "flops.builder.env_backend",
    "EnvBuilder": "flops.builder.env_backend",
    "ImageBuilder": "flops.builder.image_backend",
    "ImageBuilderSettings": "flops.builder.image_backend",
    "ModelPackage": "flops.builder.model_package",
    "package_model": "flops.builder.model_package",
    "RepoError": "flops.builder.repo",
    "checkout": "flops.builder.repo",
    "resolve_commit": "flops.builder.repo",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)


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
    "ImageArtifactRef",
    "ImageBuilder",
    "ImageBuilderSettings",
    "ModelPackage",
    "RepoError",
    "checkout",
    "package_model",
    "resolve_commit",
]
