"""What each endpoint does, as blocking functions returning an :class:`Answer` (status and JSON body).

Each request that reaches the broker opens one short-lived :class:`flops.client.Client` with the asking
customer's broker identity, as ``flops project submit`` does. An expected refusal (bad SLA, not an admin,
too few agents) is an answer with a 4xx status and a message, never an exception; broken infrastructure
(broker down, no reply from the manager) is a 5xx answer naming what did not answer.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from pydantic import ValidationError

from flops.api.original import ORIGINAL_DEFAULT_CUSTOMER, MockDataSLA
from flops.api.tokens import Principal, Tokens
from flops.client import Client
from flops.errors import BrokerUnavailable, FlopsError, PublishFailed, TimedOut
from flops.messages import FieldError, ProjectRequest, field_errors, new_id, too_deep
from flops.redact import redact
from flops.retention import cleared_state
from flops.settings import BrokerAddress
from flops.sla import ProjectSLA

log = structlog.get_logger(__name__)

PROJECT_STARTED = "New FLOps project started successfully"
MOCK_STARTED = "New Mock-Data-Provider started successfully"
DATABASE_RESET = "Successfully reset the database."
PRUNE_BATCH = 1000


@dataclass(frozen=True)
class ApiConfig:
    """What the endpoints need, built by ``flops api`` from the settings."""

    address: BrokerAddress
    tls_files: dict[str, str | None]
    tokens: Tokens
    store_path: Path
    sqlite_synchronous: str = "FULL"
    tracking_uri: str | None = None
    agent_dirs: tuple[Path, ...] = ()
    data_ca_file: Path | None = None
    reply_timeout_s: float = 15.0
    max_payload_bytes: int = 256 * 1024


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any] = field(default_factory=dict)


def refused(status: int, message: str, errors: list[FieldError] | None = None) -> Answer:
    body: dict[str, Any] = {"message": message}
    if errors is not None:
        body["errors"] = [{"field": e.field, "message": e.message} for e in errors]
    return Answer(status, body)


def parse_json(raw: bytes) -> tuple[Any, Answer | None]:
    """The body as JSON, or a 422/400 answer (too deeply nested, not JSON)."""
    deep = too_deep(raw)
    if deep is not None:
        return None, refused(422, "invalid request", [deep])
    try:
        return json.loads(raw), None
    except ValueError as exc:
        return None, refused(400, f"the body is not JSON: {exc}", [FieldError(field="(body)", message=str(exc))])


def customer_named(principal: Principal, named: str | None) -> str | None:
    """The customer a request names: the token's own for nothing or the original default ``Admin``; another one
    only for administrators. None: not allowed."""
    if named in (None, ORIGINAL_DEFAULT_CUSTOMER, principal.customer):
        return principal.customer
    return named if principal.admin else None


def _client(config: ApiConfig, principal: Principal) -> Client:
    return Client(principal.address(config.address), **principal.tls_files(config.tls_files))


def _unavailable(exc: FlopsError) -> Answer:
    """Broken infrastructure as an answer: the broker (503) or the manager (504) did not answer."""
    status = 504 if isinstance(exc, TimedOut) else 503 if isinstance(exc, BrokerUnavailable) else 502
    return refused(status, str(exc))


# --- POST /api/flops/projects --------------------------------------------------------------------------


def submit_project(config: ApiConfig, principal: Principal, raw: bytes) -> Answer:
    """Validate the original project SLA here (field errors, nothing sent), then submit it as the customer."""
    body, bad = parse_json(raw)
    if bad is not None:
        return bad
    if isinstance(body, dict):
        named = body.get("customerID", body.get("customer_id"))
        if isinstance(named, str) and customer_named(principal, named) != principal.customer:
            message = (
                f"must be your customer name {principal.customer!r} (the token's), or {ORIGINAL_DEFAULT_CUSTOMER!r}"
            )
            return refused(422, "invalid project SLA", [FieldError(field="customerID", message=message)])
        body = {k: v for k, v in body.items() if k not in ("customerID", "customer_id")}
        body["customerID"] = principal.customer
    try:
        sla = ProjectSLA.model_validate(body)
    except ValidationError as exc:
        return refused(422, "invalid project SLA", field_errors(exc))
    request = ProjectRequest(request_id=new_id("r"), sla=sla)
    size = len(request.to_bytes())
    if size > config.max_payload_bytes:
        error = FieldError(field="(body)", message=f"request of {size} bytes exceeds {config.max_payload_bytes}")
        return refused(413, "project SLA too large", [error])
    try:
        with _client(config, principal) as client:
            reply = client.send(request, timeout=config.reply_timeout_s)
    except FlopsError as exc:
        return _unavailable(exc)
    if reply.errors:
        # The manager validates the request envelope: its fields are "sla.<field>"; ours name the body's.
        errors = [FieldError(field=e.field.removeprefix("sla."), message=e.message) for e in reply.errors]
        return refused(422, "project refused by the manager", errors)
    log.info("api.project_submitted", customer=principal.customer, project_id=reply.project_id)
    return Answer(200, {"message": PROJECT_STARTED, "project_id": reply.project_id})


# --- POST /api/flops/mocks -----------------------------------------------------------------------------


def push_mock_data(config: ApiConfig, principal: Principal, raw: bytes) -> Answer:
    """The original mock data provider, done by ``flops data mock``: split a bundled dataset into IID
    partitions and push one to each of the first N online learner agents (administrators only: it writes to
    the nodes with their data admin tokens, under a tag every customer's projects may read)."""
    from flops.data.client import DataError
    from flops.data.ops import mock
    from flops.data.server import is_valid_tag

    if not principal.admin:
        return refused(403, f"only administrators may push mock data (customer {principal.customer!r} is not one)")
    body, bad = parse_json(raw)
    if bad is not None:
        return bad
    try:
        sla = MockDataSLA.model_validate(body)
    except ValidationError as exc:
        return refused(422, "invalid mock-data SLA", field_errors(exc))
    conf = sla.mock_data_configuration
    dataset = conf.bundled()
    if dataset is None:
        message = (
            f"unknown dataset {conf.dataset_name!r}: nothing is downloaded; bundled: digits (mnist stands in as digits)"
        )
        return refused(
            422, "invalid mock-data SLA", [FieldError(field="mock_data_configuration.dataset_name", message=message)]
        )
    if not is_valid_tag(conf.tag):
        message = f"invalid data tag {conf.tag!r} (allowed: letters, digits, '_' and '-')"
        return refused(
            422, "invalid mock-data SLA", [FieldError(field="mock_data_configuration.data_tag", message=message)]
        )
    try:
        with _client(config, principal) as client:
            statuses = client.agents(timeout=config.reply_timeout_s)
    except FlopsError as exc:
        return _unavailable(exc)
    tokens = data_tokens(config.agent_dirs)
    learners = sorted(
        (a for a in statuses if a.online and "learner" in a.roles and a.data_server and a.agent_id in tokens),
        key=lambda a: a.agent_id,
    )
    wanted = conf.number_of_partitions
    if len(learners) < wanted:
        found = ", ".join(a.agent_id for a in learners) or "none"
        message = (
            f"{wanted} partitions need {wanted} online learner agents whose data admin token the API holds "
            f"(FLOPS_API_AGENT_DIRS); found {len(learners)}: {found}"
        )
        return refused(
            409,
            "not enough learner agents",
            [FieldError(field="mock_data_configuration.number_of_partitions", message=message)],
        )
    targets = learners[:wanted]
    try:
        pushed = mock(
            dataset,
            wanted,
            conf.tag,
            [a.data_server for a in targets if a.data_server],
            tokens=[tokens[a.agent_id] for a in targets],
            ca_file=config.data_ca_file,
        )
    except (ValueError, OSError, DataError) as exc:
        return refused(502, f"cannot push {dataset}: {exc}")
    partitions = [
        {"agent_id": a.agent_id, "rows": row["rows"], "file": row["file"]}
        for a, row in zip(targets, pushed, strict=True)
    ]
    stand_in = f" (standing in for {conf.dataset_name})" if dataset != conf.dataset_name else ""
    detail = f"pushed {wanted} IID partitions of {dataset}{stand_in} tagged {conf.tag} to " + ", ".join(
        a.agent_id for a in targets
    )
    log.info("api.mock_pushed", customer=principal.customer, dataset=dataset, tag=conf.tag, partitions=wanted)
    return Answer(
        200,
        {"message": MOCK_STARTED, "detail": detail, "dataset": dataset, "data_tag": conf.tag, "partitions": partitions},
    )


def data_tokens(agent_dirs: tuple[Path, ...]) -> dict[str, str]:
    """Agent id -> data admin token, from each agent directory's ``state/`` (as ``flops data --agent-dir``)."""
    from flops.data.server import ADMIN_TOKEN_FILE

    found: dict[str, str] = {}
    for directory in agent_dirs:
        state = directory / "state"
        try:
            agent_id = str(json.loads((state / "data-server.json").read_text())["agent_id"])
            found[agent_id] = (state / ADMIN_TOKEN_FILE).read_text().strip()
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found


# --- GET /api/flops/tracking ---------------------------------------------------------------------------


def tracking_url(config: ApiConfig, principal: Principal, named: str | None) -> Answer:
    """The MLflow tracking server every project of this FLOps logs to (one for all customers)."""
    if customer_named(principal, named) is None:
        return refused(403, f"customer {principal.customer!r} may ask only for its own tracking server, not {named!r}")
    if not config.tracking_uri:
        return refused(404, "tracking is off: this FLOps has no MLflow tracking server (FLOPS_TRACKING_URI)")
    return Answer(200, {"tracking_server_url": redact(config.tracking_uri)})


# --- DELETE /api/flops/database ------------------------------------------------------------------------


def reset_database(config: ApiConfig, principal: Principal) -> Answer:
    """Forget every finished project whose model is not served (administrators only): delete it from the
    manager's store (with its transitions and seen ids) and clear its retained state on the broker.

    Running projects, projects whose model server runs, and cached build artifacts are kept. Like ``flops
    project prune --older-than 0``, on the manager's store (``FLOPS_DATA_DIR``), with the API's own broker
    identity for the cleared states (the manager's, where a production ACL is in force)."""
    from flops.store_sqlite import SQLiteStore

    if not principal.admin:
        return refused(
            403, f"only administrators may reset the FLOps database (customer {principal.customer!r} is not one)"
        )
    if not config.store_path.is_file():
        return refused(
            503, f"no manager store at {config.store_path}: run flops api beside the manager (FLOPS_DATA_DIR)"
        )
    before = time.time()
    forgotten: list[str] = []
    try:
        # Connected first: when the broker is out of reach nothing is forgotten.
        with Client(config.address, **config.tls_files) as client:
            store = SQLiteStore(config.store_path, config.sqlite_synchronous)
            try:
                while True:
                    with store.batch():
                        pruned = store.prune(before, limit=PRUNE_BATCH)
                        with store.unit() as unit:
                            items = unit.enqueue(
                                [cleared_state(p.customer, p.project_id) for p in pruned if p.customer]
                            )
                    forgotten += [p.project_id for p in pruned]
                    for item in items:
                        client.bus.publish_wait(item.topic, item.payload, retain=item.retain)
                    store.sent(items)
                    if len(pruned) < PRUNE_BATCH:
                        break
            finally:
                store.close()
    except PublishFailed as exc:
        # Committed with the store's outbox: the manager clears the states at its next start.
        return refused(502, f"forgot {len(forgotten)} projects, but clearing a retained state failed: {exc}")
    except FlopsError as exc:
        return _unavailable(exc)
    log.info("api.database_reset", customer=principal.customer, projects=len(forgotten))
    return Answer(
        200,
        {
            "message": DATABASE_RESET,
            "forgotten_projects": forgotten,
            "kept": "running projects, projects whose model is served, cached build artifacts",
        },
    )
