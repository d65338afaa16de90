"""The project SLA: what a user asks FLOps for, compatible with the original FLOps SLA files.

Every field, default and enum value of the original is accepted unchanged. Unlike the original, unknown
keys and nonsense values are refused with a field-level message. Extensions of ours (``ml_repo_commit``,
``training_configuration.strategy``, ``deadlines``) are optional, so original files still validate.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Self

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from flops.lifecycle_stages import Stage


class MLModelFlavor(enum.StrEnum):
    SKLEARN = "sklearn"
    PYTORCH = "pytorch"
    KERAS = "keras"
    TENSORFLOW = "tensorflow"


class Platform(enum.StrEnum):
    LINUX_AMD64 = "linux/amd64"
    LINUX_ARM64 = "linux/arm64"


class TrainingMode(enum.StrEnum):
    CLASSIC = "classic"
    HIERARCHICAL = "hierarchical"


class PostTrainingStep(enum.StrEnum):
    BUILD_IMAGE_FOR_TRAINED_MODEL = "build_image_for_trained_model"
    DEPLOY_TRAINED_MODEL_IMAGE = "deploy_trained_model_image"


class Strategy(enum.StrEnum):
    FEDAVG = "fedavg"
    FEDPROX = "fedprox"
    FEDADAM = "fedadam"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)


# Strict: "3" and 2.0 are refused, as the README promises for wrong types (pydantic would coerce them).
Positive = Annotated[int, Field(ge=1, strict=True)]
# Tags name files ``<tag>.<md5>.parquet``: a "." could never match and a "," breaks tag lists.
DataTag = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_\-]+$")]


class TrainingConfiguration(_Strict):
    mode: TrainingMode = TrainingMode.CLASSIC
    data_tags: list[DataTag] = []
    training_cycles: Positive = 1
    training_rounds: Annotated[int, Field(ge=1, le=10_000, strict=True)] = 3
    min_available_clients: Positive = 1
    min_fit_clients: Positive = 1
    min_evaluate_clients: Positive = 1
    # Extension: the Flower strategy the aggregator runs.
    strategy: Strategy = Strategy.FEDAVG

    @model_validator(mode="after")
    def _clients_fit(self) -> Self:
        if self.min_fit_clients > self.min_available_clients:
            raise ValueError(
                f"min_fit_clients ({self.min_fit_clients}) cannot exceed "
                f"min_available_clients ({self.min_available_clients})"
            )
        if self.min_evaluate_clients > self.min_available_clients:
            raise ValueError(
                f"min_evaluate_clients ({self.min_evaluate_clients}) cannot exceed "
                f"min_available_clients ({self.min_available_clients})"
            )
        if self.mode is TrainingMode.CLASSIC and self.training_cycles != 1:
            raise ValueError("training_cycles applies to hierarchical mode only; leave it at 1 in classic mode")
        return self

    @field_validator("data_tags", mode="before")
    @classmethod
    def _tag_string(cls, tags: object) -> object:
        # Older original SLA files give a single tag as a bare string.
        return [tags] if isinstance(tags, str) else tags

    @field_validator("data_tags")
    @classmethod
    def _unique_tags(cls, tags: list[str]) -> list[str]:
        # An omitted data_tags (the original's data-free SLAs) is the default and is not validated.
        if not tags:
            raise ValueError("give at least one data tag, or leave data_tags out")
        if len(set(tags)) != len(tags):
            raise ValueError("data_tags must not repeat a tag")
        return tags

    @model_serializer(mode="wrap")
    def _omit_no_tags(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Stored SLAs are validated again at boot: an omitted data_tags must stay omitted, not become [].
        data: dict[str, Any] = handler(self)
        if not self.data_tags:
            data.pop("data_tags", None)
        return data


class ResourceConstraints(_Strict):
    memory: Annotated[int, Field(ge=1, strict=True, description="MiB")] = 100
    vcpus: Annotated[int, Field(ge=1, strict=True)] = 1
    storage: Annotated[int, Field(ge=0, strict=True, description="MiB")] = 0


class ProjectSLA(_Strict):
    customerID: Annotated[
        str, Field(min_length=1, max_length=128, validation_alias=AliasChoices("customerID", "customer_id"))
    ] = "Admin"
    verbose: bool = False
    ml_repo_url: Annotated[str, Field(min_length=1, max_length=2048)]
    # Extension: pin the repo to a commit (or branch/tag); default: the default branch's HEAD at submit.
    ml_repo_commit: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    ml_model_flavor: MLModelFlavor
    use_devel_base_images: bool = False
    supported_platforms: Annotated[list[Platform], Field(min_length=1)] = [Platform.LINUX_AMD64]
    training_configuration: TrainingConfiguration = TrainingConfiguration()
    post_training_steps: list[PostTrainingStep] = []
    resource_constraints: ResourceConstraints = ResourceConstraints()
    # Extension: per-stage deadlines in seconds, overriding the manager's defaults.
    deadlines: dict[Stage, Annotated[float, Field(gt=0, le=7 * 24 * 3600)]] = {}

    @model_validator(mode="after")
    def _devel_images(self) -> Self:
        if self.use_devel_base_images and self.supported_platforms != [Platform.LINUX_AMD64]:
            raise ValueError('use_devel_base_images works only with supported_platforms ["linux/amd64"]')
        return self

    @field_validator("ml_repo_url")
    @classmethod
    def _repo_url(cls, url: str) -> str:
        schemes = ("https://", "http://", "ssh://", "git://", "file://", "git@", "/", "./", "../")
        if not url.startswith(schemes):
            raise ValueError(
                "must be a git URL (https://, ssh://, git@host:path, file://) or an absolute or ./relative path"
            )
        return url

    @field_validator("post_training_steps")
    @classmethod
    def _steps(cls, steps: list[PostTrainingStep]) -> list[PostTrainingStep]:
        if len(set(steps)) != len(steps):
            raise ValueError("post_training_steps must not repeat a step")
        if (
            PostTrainingStep.DEPLOY_TRAINED_MODEL_IMAGE in steps
            and PostTrainingStep.BUILD_IMAGE_FOR_TRAINED_MODEL not in steps
        ):
            raise ValueError("deploy_trained_model_image needs build_image_for_trained_model before it")
        return sorted(steps, key=list(PostTrainingStep).index)

    @field_validator("supported_platforms")
    @classmethod
    def _platforms(cls, platforms: list[Platform]) -> list[Platform]:
        if len(set(platforms)) != len(platforms):
            raise ValueError("supported_platforms must not repeat a platform")
        return platforms

    @field_validator("deadlines")
    @classmethod
    def _deadlines(cls, deadlines: dict[Stage, float]) -> dict[Stage, float]:
        if Stage.FINISHED in deadlines:
            raise ValueError("finished is terminal and has no deadline")
        return deadlines
