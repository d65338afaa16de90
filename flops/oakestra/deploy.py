"""A FLOps project's actors (builder, aggregators, learners, model server) as Oakestra services, followed to an
outcome.

One project is one Oakestra application (named after the project id); each actor is one service. Services are
deployed one at a time and each instance is awaited until it shows on a cluster, because the System Manager loses
instances that are scheduled concurrently (contract L9). Clusters are chosen here, from the add-ons the active
clusters advertise, and sent as ``direct`` constraints: the only kind the current scheduler honours (L1). What
Oakestra would otherwise do forever (restart a failed service, hang in ``CLUSTER_SCHEDULED``) is cut short by the
deadlines of :class:`~flops.oakestra.watch.Timing`, and the service is deleted.

Synchronous and self-contained: a manager calls :meth:`Placement.deploy`, then :meth:`Placement.poll` from its own
loop (or :meth:`Placement.follow`), and :meth:`Placement.close` at the end. All waiting goes through a
:class:`Clock`, so tests run on virtual time.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from flops.errors import TimedOut
from flops.oakestra.client import ServiceRejected, ServiceSpec, SystemManager, SystemManagerError
from flops.oakestra.models import Application, Cluster, Service
from flops.oakestra.watch import ActorEvent, ActorState, EventKind, Phase, Timing, observe

log = structlog.get_logger(__name__)

__all__ = ["ActorEvent", "ActorSpec", "Clock", "EventKind", "Phase", "Placement", "SystemClock", "Timing"]


class Clock(Protocol):
    """Monotonic seconds and a way to wait; tests pass a virtual one."""

    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)  # between two polls of Oakestra, which has no event to wait on


@dataclass(frozen=True)
class ActorSpec:
    """One actor of a project as an Oakestra service. ``actor`` is the service name (unique in the project: the
    same name again would silently replace the service); ``addon`` is what its cluster must support
    (``image-builder``, ``FLOps-learner``); ``cluster`` names one outright; ``rr_ip`` is the service IP to ask for
    (where other services reach it; Oakestra may give another when that one is taken)."""

    project_id: str
    actor: str
    image: str
    cmd: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    memory: int = 1000  # MB
    vcpus: int = 1
    one_shot: bool = False
    addon: str | None = None
    cluster: str | None = None
    instances: int = 1
    rr_ip: str | None = None

    def service(self, cluster: str | None, namespace: str) -> ServiceSpec:
        return ServiceSpec(
            name=self.actor,
            image=self.image,
            cmd=tuple(self.cmd),
            environment=tuple(f"{k}={v}" for k, v in self.env.items()),
            memory=self.memory,
            vcpus=self.vcpus,
            one_shot=self.one_shot,
            cluster=cluster,
            addons=(self.addon,) if self.addon else (),
            namespace=namespace,
        )

    @classmethod
    def from_service(cls, project_id: str, service: Service) -> ActorSpec:
        """What an existing service runs, as far as its document tells (for a restarted manager)."""
        direct = next((c.get("cluster") for c in service.constraints if c.get("type") == "direct"), None)
        needs = next((c.get("needs") for c in service.constraints if c.get("type") == "addons"), None)
        return cls(
            project_id=project_id,
            actor=service.name,
            image=service.image,
            cmd=tuple(service.cmd),
            env=dict(e.split("=", 1) for e in service.environment if "=" in e),
            memory=service.memory,
            vcpus=service.vcpus,
            one_shot=service.one_shot,
            addon=str(needs[0]) if isinstance(needs, list) and needs else None,
            cluster=str(direct) if direct else None,
            instances=max(1, len(service.instances)),
            rr_ip=service.rr_ip,
        )


def application_name(project_id: str) -> str:
    """The Oakestra application name of a project: its id's letters and digits (``p-1f3a…`` → ``p1f3a…``), or a
    digest when that is over the 30 characters Oakestra allows. Deterministic, so a restarted manager finds it."""
    name = re.sub(r"[^a-zA-Z0-9]", "", project_id)
    if 0 < len(name) <= 30:
        return name
    return "f" + hashlib.sha256(project_id.encode()).hexdigest()[:29]


def choose_cluster(clusters: Sequence[Cluster], addon: str | None, vcpus: int, memory: int) -> Cluster | None:
    """An active cluster offering ``addon`` with room for ``vcpus`` and ``memory`` MB: the one with the most nodes
    offering the addon, then the most free memory (ties by name, so the choice is repeatable)."""
    fitting = [
        c
        for c in clusters
        if c.active and (addon is None or addon in c.supported_addons) and c.vcpus >= vcpus and c.memory >= memory
    ]
    if not fitting:
        return None
    return min(fitting, key=lambda c: (-(c.supported_addons.count(addon) if addon else 0), -c.memory, c.name))


class Placement:
    """One project's application on Oakestra and the actors deployed in it.

    ``actors`` holds each actor's last known state (:class:`~flops.oakestra.watch.ActorState`). Calls to the System
    Manager raise :class:`~flops.oakestra.client.SystemManagerError` when it is unreachable or answers what it should
    not; what Oakestra reports about the actors comes back as events.
    """

    def __init__(
        self,
        sm: SystemManager,
        project_id: str,
        *,
        timing: Timing | None = None,
        clock: Clock | None = None,
        namespace: str = "flops",
    ) -> None:
        self.sm = sm
        self.project_id = project_id
        self.timing = timing or Timing()
        self.clock = clock or SystemClock()
        self.namespace = namespace
        self.name = application_name(project_id)
        self.application: Application | None = None
        self.actors: dict[str, ActorState] = {}
        self._clusters: dict[str, str] = {}  # cluster id -> name, for events
        self._undelivered: list[ActorEvent] = []  # seen before an error cut a call short
        self.log = log.bind(project_id=project_id, application=self.name)

    # --- lifecycle --------------------------------------------------------------------------------------------

    def open(self) -> Application:
        """The project's application, created unless it exists (a previous run's is reused)."""
        if self.application is None:
            self.application = self.sm.create_application(self.name, self.namespace, f"FLOps project {self.project_id}")
        return self.application

    def deploy(self, spec: ActorSpec) -> list[ActorEvent]:
        """Create the actor's service and its instances, one at a time, each awaited until Oakestra shows it on a
        cluster (or the actor fails). Returns the events so far.

        Again for an actor already known: creates only what is missing (after an error or an adoption), so a
        caller may retry after a :class:`~flops.oakestra.client.SystemManagerError`; the events gathered before
        the error come with the next call's."""
        events = self._undelivered
        self._undelivered = []
        try:
            self._deploy(spec, events)
        except SystemManagerError:
            self._undelivered = events
            raise
        return events

    def _deploy(self, spec: ActorSpec, events: list[ActorEvent]) -> None:
        actor = self.actors.get(spec.actor)
        if actor is None or actor.done:
            actor = self.actors[spec.actor] = ActorState(spec.actor, spec.one_shot)
        if actor.service_id is None:
            app = self.open()
            cluster = spec.cluster or self._choose(spec)
            if cluster is None:
                offer = spec.addon or "room"
                reason = (
                    f"{spec.actor}: no active Oakestra cluster offers {offer} for {spec.vcpus} vCPU, {spec.memory} MB"
                )
                events += self._give_up(actor, reason)
                return
            try:
                actor.service_id = self.sm.create_service(app, spec.service(cluster, self.namespace), spec.rr_ip)
            except ServiceRejected as exc:
                events += self._give_up(actor, f"{spec.actor}: {exc}")
                return
            events.append(ActorEvent(spec.actor, EventKind.CREATED, actor.service_id, cluster=cluster))
            self.log.info("oakestra actor created", actor=spec.actor, service_id=actor.service_id, cluster=cluster)
        # The next instance only once the last one is on a cluster: concurrent scheduling loses instances.
        while not actor.done:
            if len(actor.instances) < actor.requested:
                events += self._look(actor)
                if not actor.done and len(actor.instances) < actor.requested:
                    self.clock.sleep(self.timing.poll_interval)
            elif actor.requested < spec.instances:
                self.sm.deploy_instance(actor.service_id)
                actor.requested += 1
                actor.requested_at = self.clock.monotonic()
            else:
                return

    def poll(self) -> list[ActorEvent]:
        """One look at every actor not yet completed or failed (running ones too: they may crash). On a
        :class:`~flops.oakestra.client.SystemManagerError` the events seen so far come with the next call."""
        events = self._undelivered
        self._undelivered = []
        try:
            for actor in list(self.actors.values()):
                if not actor.done:
                    events += self._look(actor)
        except SystemManagerError:
            self._undelivered = events
            raise
        return events

    def pending(self) -> list[str]:
        """Actors not yet settled: not running, completed or failed (a one-shot: not completed or failed)."""
        return [a.name for a in self.actors.values() if not a.settled]

    def follow(self, until: Callable[[], bool] | None = None, timeout: float | None = None) -> Iterator[ActorEvent]:
        """Poll every ``poll_interval`` until ``until()`` (default: no actor is pending) or every actor is done;
        the events as they happen. The phase deadlines end it for an actor that overstays; ``timeout`` bounds it
        as a whole (:class:`~flops.errors.TimedOut`), e.g. for an actor that keeps restarting within them."""
        done = until or (lambda: not self.pending())
        deadline = None if timeout is None else self.clock.monotonic() + timeout
        while True:
            yield from self.poll()
            if done() or all(a.done for a in self.actors.values()):
                return
            if deadline is not None and self.clock.monotonic() >= deadline:
                raise TimedOut("Oakestra actors settling", timeout or 0.0)
            self.clock.sleep(self.timing.poll_interval)

    def remove(self, name: str) -> list[ActorEvent]:
        """Delete one actor's service (e.g. a learner no longer needed)."""
        actor = self.actors[name]
        return self._delete(actor)

    def close(self, why: str) -> list[ActorEvent]:
        """Delete the whole application (Oakestra deletes its services with it): at the end of the project,
        whatever its outcome (``why``: finished, failed, cancelled)."""
        app = self.application or self.sm.find_application(self.name, self.namespace)
        if app is not None:
            self.sm.delete_application(app.id)
        events = [ActorEvent(a.name, EventKind.DELETED, a.service_id) for a in self.actors.values() if not a.deleted]
        for actor in self.actors.values():
            actor.deleted = True
        self.log.info("oakestra application closed", why=why, actors=len(events))
        self.application = None
        return events

    @classmethod
    def adopt(
        cls,
        sm: SystemManager,
        project_id: str,
        *,
        timing: Timing | None = None,
        clock: Clock | None = None,
        namespace: str = "flops",
    ) -> Placement | None:
        """What a previous manager process left on Oakestra for this project, found by name; None when there is
        no application. Its actors are looked at again by the next :meth:`poll`, or removed by :meth:`close`."""
        placement = cls(sm, project_id, timing=timing, clock=clock, namespace=namespace)
        app = sm.find_application(placement.name, namespace)
        if app is None:
            return None
        placement.application = app
        now = placement.clock.monotonic()
        for service in sm.services(app.id):
            spec = ActorSpec.from_service(project_id, service)
            placement.actors[service.name] = ActorState(
                service.name, service.one_shot, service.id, requested=spec.instances, requested_at=now
            )
        placement.log.info("oakestra application adopted", actors=sorted(placement.actors))
        return placement

    # --- internals --------------------------------------------------------------------------------------------

    def _choose(self, spec: ActorSpec) -> str | None:
        clusters = self.sm.active_clusters()
        self._clusters.update({c.id: c.name for c in clusters})
        chosen = choose_cluster(clusters, spec.addon, spec.vcpus, spec.memory)
        return chosen.name if chosen else None

    def _cluster_name(self, cluster_id: str | None) -> str:
        if cluster_id and cluster_id not in self._clusters:
            self._clusters.update({c.id: c.name for c in self.sm.active_clusters()})
        return self._clusters.get(cluster_id or "", cluster_id or "?")

    def _look(self, actor: ActorState) -> list[ActorEvent]:
        service = self.sm.service(actor.service_id) if actor.service_id else None
        verdict = observe(actor, service, self.clock.monotonic(), self.timing, self._cluster_name)
        for event in verdict.events:
            self.log.info("oakestra actor " + event.kind, **_fields(event))
        events = list(verdict.events)
        if verdict.delete:
            events += self._delete(actor)
        return events

    def _give_up(self, actor: ActorState, reason: str) -> list[ActorEvent]:
        actor.phase, actor.reason = Phase.FAILED, reason
        self.log.warning("oakestra actor failed", actor=actor.name, reason=reason)
        return [ActorEvent(actor.name, EventKind.FAILED, reason=reason)]

    def _delete(self, actor: ActorState) -> list[ActorEvent]:
        if actor.deleted or actor.service_id is None:
            return []
        self.sm.delete_service(actor.service_id)  # False: already gone, which is what we want
        actor.deleted = True
        return [ActorEvent(actor.name, EventKind.DELETED, actor.service_id)]


def _fields(event: ActorEvent) -> dict[str, object]:
    return {k: v for k, v in vars(event).items() if v is not None and k != "kind"}
