"""The builder's typed inputs and outputs: the build spec, the artifact it produces, success and failure.

Two artifact kinds: ``python-env`` (the environment backend) and ``image`` (the image backend).

`BuildResult.to_payload()` / `BuildFailure.to_payload()` are exactly the payloads of the
`build.succeeded` / `build.failed` worker reports; `kind` names the report.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class BuildSpec(BaseModel):
    """What to build: the `spec` of a `build` command. `commit=None` means HEAD of the default branch."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    repo_url: str = Field(min_length=1)
    commit: str | None = None
    flavor: str = "default"
    platforms: tuple[str, ...] = ()


class _Built(BaseModel):
    """What every artifact records of what it was built from."""

    model_config = ConfigDict(frozen=True)

    key: str
    repo_url: str
    commit: str
    flavor: str
    platforms: tuple[str, ...]
    dependency_file: str
    requirements: tuple[str, ...]
    # Whether the repo's ``ModelManager.fit_model`` takes the training configuration (FedProx needs it);
    # None: not known (an artifact recorded before this was checked).
    fit_model_takes_config: bool | None = None


class ArtifactRef(_Built):
    """Where a built environment lives: enough for an agent to start a learner or aggregator from it."""

    kind: Literal["python-env"] = "python-env"
    python: str  # the environment's interpreter
    repo_dir: str  # checkout of the ML repo at `commit`; the learner's working directory


class ImageArtifactRef(_Built):
    """Built container images in the FLOps registry: one manifest list per role, each with every platform."""

    kind: Literal["image"] = "image"
    ref: str  # image://<registry>/<owner>/<repo>:<commit>, the set of images below
    images: dict[str, str]  # role (base, learner, aggregator) -> registry reference
    digest: str  # the learner manifest list's digest
    digests: dict[str, str] = Field(default_factory=dict)  # role -> manifest list digest


class BuildResult(BaseModel):
    """A successful build (fresh or from the cache)."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["build.succeeded"] = "build.succeeded"
    artifact: ArtifactRef | ImageArtifactRef = Field(discriminator="kind")
    cached: bool
    warnings: tuple[str, ...] = ()
    duration_s: float

    def to_payload(self) -> dict[str, Any]:
        return {
            "artifact": self.artifact.model_dump(mode="json"),
            "cached": self.cached,
            "warnings": list(self.warnings),
            "duration_s": round(self.duration_s, 3),
        }


class BuildFailure(BaseModel):
    """A build that failed for a reason the user can act on; `step` says where (clone, contract, …)."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["build.failed"] = "build.failed"
    step: str
    reason: str
    log_tail: str = ""
    duration_s: float = 0.0

    def to_payload(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "log_tail": self.log_tail,
            "step": self.step,
            "duration_s": round(self.duration_s, 3),
        }
