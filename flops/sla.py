"""The project SLA: what a user asks FLOps for, compatible with the original FLOps SLA files.

Every field, default and enum value of the original is accepted unchanged. Unlike the original, unknown
keys and nonsense values are refused with a field-level message. Extensions of ours (``ml_repo_commit``,
``training_configuration.strategy`` and ``strategy_params``, ``deadlines``) are optional, so original files still
validate.
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
    ValidationInfo,
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


# Strategy parameters: which strategy reads which, and FedProx's default proximal term.
STRATEGY_PARAMS: dict[Strategy, tuple[str, ...]] = {
    Strategy.FEDAVG: (),
    Strategy.FEDPROX: ("proximal_mu",),
    Strategy.FEDADAM: ("eta", "eta_l", "beta_1", "beta_2", "tau"),
}
DEFAULT_PROXIMAL_MU = 0.1
# Strategies whose learners must change their local training (the repo's ``fit_model(config)``).
CLIENT_SIDE_STRATEGIES = (Strategy.FEDPROX,)

_Rate = Annotated[float, Field(gt=0, le=100)]
_Beta = Annotated[float, Field(ge=0, lt=1)]


class StrategyParams(_Strict):
    """Extension: the chosen strategy's parameters (every one optional; Flower's defaults otherwise).

    FedProx: ``proximal_mu`` (> 0, default 0.1), the weight of the proximal term ``mu/2 * ||w - w_global||^2``
    the learners add to their local objective. FedAdam (server-side Adam on the averaged update): ``eta``
    (server learning rate, default 0.1), ``eta_l`` (0.1), ``beta_1`` (0.9), ``beta_2`` (0.99), ``tau`` (1e-3).
    """

    proximal_mu: Annotated[float, Field(gt=0, le=10_000)] | None = None
    eta: _Rate | None = None
    eta_l: _Rate | None = None
    beta_1: _Beta | None = None
    beta_2: _Beta | None = None
    tau: Annotated[float, Field(gt=0, le=1)] | None = None

    def given(self) -> dict[str, float]:
        return {k: v for k, v in self.model_dump().items() if v is not None}

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Stored and published SLAs show the parameters the user gave, not a row of nulls.
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if v is not None}


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
    # Extension: the Flower strategy the aggregator runs, and its parameters.
    strategy: Strategy = Strategy.FEDAVG
    strategy_params: StrategyParams = StrategyParams()
    # Extension (hierarchical mode): how many clusters must take part. Default: every cluster with learners
    # holding the data must reach the per-cluster minimums (a cluster below them is refused, by name); with
    # min_clusters, clusters below the minimums are left out as long as this many qualify.
    min_clusters: Positive | None = None

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
        if self.mode is TrainingMode.CLASSIC and self.min_clusters is not None:
            raise ValueError("min_clusters applies to hierarchical mode only; leave it out in classic mode")
        return self

    @field_validator("strategy_params")
    @classmethod
    def _params_of_strategy(cls, params: StrategyParams, info: ValidationInfo) -> StrategyParams:
        strategy = info.data.get("strategy")
        if strategy is None:
            return params  # the strategy itself is invalid: that error is reported on its own field
        foreign = sorted(set(params.given()) - set(STRATEGY_PARAMS[strategy]))
        if foreign:
            takes = ", ".join(STRATEGY_PARAMS[strategy]) or "none"
            raise ValueError(f"{', '.join(foreign)} does not apply to strategy {strategy.value} (it takes: {takes})")
        return params

    def strategy_settings(self) -> dict[str, float]:
        """The parameters the aggregator's strategy runs with (FedProx's default mu filled in)."""
        given = self.strategy_params.given()
        if self.strategy is Strategy.FEDPROX:
            given.setdefault("proximal_mu", DEFAULT_PROXIMAL_MU)
        return given

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
    # What each learner and aggregator may use (None: the deployer's own per-kind sizes; the original defaulted
    # to 100 MiB and ignored it, which would starve a learner if it were applied).
    resource_constraints: ResourceConstraints | None = None
    # Extension: per-stage deadlines in seconds, overriding the manager's defaults.
    deadlines: dict[Stage, Annotated[float, Field(gt=0, le=7 * 24 * 3600)]] = {}

    def actor_resources(self) -> dict[str, dict[str, int]]:
        """The ``resources`` entry of a learner's or aggregator's command spec: what the SLA allows it, for a
        deployer that sizes what it starts (Oakestra services); agents may ignore it. Empty without constraints."""
        rc = self.resource_constraints
        return {} if rc is None else {"resources": {"memory": rc.memory, "vcpus": rc.vcpus}}

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
