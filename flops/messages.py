"""Typed messages on the bus: requests, replies, worker reports, commands, project state and events.

Bytes become these objects in one place (:func:`decode`); a validation failure is an error outcome carrying
pydantic's field-level text, never a ``KeyError`` deep inside a handler.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    ValidationError,
    model_serializer,
)

from flops.lifecycle_stages import Outcome, Stage
from flops.sla import ProjectSLA

Id = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+$")]


def new_id(prefix: str) -> str:
    """A fresh, topic-safe id such as ``p-1f3a...``."""
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def now() -> float:
    return time.time()


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


# --- client -> manager -------------------------------------------------------------------------------


class ProjectRequest(Message):
    request_id: Id
    sla: ProjectSLA
    ts: float = Field(default_factory=now)


class CancelRequest(Message):
    request_id: Id
    reason: Annotated[str, Field(max_length=1000)] = "cancelled by user"
    ts: float = Field(default_factory=now)


class FieldError(Message):
    field: str
    message: str


class Reply(Message):
    request_id: str
    project_id: str | None = None
    errors: list[FieldError] | None = None
    duplicate: bool = False


# --- workers -> manager ------------------------------------------------------------------------------


class ReportBase(Message):
    event_id: Id
    project_id: Id
    source: Annotated[str, Field(min_length=1, max_length=256)]
    command_id: Id | None = None
    ts: float = Field(default_factory=now)


class ArtifactRef(Message):
    ref: str
    key: str | None = None
    commit: str | None = None
    details: dict[str, Any] = {}


class BuildStarted(ReportBase):
    kind: Literal["build.started"] = "build.started"


class BuildSucceeded(ReportBase):
    kind: Literal["build.succeeded"] = "build.succeeded"
    artifact: ArtifactRef
    cached: bool = False
    warnings: list[str] = []
    duration_s: float | None = None


class BuildFailed(ReportBase):
    kind: Literal["build.failed"] = "build.failed"
    reason: str
    log_tail: str = ""


class LearnerReady(ReportBase):
    kind: Literal["learner.ready"] = "learner.ready"
    agent_id: Id
    examples: int | None = None
    # The learner's SuperNode key for this project (OpenSSH line) when it dials over TLS; the aggregator
    # registers it with its SuperLink (flops.runtime.flower_tls).
    public_key: Annotated[str, Field(max_length=1024)] | None = None


class LearnerFailed(ReportBase):
    kind: Literal["learner.failed"] = "learner.failed"
    agent_id: Id
    reason: str
    log_tail: str = ""


class AggregatorStarted(ReportBase):
    kind: Literal["aggregator.started"] = "aggregator.started"
    address: str


class RoundCompleted(ReportBase):
    kind: Literal["round.completed"] = "round.completed"
    round: Annotated[int, Field(ge=1)]
    loss: float | None = None
    accuracy: float | None = None
    examples: int | None = None
    duration_s: float | None = None
    # Mean L2 distance of the learners' trained models from the round's global model.
    drift: float | None = None
    # Hierarchical mode: a cluster aggregator's round names its cluster and the root's cycle.
    cluster: Annotated[str, Field(max_length=128)] | None = None
    cycle: Annotated[int, Field(ge=1)] | None = None


class TrainingSucceeded(ReportBase):
    kind: Literal["training.succeeded"] = "training.succeeded"
    best_round: int
    loss: float | None = None
    accuracy: float | None = None
    # A path on the aggregator's host, or (an Oakestra aggregator's) the oci:// reference of the model files its
    # shim pushed to the registry (flops.runtime.model_files).
    model_ref: str


class TrainingFailed(ReportBase):
    kind: Literal["training.failed"] = "training.failed"
    reason: str
    log_tail: str = ""


class ModelBuilt(ReportBase):
    kind: Literal["model.built"] = "model.built"
    image_ref: str


class ModelServed(ReportBase):
    kind: Literal["model.served"] = "model.served"
    url: str


class ModelFailed(ReportBase):
    kind: Literal["model.failed"] = "model.failed"
    reason: str
    log_tail: str = ""


class CommandFailed(ReportBase):
    """An agent could not carry out a command at all (unknown kind, bad spec, child crashed at start)."""

    kind: Literal["command.failed"] = "command.failed"
    reason: str
    log_tail: str = ""


class TrackingLogged(ReportBase):
    """The aggregator logged to MLflow (a round's run, the best model) or could not (``warning``)."""

    kind: Literal["tracking.logged"] = "tracking.logged"
    url: Annotated[str, Field(max_length=2048)] | None = None
    experiment_id: Annotated[str, Field(max_length=128)] | None = None
    round: Annotated[int, Field(ge=1)] | None = None
    run_id: Annotated[str, Field(max_length=128)] | None = None
    model_uri: Annotated[str, Field(max_length=2048)] | None = None
    registered_model: Annotated[str, Field(max_length=256)] | None = None
    model_version: Annotated[str, Field(max_length=64)] | None = None
    warning: Annotated[str, Field(max_length=4000)] | None = None


class ActorPlaced(ReportBase):
    """Where a deployer put the actor of a command (Oakestra: scheduled on a cluster, running on a node, restarted):
    news for the project's event stream that never moves a project."""

    kind: Literal["actor.placed"] = "actor.placed"
    actor: Annotated[str, Field(max_length=256)]
    what: Literal["scheduled", "placed", "running", "restarted"]
    message: Annotated[str, Field(max_length=4000)]
    cluster: Annotated[str, Field(max_length=256)] | None = None
    node: Annotated[str, Field(max_length=256)] | None = None


WorkerReport = Annotated[
    BuildStarted
    | BuildSucceeded
    | BuildFailed
    | LearnerReady
    | LearnerFailed
    | AggregatorStarted
    | RoundCompleted
    | TrainingSucceeded
    | TrainingFailed
    | ModelBuilt
    | ModelServed
    | ModelFailed
    | CommandFailed
    | TrackingLogged
    | ActorPlaced,
    Field(discriminator="kind"),
]


# --- agents ------------------------------------------------------------------------------------------

AgentRole = Literal["learner", "builder", "aggregator", "serve"]


class AgentStatus(Message):
    agent_id: Id
    online: bool
    roles: list[AgentRole] = []
    data_tags: dict[str, int] = {}
    cluster: str | None = None
    platform: str = "linux/amd64"
    host: str = "127.0.0.1"
    data_server: str | None = None
    cpus: int | None = None
    memory_mb: int | None = None
    ts: float = Field(default_factory=now)


# --- manager -> agents -------------------------------------------------------------------------------

CommandKind = Literal["build", "run_learner", "run_aggregator", "build_model_image", "serve_model", "stop_project"]


class Command(Message):
    command_id: Id
    project_id: Id
    kind: CommandKind
    agent_id: Id
    spec: dict[str, Any] = {}
    source: str = "manager"
    ts: float = Field(default_factory=now)


class ReportAck(Message):
    """Manager -> agent: these reports are committed (handled, rejected or known duplicates); stop re-sending.
    With ``resend`` the manager has just heard the agent announce itself (its birth, or its retained status
    after the manager's own reconnect): re-send everything not acknowledged yet, now."""

    event_ids: Annotated[list[Id], Field(max_length=10_000)] = []
    resend: bool = False


class CommandReceipt(Message):
    """Agent -> manager: these commands are recorded on the agent; stop re-sending them."""

    command_ids: Annotated[list[Id], Field(min_length=1, max_length=10_000)]


# --- manager -> everyone -----------------------------------------------------------------------------


class ClusterProgress(Message):
    """Hierarchical mode: where one cluster is within the current cycle."""

    cycle: int = 0
    round: int = 0
    rounds: int = 0
    loss: float | None = None
    accuracy: float | None = None


class Progress(Message):
    round: int = 0
    rounds: int = 0
    loss: float | None = None
    accuracy: float | None = None
    # Hierarchical mode: root cycles completed (loss and accuracy above are the global model's), and each
    # cluster's rounds.
    cycle: int = 0
    cycles: int = 0
    clusters: dict[str, ClusterProgress] = {}

    @model_serializer(mode="wrap")
    def _classic_stays_flat(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # A classic project's progress shows no hierarchical fields.
        data: dict[str, Any] = handler(self)
        if not self.cycles:
            for key in ("cycle", "cycles", "clusters"):
                data.pop(key, None)
        return data


class ProjectState(Message):
    project_id: str
    stage: Stage
    outcome: Outcome | None = None
    reason: str | None = None
    failed_stage: Stage | None = None
    stage_timestamps: dict[str, float] = {}
    deadline_at: float | None = None
    progress: Progress = Progress()
    model_url: str | None = None
    # Bearer token of the inference server at model_url (the state is readable by its customer only).
    model_token: str | None = None
    customer: str | None = None
    # MLflow tracking, when on: url, experiment, experiment_id, run_ids (round -> run id), run_id and model of
    # the best round, registered_model + model_version, warnings.
    tracking: dict[str, Any] | None = None
    seq: int = 0
    updated_at: float = Field(default_factory=now)


EventKind = Literal["project.created", "stage.changed", "round.completed", "report.accepted", "warning", "rejected"]


class ProjectEvent(Message):
    project_id: str
    seq: int
    kind: EventKind
    stage: Stage | None = None
    message: str = ""
    data: dict[str, Any] = {}
    ts: float = Field(default_factory=now)


class ErrorEvent(Message):
    """A rejected message the manager cannot attribute to a project or request."""

    topic: str
    reason: str
    ts: float = Field(default_factory=now)


# --- decoding ----------------------------------------------------------------------------------------

_REPORT = TypeAdapter(WorkerReport)


def decode_report(payload: bytes) -> ReportBase:
    return _REPORT.validate_json(payload)


def field_errors(exc: ValidationError) -> list[FieldError]:
    """Pydantic's errors as (dotted field path, message) pairs a user can act on."""
    out = []
    for err in exc.errors(include_url=False):
        path = ".".join(str(p) for p in err["loc"]) or "(message)"
        out.append(FieldError(field=path, message=err["msg"]))
    return out


def describe(exc: ValidationError) -> str:
    return "; ".join(f"{e.field}: {e.message}" for e in field_errors(exc))


# --- raw payloads ------------------------------------------------------------------------------------

MAX_DEPTH = 32
"""How deep a request's JSON may nest (an SLA needs 4 levels); deeper is refused before it is parsed."""
PEEK_BYTES = 4096
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')
_REQUEST_ID = re.compile(rb'"request_id"\s*:\s*"([A-Za-z0-9_.:\-]{1,128})"')


def too_deep(payload: bytes, limit: int = MAX_DEPTH) -> FieldError | None:
    """A field error when the JSON in ``payload`` nests deeper than ``limit``, else None.

    A scan of the raw bytes (strings skipped, brackets counted), so a payload that would exhaust a
    recursive parser is measured without parsing it. The field is the top-level key the nesting is under.
    """
    depth = 0
    key: bytes | None = None
    for match in _TOKENS.finditer(payload):
        token = match.group()
        if token[:1] == b'"':
            if depth == 1:
                key = token
        elif token in (b"[", b"{"):
            depth += 1
            if depth > limit:
                return FieldError(field=_key_name(key), message=f"nested deeper than {limit} levels")
        else:
            depth -= 1
    return None


def _key_name(token: bytes | None) -> str:
    try:
        name = json.loads(token) if token else None
    except ValueError:
        name = None
    return name if isinstance(name, str) and name else "payload"


def peek_request_id(payload: bytes) -> str | None:
    """The ``request_id`` of a request that cannot be read in full (invalid, too deep, too large), found
    in its first :data:`PEEK_BYTES`, so the refusal still reaches its sender's reply topic."""
    match = _REQUEST_ID.search(payload[:PEEK_BYTES])
    return match.group(1).decode() if match else None
