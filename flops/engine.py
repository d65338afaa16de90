"""The manager's event engine: turns one inbound message into one committed unit of work.

No MQTT here: the engine takes decoded input, runs the lifecycle machine and the stage hooks, and writes
the project, the dedup record, the transition log and the outgoing messages (outbox) in one store unit.
The service (:mod:`flops.manager`) feeds it from the bus and publishes what it returns.
"""

from __future__ import annotations

import heapq
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from pydantic import ValidationError

from flops import retention, topics
from flops.agents import AgentRegistry
from flops.hooks import Decision, Internal, StageHooks
from flops.lifecycle import EDGES, Lifecycle, Project
from flops.lifecycle_stages import Outcome, Stage
from flops.messages import (
    ActorPlaced,
    AgentStatus,
    CancelRequest,
    Command,
    CommandKind,
    ErrorEvent,
    FieldError,
    ModelFailed,
    ModelServed,
    Progress,
    ProjectEvent,
    ProjectRequest,
    ProjectState,
    Reply,
    ReportBase,
    TrackingLogged,
    decode_report,
    describe,
    field_errors,
    new_id,
    peek_request_id,
    too_deep,
)
from flops.provisioning import AgentPolicy
from flops.redact import redact, redact_values
from flops.settings import Settings
from flops.sla import ProjectSLA
from flops.store import OutboxItem, ProjectRecord, Store, Transition, Unit
from flops.tracking import project as tracking
from stages import hooks_by_stage

log = structlog.get_logger(__name__)

_OUTCOMES = {e.trigger: e.outcome for e in EDGES if e.outcome is not None}


@dataclass
class Result:
    """What one handled message produced: the outcome and the messages to publish after the commit."""

    verdict: str
    reason: str = ""
    project_id: str | None = None
    outbox: list[OutboxItem] = field(default_factory=list)
    # The report id to acknowledge to its agent once this result is committed (whatever the verdict).
    ack: str | None = None


class _Effects:
    """Side effects gathered while one event is handled; the StageContext the hooks see."""

    def __init__(self, engine: Engine, unit: Unit) -> None:
        self.engine = engine
        self.unit = unit
        self.settings = engine.settings
        self.agents = engine.agents
        self.items: list[OutboxItem] = []
        # Replies go out after the retained state they announce, so a client that reads the state right after
        # its reply (the broker handles one publisher in order) never finds it missing or stale.
        self.replies: list[OutboxItem] = []
        self.touched: dict[str, Project] = {}
        self.resolves: list[Project] = []

    # StageContext
    def command(self, project: Project, agent_id: str, kind: CommandKind, spec: dict[str, Any]) -> str:
        counter = project.ctx.get("commands", 0) + 1
        project.ctx["commands"] = counter
        # Unguessable: a report must name a command that was really sent (and come from its agent).
        command_id = f"{project.project_id}.{counter}.{kind}.{secrets.token_hex(6)}"
        agents = project.ctx.setdefault("agents", [])
        if agent_id not in agents:
            agents.append(agent_id)
        project.ctx.setdefault("sent_to", {})[command_id] = agent_id
        if kind != "build":
            # Only the builder clones: a token in the repo URL never reaches other agents.
            spec = redact_values(spec)
        cmd = Command(command_id=command_id, project_id=project.project_id, kind=kind, agent_id=agent_id, spec=spec)
        self.items.append(OutboxItem(f"cmd:{command_id}", topics.agent_commands(agent_id), cmd.to_bytes()))
        self.event(
            project,
            "report.accepted",
            f"{kind} sent to {agent_id}",
            command_id=command_id,
            command=kind,
            agent_id=agent_id,
        )
        return command_id

    def event(self, project: Project, kind: str, message: str, **data: Any) -> None:
        project.record.seq += 1
        ev = ProjectEvent(
            project_id=project.project_id,
            seq=project.record.seq,
            kind=kind,  # type: ignore[arg-type]
            stage=project.stage,
            message=redact(message),
            data={k: redact_values(v) for k, v in data.items() if v is not None},
            ts=self.engine.clock(),
        )
        self.items.append(
            OutboxItem(
                f"ev:{project.project_id}:{ev.seq}",
                topics.project_events(project.sla.customerID, project.project_id),
                ev.to_bytes(),
            )
        )
        self.touched[project.project_id] = project

    def get_artifact(self, key: str) -> dict[str, Any] | None:
        return self.unit.get_artifact(key)

    def put_artifact(self, key: str, artifact: dict[str, Any]) -> None:
        self.unit.put_artifact(key, artifact)

    def resolve_commit(self, project: Project) -> None:
        self.resolves.append(project)

    def now(self) -> float:
        return self.engine.clock()

    def ports_in_use(self, agent_id: str) -> set[int]:
        return set(self.engine.ports.get(agent_id, {}).values())


class Engine:
    """All projects' machines plus the rules for turning messages into committed transitions."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        resolver: Callable[[str, str, str | None], None] | None = None,
        policy: AgentPolicy | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.resolver = resolver
        # Provisioned agents and their roles (production); None accepts any agent (development).
        self.policy = policy
        self.lifecycle = Lifecycle()
        self.agents = AgentRegistry(max_agents=settings.max_agents)
        self.hooks: dict[Stage, StageHooks] = hooks_by_stage()
        # Aggregator ports unfinished projects hold, by agent: {agent_id: {project_id: port}}.
        self.ports: dict[str, dict[str, int]] = {}
        # Agents whose liveness is in doubt (a last will, or a fresh broker session), since when. A will is a
        # hint: a broker stopping gracefully publishes every client's will at once. An agent that has not
        # announced itself again within ``agent_grace_s`` is gone for its projects.
        self.suspects: dict[str, float] = {}
        # (deadline_at, project_id), pushed whenever a deadline is set; an entry whose project finished or
        # got another deadline since is skipped when popped. A check costs O(due), not O(live projects).
        self._deadlines: list[tuple[float, str]] = []

    # --- boot ------------------------------------------------------------------------------------

    def boot(self) -> list[OutboxItem]:
        """Put every unfinished project back into the machine; returns the outbox still to publish."""
        records = self.store.unfinished()
        for record in records:
            self._load(record)
        for record in records:
            project = self.lifecycle.projects[record.project_id]
            hooks = self.hooks[project.stage]
            self._in_unit(project, None, lambda p, fx, h=hooks: h.on_resume(p, fx))
        log.info("projects resumed", count=len(records))
        return self.store.outbox()

    def _track_port(self, project: Project) -> None:
        aggregator = project.ctx.get("aggregator")
        if not aggregator:
            return
        # The root's port, and in hierarchical mode each cluster aggregator's (keyed project/cluster).
        seats = {project.project_id: aggregator}
        seats.update({f"{project.project_id}/{c}": seat for c, seat in project.ctx.get("clusters", {}).items()})
        for key, seat in seats.items():
            held = self.ports.setdefault(seat["agent_id"], {})
            if project.stage is Stage.FINISHED:
                held.pop(key, None)
            else:
                held[key] = int(seat["port"])

    def reload_all(self) -> None:
        """Forget the in-memory machines and rebuild them from the store (after a rolled-back batch)."""
        for project_id in list(self.lifecycle.projects):
            self.lifecycle.remove(project_id)
        self.ports.clear()
        self._deadlines.clear()
        for record in self.store.unfinished():
            self._load(record)

    def _load(self, record: ProjectRecord) -> Project:
        project = Project(record=record, sla=ProjectSLA.model_validate(record.sla), on_change=self._on_change)
        self._track_port(project)
        self._push_deadline(record)
        return self.lifecycle.add(project)

    def _push_deadline(self, record: ProjectRecord) -> None:
        if record.deadline_at is None:
            return
        heapq.heappush(self._deadlines, (record.deadline_at, record.project_id))
        if len(self._deadlines) > 4 * len(self.lifecycle.projects) + 1024:
            # Mostly superseded entries: rebuild from the live deadlines (amortised O(1) per push).
            live = self.lifecycle.projects.values()
            self._deadlines = [(p.record.deadline_at, p.project_id) for p in live if p.record.deadline_at is not None]
            if record.project_id not in self.lifecycle.projects:
                self._deadlines.append((record.deadline_at, record.project_id))
            heapq.heapify(self._deadlines)

    # --- inputs ----------------------------------------------------------------------------------

    def request(self, customer: str, payload: bytes, reply_to: str | None) -> Result:
        """A project request on ``customers/{customer}/requests``: validate, create, reply (or field errors).

        The customer is the topic's (the ACL binds it to the MQTT username), never the payload's: the SLA's
        ``customerID`` is filled from it, and one naming someone else is refused. Request ids are per customer.
        """
        reply_to = self._own_reply_topic(customer, reply_to)
        deep = too_deep(payload)
        if deep is not None:
            return self.refuse(customer, payload, reply_to, [deep], f"invalid request: {deep.field}: {deep.message}")
        try:
            request = ProjectRequest.model_validate_json(payload)
        except ValidationError as exc:
            return self.refuse(customer, payload, reply_to, field_errors(exc), f"invalid request: {describe(exc)}")
        if "customerID" not in request.sla.model_fields_set:
            request = request.model_copy(update={"sla": request.sla.model_copy(update={"customerID": customer})})
        elif request.sla.customerID != customer:
            error = FieldError(field="sla.customerID", message=f"must be your user name {customer!r}")
            return self.refuse(customer, payload, reply_to, [error], "customerID names another customer")
        topic = reply_to or topics.request_reply(customer, request.request_id)
        dedup = f"req:{customer}:{request.request_id}"
        with self.store.unit() as unit:
            existing = unit.seen(dedup)
            stored = unit.get(existing) if existing is not None else None
            if stored is not None and stored.sla != request.sla.model_dump(mode="json", by_alias=True):
                reason = f"request id {request.request_id} was already used for project {existing} with another SLA"
                reply = Reply(request_id=request.request_id, errors=[FieldError(field="request_id", message=reason)])
                items = unit.enqueue([OutboxItem(f"reply:{new_id('r')}", topic, reply.to_bytes())])
                return Result("reject", reason, existing, items)
            if existing is not None:
                reply = Reply(request_id=request.request_id, project_id=existing, duplicate=True)
                items = unit.enqueue([OutboxItem(f"reply:{request.request_id}", topic, reply.to_bytes())])
                return Result("ignore", "duplicate request", existing, items)
        project_id = new_id("p")
        now = self.clock()
        record = ProjectRecord(
            project_id=project_id,
            stage=Stage.PREPARATION,
            sla=request.sla.model_dump(mode="json", by_alias=True),
            created_at=now,
            stage_entered_at=now,
            timestamps={f"{Stage.PREPARATION.value}_at": now},
            request_id=request.request_id,
        )
        record.deadline_at = now + self._deadline(request.sla, Stage.PREPARATION)
        project = self._load(record)
        reply = Reply(request_id=request.request_id, project_id=project_id)

        def create(p: Project, fx: _Effects) -> Decision | None:
            fx.unit.insert(p.record)
            fx.unit.mark_seen(dedup, project_id, project_id)
            fx.replies.append(OutboxItem(f"reply:{request.request_id}", topic, reply.to_bytes()))
            fx.event(p, "project.created", f"project created for {p.sla.customerID}", request_id=request.request_id)
            fx.unit.log_transition(Transition(project_id, None, Stage.PREPARATION, "create", dedup, now))
            return self.hooks[Stage.PREPARATION].on_enter(p, fx)

        result = self._in_unit(project, None, create, created=True)
        result.project_id = project_id
        return result

    def refuse(
        self, customer: str, payload: bytes, reply_to: str | None, errors: list[FieldError], reason: str
    ) -> Result:
        """A request refused before it could be read: field errors on its reply topic (the MQTT 5 response
        topic, else the one its request id names), or on the error topic when neither is known."""
        reply_to = self._own_reply_topic(customer, reply_to)
        request_id = peek_request_id(payload)
        topic = reply_to or (topics.request_reply(customer, request_id) if request_id else None)
        if topic is None:
            return self.error(topics.requests(customer), reason)
        reply = Reply(request_id=request_id or "?", errors=errors)
        with self.store.unit() as unit:
            items = unit.enqueue([OutboxItem(f"reply:{new_id('r')}", topic, reply.to_bytes())])
        log.warning("request refused", request_id=request_id, reason=reason)
        return Result("reject", reason, outbox=items)

    def cancel(self, customer: str, project_id: str, payload: bytes, reply_to: str | None) -> Result:
        """A cancel on ``customers/{customer}/projects/{project_id}/cancel``: only for that customer's projects
        (another customer's project is as unknown as one that never existed)."""
        reply_to = self._own_reply_topic(customer, reply_to)
        try:
            request = CancelRequest.model_validate_json(payload)
        except ValidationError as exc:
            return self.error(topics.project_cancel(customer, project_id), f"invalid cancel request: {describe(exc)}")
        project = self.lifecycle.projects.get(project_id)
        if project is not None and project.sla.customerID != customer:
            project = None
        topic = reply_to or topics.request_reply(customer, request.request_id)
        if project is None:
            known = self.store.get(project_id)
            if known is not None and known.customer != customer:
                known = None
            if known is not None and known.ctx.get("model_url"):
                return self._undeploy(known, request, topic)
            reason = f"project {project_id} is already finished" if known else f"unknown project {project_id}"
            reply = Reply(request_id=request.request_id, errors=[FieldError(field="project_id", message=reason)])
            with self.store.unit() as unit:
                items = unit.enqueue([OutboxItem(f"reply:{request.request_id}", topic, reply.to_bytes())])
            return Result("reject", reason, project_id, items)

        def do(p: Project, fx: _Effects) -> Decision | None:
            fx.replies.append(
                OutboxItem(
                    f"reply:{request.request_id}",
                    topic,
                    Reply(request_id=request.request_id, project_id=project_id).to_bytes(),
                )
            )
            return Decision.accept("cancel", reason=request.reason)

        return self._in_unit(project, f"cancel:{customer}:{request.request_id}", do)

    def _undeploy(self, record: ProjectRecord, request: CancelRequest, topic: str) -> Result:
        """Cancel on a completed project whose model is served: stop the inference server."""
        dedup = f"cancel:{record.customer}:{request.request_id}"
        project = Project(record=record, sla=ProjectSLA.model_validate(record.sla))
        project.stage = record.stage
        with self.store.unit() as unit:
            if unit.seen(dedup) is not None:
                return Result("ignore", "duplicate", record.project_id)
            fx = _Effects(self, unit)
            url = record.ctx.pop("model_url")
            serving = [record.ctx["serve_agent"]] if record.ctx.get("serve_agent") else record.ctx.get("agents", [])
            for agent_id in sorted(serving):
                fx.command(project, agent_id, "stop_project", {"keep": []})
            fx.event(project, "warning", f"inference server at {url} stopped: {request.reason}")
            fx.items.append(self._state_item(record))
            fx.items.append(
                OutboxItem(
                    f"reply:{request.request_id}",
                    topic,
                    Reply(request_id=request.request_id, project_id=record.project_id).to_bytes(),
                )
            )
            unit.mark_seen(dedup, record.project_id, "accept")
            unit.update(record, Stage.FINISHED)
            items = unit.enqueue(fx.items)
        log.info("model server stopped", project_id=record.project_id, url=url)
        return Result("accept", "model server stopped", record.project_id, items)

    def report(self, agent_id: str, payload: bytes) -> Result:
        """A report on ``agents/{agent_id}/reports`` (the agent's own or its children's)."""
        try:
            report = decode_report(payload)
        except ValidationError as exc:
            return self.error(topics.agent_reports(agent_id), f"invalid report: {describe(exc)}")
        result = self._report(agent_id, report)
        result.ack = report.event_id
        return result

    def _report(self, agent_id: str, report: ReportBase) -> Result:
        project_id = report.project_id
        project = self.lifecycle.projects.get(project_id)
        record = project.record if project is not None else self.store.get(project_id)
        if record is None:
            return self.error(topics.agent_reports(agent_id), f"unknown project {project_id}")
        if record.ctx.get("sent_to", {}).get(report.command_id or "") != agent_id:
            # Not from the agent the named command went to: forged, replayed or misrouted. Refused on the error
            # topic; the project (its stage, its event stream, its dedup ids) stays as it was.
            reason = f"{report.kind} for project {project_id} from agent {agent_id}, which was sent no such command"
            return self.error(topics.agent_reports(agent_id), reason)
        if project is None:
            if isinstance(report, ActorPlaced):  # an actor scheduled as its project ended: no news any more
                return Result("ignore", f"placement of {report.actor} after project {project_id} finished")
            if isinstance(report, ModelServed | ModelFailed) and report.command_id == record.ctx.get(
                "serve_command_id"
            ):
                return self._served_model(record, report)
            return self.reject_for(
                project_id,
                f"{report.kind} {report.event_id} for finished project {project_id}",
                seen_check=report,
            )

        def do(p: Project, fx: _Effects) -> Decision | None:
            if isinstance(report, TrackingLogged):
                return tracking.note(p, report, fx)  # in whatever stage: tracking never moves a project
            if isinstance(report, ActorPlaced):  # in whatever stage too: where an actor runs is news, not progress
                fx.event(
                    p, "report.accepted", report.message, actor=report.actor, cluster=report.cluster, node=report.node
                )
                return Decision.accept()
            return self.hooks[p.stage].on_report(p, report, fx)

        return self._in_unit(project, report.event_id, do)

    def agent_status(self, agent_id: str, payload: bytes) -> Result:
        """A retained status on ``agents/{agent_id}/status``: birth, capabilities, or a last will (a hint)."""
        topic = topics.agent_status(agent_id)
        try:
            status = AgentStatus.model_validate_json(payload)
        except ValidationError as exc:
            return self.error(topic, f"invalid agent status: {describe(exc)}")
        if status.agent_id != agent_id:
            return self.error(topic, f"status names agent {status.agent_id} on agent {agent_id}'s topic")
        refusal = self.policy.refusal(status) if self.policy is not None else None
        if refusal is not None:
            return self.error(topic, refusal)
        previous = self.agents.get(agent_id)
        if status.online and self.suspects.pop(agent_id, None) is not None:
            log.info("agent confirmed alive", agent_id=agent_id)
        if not status.online and (previous is None or not previous.online):
            # An offline status of an agent we never saw online changes nothing (and must not grow the registry).
            return Result("ignore", "agent already offline")
        registration = self.agents.update(status)
        if not registration.accepted:
            return self.error(topic, registration.refused or "refused")
        if registration.evicted:
            log.info("agent forgotten to make room", agent_id=registration.evicted)
        if previous is not None and previous.model_copy(update={"ts": 0}) == status.model_copy(update={"ts": 0}):
            return Result("ignore", "status unchanged")
        if not status.online:
            self.suspects.setdefault(agent_id, self.clock())
        return self._tell_projects(status, preparation_only=True)

    def _tell_projects(self, status: AgentStatus, *, preparation_only: bool) -> Result:
        """Let projects react to an agent's status: preparation re-checks its inventory; with
        ``preparation_only`` False, projects the agent takes part in learn that it is gone."""
        out = Result("accept")
        for project in list(self.lifecycle.projects.values()):
            hooks = self.hooks[project.stage]
            # The picked aggregator counts as involved before its command is sent (learners stage).
            involved = status.agent_id in project.ctx.get("agents", []) or status.agent_id == project.ctx.get(
                "aggregator", {}
            ).get("agent_id")
            if project.stage is Stage.PREPARATION:
                if not preparation_only:
                    continue
            elif preparation_only or not involved:
                continue
            result = self._in_unit(project, None, lambda p, fx, h=hooks: h.on_agent(p, status, fx))
            out.outbox.extend(result.outbox)
        return out

    def check_suspects(self) -> list[OutboxItem]:
        """Agents that stayed gone past the grace period: their projects learn it now."""
        now = self.clock()
        grace = self.settings.agent_grace_s
        items: list[OutboxItem] = []
        for agent_id, since in list(self.suspects.items()):
            if now - since < grace:
                continue
            del self.suspects[agent_id]
            status = self.agents.get(agent_id)
            if status is None:
                continue
            if status.online:
                # Announced online before a fresh broker session and never since: no liveness after reconnect.
                status = status.model_copy(update={"online": False, "data_server": None})
                self.agents.update(status)
            log.warning("agent gone", agent_id=agent_id, after_s=round(now - since, 1))
            items.extend(self._tell_projects(status, preparation_only=False).outbox)
        return items

    def fresh_session(self) -> None:
        """The broker lost our session (it restarted): every agent must announce itself again within the
        grace period, as it does on its own reconnect, or it counts as gone."""
        now = self.clock()
        for status in self.agents.online():
            self.suspects.setdefault(status.agent_id, now)
        # A will received before the broker went away: the grace restarts with the new session.
        for agent_id in self.suspects:
            self.suspects[agent_id] = now

    def retained_states(self) -> list[OutboxItem]:
        """The retained state of every stored project, to publish again on a fresh broker session."""
        return [self._state_item(record) for record in self.store.projects(limit=10**9)]

    def _served_model(self, record: ProjectRecord, report: ModelServed | ModelFailed) -> Result:
        """A finished project's model server came back (its agent restarted it) or is gone for good: the state
        tells the truth either way."""
        project_id = record.project_id
        with self.store.unit() as unit:
            if unit.seen(report.event_id) is not None:
                return Result("ignore", "duplicate", project_id)
            project = Project(record=record, sla=ProjectSLA.model_validate(record.sla))
            project.stage = record.stage
            fx = _Effects(self, unit)
            if isinstance(report, ModelServed):
                record.ctx["model_url"] = report.url
                fx.event(project, "report.accepted", f"inference server serving again at {report.url}")
            else:
                url = record.ctx.pop("model_url", None)
                fx.event(project, "warning", f"inference server at {url} is gone: {report.reason}")
            fx.items.append(self._state_item(record))
            unit.mark_seen(report.event_id, project_id, "accept")
            unit.update(record, Stage.FINISHED)
            items = unit.enqueue(fx.items)
        log.info("served model updated", project_id=project_id, kind=report.kind)
        return Result("accept", report.kind, project_id, items)

    def internal(self, event: Internal) -> Result:
        project = self.lifecycle.projects.get(event.project_id)
        if project is None:
            return Result("ignore", f"project {event.project_id} is not active")
        hooks = self.hooks[project.stage]
        return self._in_unit(project, None, lambda p, fx: hooks.on_internal(p, event, fx))

    def check_deadlines(self) -> list[OutboxItem]:
        """Fail every project whose current stage ran past its deadline."""
        now = self.clock()
        items: list[OutboxItem] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, project_id = heapq.heappop(self._deadlines)
            project = self.lifecycle.projects.get(project_id)
            if project is None or project.record.deadline_at != deadline:
                continue  # finished, or in another stage with another deadline, since this entry was pushed
            stage = project.stage
            seconds = self._deadline(project.sla, stage)
            reason = f"timed out in {stage.value} after {seconds:g} s"
            items.extend(
                self._in_unit(
                    project,
                    None,
                    lambda p, fx, s=stage, r=reason: Decision.accept("time_out", stage=s, now=now, reason=r),
                ).outbox
            )
        return items

    def prune(self, now: float | None = None, *, limit: int = 1000) -> list[OutboxItem]:
        """Forget up to ``limit`` projects finished more than ``retention_days`` ago (and artifacts unused
        as long); returns the committed outbox items that clear their retained states. Call it periodically."""
        before = (self.clock() if now is None else now) - self.settings.retention_days * retention.DAY_S
        pruned = retention.prune(self.store, before, limit=limit)
        if pruned.projects or pruned.artifacts:
            log.info("pruned", projects=len(pruned.projects), artifacts=len(pruned.artifacts))
        return pruned.outbox

    # --- the one place a unit of work happens ----------------------------------------------------

    def _in_unit(
        self,
        project: Project,
        message_id: str | None,
        handler: Callable[[Project, _Effects], Decision | None],
        *,
        created: bool = False,
    ) -> Result:
        expected = project.stage
        pid = project.project_id
        bound = log.bind(project_id=pid, event_id=message_id, stage=expected.value)
        try:
            with self.store.unit() as unit:
                if message_id is not None and unit.seen(message_id) is not None:
                    bound.info("duplicate ignored")
                    return Result("ignore", "duplicate", pid)
                fx = _Effects(self, unit)
                project.effects = fx
                decision = handler(project, fx) or Decision.accept()
                decision = self._apply(project, decision, fx)
                if message_id is not None:
                    unit.mark_seen(message_id, pid, decision.verdict)
                if decision.verdict == "reject":
                    fx.event(project, "rejected", decision.reason, event_id=message_id)
                if fx.touched or created:
                    fx.items.append(self._state_item(project.record))
                # Compare-and-set against the stage this event was read in (a new project: as inserted).
                unit.update(project.record, Stage.PREPARATION if created else expected)
                items = unit.enqueue(fx.items + fx.replies)
        except Exception:
            bound.exception("handling failed; project reloaded from the store")
            self._reload(pid)
            raise
        finally:
            project.effects = None
            project.follow_up = None
        for p in fx.resolves:
            if self.resolver is not None:
                self.resolver(p.project_id, p.sla.ml_repo_url, p.sla.ml_repo_commit)
        self._track_port(project)
        if project.stage is Stage.FINISHED:
            self.lifecycle.remove(pid)
        bound.info(
            "event handled",
            verdict=decision.verdict,
            reason=decision.reason or None,
            now_stage=project.stage.value,
        )
        return Result(decision.verdict, decision.reason, pid, items)

    def _apply(self, project: Project, decision: Decision, fx: _Effects) -> Decision:
        """Fire the decision's trigger, then every follow-up trigger that stage entries return."""
        current = decision
        while current.trigger is not None:
            if not self.lifecycle.fire(project, current.trigger, **current.data):
                if current.optional:
                    break
                if current is decision:
                    return Decision.reject(project.refusal or "refused")
                fx.event(project, "warning", f"follow-up {current.trigger} refused: {project.refusal}")
                break
            current, project.follow_up = project.follow_up, None
            if current is None:
                break
        return decision

    def _on_change(self, project: Project, source: Stage, dest: Stage, trigger: str, data: dict[str, Any]) -> None:
        """Bookkeeping after every transition: stamp, deadline, log, event; then enter the new stage."""
        fx: _Effects = project.effects
        now = self.clock()
        record = project.record
        record.stage = dest
        record.stage_entered_at = now
        record.timestamps[f"{dest.value}_at"] = now
        seconds = self._deadline(project.sla, dest)
        record.deadline_at = None if seconds is None else now + seconds
        self._push_deadline(record)
        if dest is Stage.FINISHED:
            record.outcome = _OUTCOMES[trigger]
            record.reason = redact(str(data.get("reason") or record.outcome.value))
            if record.outcome is Outcome.FAILED:
                record.failed_stage = source
                if source.value not in record.reason.split("\n", 1)[0]:
                    # The reason names the stage that failed, wherever it is shown without the state around it.
                    first, _, rest = record.reason.partition("\n")
                    record.reason = f"{first} (in {source.value})" + (f"\n{rest}" if rest else "")
        fx.unit.log_transition(Transition(project.project_id, source, dest, trigger, None, now))
        message = f"{source.value} -> {dest.value}"
        if dest is Stage.FINISHED:
            message += f": {record.outcome.value if record.outcome else ''} ({record.reason})"
        fx.event(project, "stage.changed", message, source=source.value, trigger=trigger)
        follow = self.hooks[dest].on_enter(project, fx)
        if follow is not None and follow.trigger is not None:
            project.follow_up = follow

    # --- helpers ---------------------------------------------------------------------------------

    def _deadline(self, sla: ProjectSLA, stage: Stage) -> float | None:
        return self.settings.deadlines.for_stage(stage, sla.deadlines)

    def _state_item(self, r: ProjectRecord) -> OutboxItem:
        progress = r.ctx.get("progress", {})
        state = ProjectState(
            project_id=r.project_id,
            stage=r.stage,
            outcome=r.outcome,
            reason=r.reason,
            failed_stage=r.failed_stage,
            stage_timestamps=r.timestamps,
            deadline_at=r.deadline_at,
            progress=Progress(**{k: v for k, v in progress.items() if k in Progress.model_fields}),
            model_url=r.ctx.get("model_url"),
            model_token=r.ctx.get("model_token") if r.ctx.get("model_url") else None,
            customer=r.customer,
            tracking=r.ctx.get("tracking"),
            seq=r.seq,
            updated_at=self.clock(),
        )
        topic = topics.project_state(r.customer, r.project_id)
        return OutboxItem(f"state:{r.project_id}", topic, state.to_bytes(), retain=True)

    def _reload(self, project_id: str) -> None:
        self.lifecycle.remove(project_id)
        record = self.store.get(project_id)
        if record is not None and record.stage is not Stage.FINISHED:
            self._load(record)

    def reject_for(
        self, project_id: str, reason: str, reply_to: str | None = None, seen_check: ReportBase | None = None
    ) -> Result:
        """A rejected message about a project: an event on its stream (it exists) or the error topic."""
        reason = redact(reason)
        live = self.lifecycle.projects.get(project_id)
        if live is not None:
            # Through the live record, so its event sequence (and outbox keys) stay unique.
            message_id = seen_check.event_id if seen_check is not None else None
            return self._in_unit(live, message_id, lambda p, fx: Decision.reject(reason))
        record = self.store.get(project_id)
        if record is None:
            return self.error(f"{topics.PREFIX}/projects/{project_id}", reason)
        with self.store.unit() as unit:
            if seen_check is not None and unit.seen(seen_check.event_id) is not None:
                return Result("ignore", "duplicate", project_id)
            record.seq += 1
            ev = ProjectEvent(
                project_id=project_id, seq=record.seq, kind="rejected", stage=record.stage, message=reason
            )
            unit.update(record, record.stage)
            if seen_check is not None:
                unit.mark_seen(seen_check.event_id, project_id, "reject")
            topic = topics.project_events(record.customer, project_id)
            items = [OutboxItem(f"ev:{project_id}:{record.seq}", topic, ev.to_bytes())]
            items = unit.enqueue(items)
        log.warning("message rejected", project_id=project_id, reason=reason)
        return Result("reject", reason, project_id, items)

    def _own_reply_topic(self, customer: str, reply_to: str | None) -> str | None:
        """The MQTT 5 response topic, if it points into the requester's own reply namespace; else None (the
        default reply topic is used), so a requester cannot make the manager publish anywhere else."""
        if reply_to is None:
            return None
        kind, _, owner = topics.parse(reply_to)
        if kind == "reply" and owner == customer:
            return reply_to
        log.warning("response topic outside the requester's namespace ignored", customer=customer, topic=reply_to)
        return None

    def error(self, topic: str, reason: str) -> Result:
        reason = redact(reason)
        log.warning("message rejected", topic=topic, reason=reason)
        ev = ErrorEvent(topic=topic, reason=reason, ts=self.clock())
        with self.store.unit() as unit:
            items = unit.enqueue([OutboxItem(f"err:{new_id('e')}", topics.errors(), ev.to_bytes())])
        return Result("reject", reason, None, items)
