"""The Oakestra adapter of the manager's deployer port: it speaks the agent protocol, so stages run unchanged.

The port the stages use is the agent protocol: they pick agents from the registry (retained statuses), send
commands to ``agents/{id}/commands`` and wait for receipts and reports on ``agents/{id}/reports``. This adapter
stands in for agents: it announces one seat per usable Oakestra cluster (:mod:`flops.oakestra.seats`), receipts
the commands sent to its seats, turns each into an Oakestra service (:mod:`flops.oakestra.actors`,
:class:`~flops.oakestra.deploy.Placement`: one application per project, the seat's cluster as ``direct``
constraint), follows the services and reports an actor Oakestra could not run as the failure report of its
command, like an agent whose child died. ``stop_project`` deletes what the project runs there (the application,
unless a model server is kept). What the actors achieve they report themselves, over MQTT. A restarted adapter
adopts the services an earlier one left (each service's environment names its project, command and seat), so
an actor that fails after a manager restart is still reported. With a dynamic-security admin configured, each
project's actors report with their own broker identity (:mod:`flops.oakestra.identities`), allowed only the
reports of the seats its commands went to and deleted with its application; without, with the shared one.

One worker thread does all the IO (MQTT callbacks only enqueue): commands in arrival order, every
``poll_interval`` one look at every project's services, every ``refresh_s`` the cluster list again. A deploy
blocks the worker until its instance is on a cluster, which the placement's deadlines bound. Reports go through
a durable outbox until the manager acknowledges them, as an agent's do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import queue
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from flops import topics
from flops.agent_link import ReportChannel, ReportOutbox
from flops.bus import Bus, BusOptions, Inbound
from flops.errors import FlopsError, PublishFailed
from flops.handled import HandledCommands
from flops.messages import Command, CommandReceipt, decode_report
from flops.oakestra import actors, dynsec
from flops.oakestra.actors import SERVICE_PREFIX, ActorConfig, Refusal, actor_spec, failure_report
from flops.oakestra.client import Credentials, SystemManager, SystemManagerError
from flops.oakestra.deploy import ActorEvent, Clock, EventKind, Placement, SystemClock, Timing
from flops.oakestra.dynsec import DynSec
from flops.oakestra.identities import ActorIdentities
from flops.oakestra.seats import Seat, seats
from flops.settings import BrokerAddress, Settings

log = structlog.get_logger(__name__)

# Put on the worker's queue after every (re)connect: announce every seat again (a fresh broker forgot them).
_ANNOUNCE = object()


@dataclass(frozen=True)
class AdapterConfig:
    actors: ActorConfig
    state_dir: Path
    data_tags: Mapping[str, int] = field(default_factory=dict)
    timing: Timing = field(default_factory=Timing)
    refresh_s: float = 30.0
    client_id: str = "flops-oakestra"
    session_expiry_s: int = 3600
    tls: Mapping[str, str | None] = field(default_factory=dict)  # BusOptions keywords: ca_file, client_cert, …


@dataclass(frozen=True)
class _Started:
    """What an actor of a project was started for: its command and the seat it was sent to."""

    command: Command
    seat: Seat


class OakestraAdapter:
    """Seats announced on the bus, commands for them placed on Oakestra through ``sm``."""

    def __init__(
        self,
        sm: SystemManager,
        address: BrokerAddress,
        config: AdapterConfig,
        *,
        clock: Clock | None = None,
        identities: ActorIdentities | None = None,
    ) -> None:
        self.sm = sm
        self.identities = identities  # None: every actor reports with the shared identity of config.actors
        self.config = config
        self.clock = clock or SystemClock()
        self.seats: dict[str, Seat] = {}
        self.gone: dict[str, Seat] = {}  # seats whose cluster left the active list: announced offline
        self.placements: dict[str, Placement] = {}
        self._started: dict[tuple[str, str], _Started] = {}  # (project, service name) -> what it runs
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self._handled = HandledCommands(config.state_dir / "oakestra-commands.log")
        self._stops_due: dict[str, Command] = {}  # stop_project the System Manager did not take yet, by project
        self.outbox = ReportOutbox(config.state_dir / "oakestra-reports.sqlite3")
        self.announced = threading.Event()  # set once the first cluster list was announced
        self.adopted = threading.Event()  # set once what an earlier adapter left on Oakestra is followed again
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.log = log.bind(system_manager=sm.base_url, client_id=config.client_id)
        self.reports = ReportChannel(self.outbox, lambda topic, payload: self.bus.publish(topic, payload), self.log)
        self.bus = Bus(
            address,
            BusOptions(
                client_id=config.client_id,
                clean_start=False,
                session_expiry_s=config.session_expiry_s,
                manual_ack=True,
                on_ready=lambda _present: self.bus.inbox.put(_ANNOUNCE),  # type: ignore[arg-type]
                **dict(config.tls),  # type: ignore[arg-type]
            ),
        )

    # --- lifecycle --------------------------------------------------------------------------------------------

    def start(self) -> OakestraAdapter:
        if self.identities is not None:  # first: a wrong admin identity stops the manager before it announces seats
            self.identities.start()
        self.bus.connect()
        self._thread = threading.Thread(target=self._run, name="oakestra", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker, announce every seat offline, disconnect. What runs on Oakestra keeps running: the
        projects are not over, and a restarted manager's adapter adopts it. Again: nothing more."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.bus.connected:
            for seat in self.seats.values():
                try:
                    self.bus.publish_wait(
                        topics.agent_status(seat.agent_id), self._status(seat, online=False), retain=True, timeout=2.0
                    )
                except PublishFailed:
                    self.log.warning("could not announce a seat offline", agent_id=seat.agent_id)
        self.bus.close()
        if self.identities is not None:
            self.identities.close()
        self.outbox.close()
        self.sm.close()

    # --- the worker -------------------------------------------------------------------------------------------

    def _run(self) -> None:
        next_refresh = next_poll = next_resend = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                if now >= next_refresh:
                    self._refresh()
                    if not self.adopted.is_set():
                        self._adopt()
                    next_refresh = now + self.config.refresh_s
                if now >= next_poll:
                    for cmd in list(self._stops_due.values()):
                        self._stop_project(cmd, self.log.bind(project_id=cmd.project_id, command_id=cmd.command_id))
                    self._poll()
                    if self.identities is not None:
                        self.identities.retry()
                    next_poll = now + self.config.timing.poll_interval
                if now >= next_resend:
                    self.reports.resend()
                    next_resend = now + self.outbox.resend_s
            except Exception:
                self.log.exception("oakestra adapter step failed")  # a bug of one step must not stop the worker
            wait = max(0.0, min(next_refresh, next_poll, next_resend) - time.monotonic())
            try:
                item = self.bus.inbox.get(timeout=min(wait, 0.5))
            except queue.Empty:
                continue
            try:
                self._handle(item)
            except Exception:
                self.log.exception("oakestra adapter message failed")

    def _handle(self, item: object) -> None:
        if item is _ANNOUNCE:
            self._announce(list(self.seats.values()), online=True)
            self._announce(list(self.gone.values()), online=False)
            return
        assert isinstance(item, Inbound)
        parsed = topics.parse(item.topic)
        try:
            if parsed.kind == "agent_acks":
                self.reports.on_ack(item.payload)
            elif parsed.kind == "agent_commands" and parsed.ident:
                self._on_command(parsed.ident, item.payload)
        finally:  # a command that broke the handler is not redelivered forever: it was receipted and logged
            self.bus.ack(item)

    # --- seats ------------------------------------------------------------------------------------------------

    def _refresh(self) -> None:
        """Read the active clusters again: new seats subscribed and announced, vanished ones announced offline."""
        try:
            current = {seat.agent_id: seat for seat in seats(self.sm.active_clusters())}
        except SystemManagerError as exc:
            self.log.warning("oakestra clusters unavailable; seats unchanged", error=str(exc)[:300])
            return
        gone = [seat for agent_id, seat in self.seats.items() if agent_id not in current]
        changed = [seat for agent_id, seat in current.items() if self.seats.get(agent_id) != seat]
        new = [seat.agent_id for seat in changed if seat.agent_id not in self.seats]
        # Subscribed before announced: the manager re-sends its commands as soon as it sees a seat online.
        self.bus.subscribe([t for a in new for t in (topics.agent_commands(a), topics.agent_acks(a))])
        self.seats = current
        for seat in gone:
            self.gone[seat.agent_id] = seat
        for seat in changed:
            self.gone.pop(seat.agent_id, None)
        self._announce(changed, online=True)
        self._announce(gone, online=False)
        if changed or gone:
            self.log.info("oakestra seats", seats=sorted(current), gone=sorted(s.agent_id for s in gone))
        self.announced.set()

    def _status(self, seat: Seat, *, online: bool) -> bytes:
        return seat.status(online=online, data_tags=self.config.data_tags).to_bytes()

    def _announce(self, chosen: list[Seat], *, online: bool) -> None:
        for seat in chosen:
            with contextlib.suppress(PublishFailed):
                self.bus.publish(topics.agent_status(seat.agent_id), self._status(seat, online=online), retain=True)

    # --- commands ---------------------------------------------------------------------------------------------

    def _on_command(self, agent_id: str, payload: bytes) -> None:
        try:
            cmd = Command.model_validate_json(payload)
        except ValueError as exc:
            self.log.warning("unreadable command", agent_id=agent_id, error=str(exc)[:300])
            return
        bound = self.log.bind(agent_id=agent_id, project_id=cmd.project_id, command_id=cmd.command_id, kind=cmd.kind)
        with contextlib.suppress(PublishFailed):
            self.bus.publish(topics.agent_receipts(agent_id), CommandReceipt(command_ids=[cmd.command_id]).to_bytes())
        if cmd.command_id in self._handled:
            bound.info("duplicate command ignored")
            return
        self._handled.add(cmd.command_id)
        seat = self.seats.get(agent_id) or self.gone.get(agent_id)
        if cmd.kind == "stop_project":
            self._stop_project(cmd, bound)
        elif seat is None or agent_id not in self.seats:
            why = f"Oakestra cluster of {agent_id} is not active" if seat else f"{agent_id} is no Oakestra seat"
            self._fail(cmd, seat or Seat(agent_id, "?", ()), why, "refused")
        else:
            self._deploy(cmd, seat, bound)

    def _deploy(self, cmd: Command, seat: Seat, bound: Any) -> None:
        spec = actor_spec(cmd, seat, self.config.actors)
        if isinstance(spec, Refusal):
            bound.warning("command refused", reason=spec.reason)
            self._fail(cmd, seat, spec.reason, "refused")
            return
        if self.identities is not None:
            try:
                username, password = self.identities.for_command(cmd.project_id, seat.agent_id)
            except FlopsError as exc:  # the actor could not report: it is not started
                bound.warning("no broker identity for the actor", error=str(exc)[:300])
                self._fail(cmd, seat, f"broker identity of the project's actors: {exc}", "identity")
                return
            own = dataclasses.replace(self.config.actors, broker_username=username, broker_password=password)
            spec = actor_spec(cmd, seat, own)
            assert not isinstance(spec, Refusal)  # the identity changes the environment, not whether it runs
        placement = self._placement(cmd.project_id)
        self._started[(cmd.project_id, spec.actor)] = _Started(cmd, seat)
        bound.info("deploying on oakestra", service=spec.actor, cluster=seat.cluster, image=spec.image)
        try:
            events = placement.deploy(spec)
        except SystemManagerError as exc:
            bound.warning("oakestra refused the deploy", error=str(exc)[:300])
            with contextlib.suppress(SystemManagerError, KeyError):
                self._events(cmd.project_id, placement.remove(spec.actor))
            self._fail(cmd, seat, f"{spec.actor}: Oakestra System Manager: {exc}", "unreachable")
            return
        self._events(cmd.project_id, events)
        if spec.rr_ip:
            self._check_address(cmd, seat, placement, spec.actor, spec.rr_ip, bound)

    def _check_address(
        self, cmd: Command, seat: Seat, placement: Placement, name: str, wanted: str, bound: Any
    ) -> None:
        """An aggregator must have the service IP its learners were told, a model server the one its URL names;
        Oakestra gives another when that one is taken (the client retries with a random one), and then nobody
        finds it: fail it now, with the reason."""
        actor = placement.actors.get(name)
        if actor is None or actor.done or actor.service_id is None:
            return
        try:
            service = self.sm.service(actor.service_id)
            if service is None or service.rr_ip in (None, wanted):
                return
            events = placement.remove(name)
        except SystemManagerError as exc:
            bound.warning("oakestra service IP not checked", error=str(exc)[:300])
            return
        who = "its learners look for it" if cmd.kind == "run_aggregator" else "it is reported"
        reason = f"{name}: Oakestra gave it service IP {service.rr_ip}, not {wanted} where {who}"
        bound.warning("oakestra actor unreachable", reason=reason)
        self._events(cmd.project_id, events)
        self._fail(cmd, seat, reason, "address")

    def _stop_project(self, cmd: Command, bound: Any) -> None:
        """Delete what the project runs on Oakestra: the application, or every service but the kept kinds'."""
        keep = set(cmd.spec.get("keep", []))
        try:
            placement = self.placements.get(cmd.project_id) or Placement.adopt(
                self.sm, cmd.project_id, timing=self.config.timing, clock=self.clock
            )
            if placement is None:
                bound.info("nothing on oakestra to stop")
                if self.identities is not None and cmd.project_id in self.identities.projects:
                    self.identities.drop(cmd.project_id)  # its actors were refused or never placed
                return
            kept = [name for name in placement.actors if _kind_of(name) in keep and not placement.actors[name].done]
            if not kept:  # nothing to keep runs there: the whole application goes, and its actors' identity
                events = placement.close("stop_project")
                self.placements.pop(cmd.project_id, None)
                if self.identities is not None:
                    self.identities.drop(cmd.project_id)
            else:
                stopping = [name for name in placement.actors if _kind_of(name) not in keep]
                events = [event for name in stopping for event in placement.remove(name)]
                self.placements[cmd.project_id] = placement
        except SystemManagerError as exc:
            bound.warning("oakestra stop failed; tried again at the next poll", error=str(exc)[:300])
            self._stops_due[cmd.project_id] = cmd
            return
        self._stops_due.pop(cmd.project_id, None)
        bound.info("project stopped on oakestra", deleted=len(events), keep=sorted(keep))
        self._events(cmd.project_id, events)

    def _placement(self, project_id: str) -> Placement:
        placement = self.placements.get(project_id)
        if placement is None:
            placement = Placement(self.sm, project_id, timing=self.config.timing, clock=self.clock)
            self.placements[project_id] = placement
        return placement

    def _adopt(self) -> None:
        """Follow again what an earlier adapter (a manager killed or restarted) left on Oakestra: every FLOps
        application's services whose environment names the command they run. Retried at the next refresh while
        the System Manager cannot be reached."""
        namespace = "flops"
        try:
            projects = set()
            passwords: dict[str, tuple[str, set[str]]] = {}  # project -> (its actors' password, their seats)
            for app in self.sm.applications():
                if app.namespace != namespace:
                    continue
                for service in self.sm.services(app.id):
                    env = dict(e.split("=", 1) for e in service.environment if "=" in e)
                    started = _started_from(env, self)
                    if started is not None:
                        self._started[(started.command.project_id, service.name)] = started
                        projects.add(started.command.project_id)
                        _own_identity(env, started, passwords)
            for project_id in sorted(projects - set(self.placements)):
                placement = Placement.adopt(self.sm, project_id, timing=self.config.timing, clock=self.clock)
                if placement is not None:
                    self.placements[project_id] = placement
        except SystemManagerError as exc:
            self.log.warning("oakestra adoption failed; next refresh again", error=str(exc)[:300])
            return
        if self.identities is not None and not self._adopt_identities(projects, passwords):
            return
        if projects:
            self.log.info("oakestra projects adopted", projects=sorted(projects))
        self.adopted.set()

    def _adopt_identities(self, projects: set[str], passwords: Mapping[str, tuple[str, set[str]]]) -> bool:
        """Keep (or make again) the identities of the adopted projects' actors, delete those of projects with no
        application left. False: the broker did not answer, adoption is tried again at the next refresh."""
        assert self.identities is not None
        try:
            for project_id, (password, seat_ids) in sorted(passwords.items()):
                self.identities.adopt(project_id, password, seat_ids)
            stale = self.identities.prune(keep=projects)
        except FlopsError as exc:
            self.log.warning("actor identities not adopted; next refresh again", error=str(exc)[:300])
            return False
        if stale:
            self.log.info("actor identities of ended projects deleted", projects=stale)
        return True

    # --- following --------------------------------------------------------------------------------------------

    def _poll(self) -> None:
        for project_id, placement in list(self.placements.items()):
            if all(actor.done for actor in placement.actors.values()):
                continue
            try:
                events = placement.poll()
            except SystemManagerError as exc:
                self.log.warning("oakestra poll failed; next time again", project_id=project_id, error=str(exc)[:300])
                continue
            self._events(project_id, events)

    def _events(self, project_id: str, events: list[ActorEvent]) -> None:
        for event in events:
            started = self._started.get((project_id, event.actor))
            fields = {k: v for k, v in vars(event).items() if v is not None and k not in ("kind", "actor")}
            self.log.info(f"oakestra actor {event.kind}", project_id=project_id, actor=event.actor, **fields)
            if started is None:
                continue
            if event.kind is EventKind.FAILED:
                self._fail(started.command, started.seat, event.reason or f"{event.actor} failed on Oakestra", "failed")
            elif event.kind in actors.PLACEMENT_NEWS:  # the project's watchers see where its actors run
                self._send(started.seat, actors.placement_report(started.command, started.seat, event))

    # --- reports ----------------------------------------------------------------------------------------------

    def _fail(self, cmd: Command, seat: Seat, reason: str, suffix: str) -> None:
        self._send(seat, failure_report(cmd, seat, reason, event_suffix=suffix))

    def _send(self, seat: Seat, body: dict[str, Any]) -> None:
        report = decode_report(json.dumps(body).encode())
        self.reports.send(topics.agent_reports(seat.agent_id), report.event_id, report.to_bytes())


def _started_from(env: Mapping[str, str], adapter: OakestraAdapter) -> _Started | None:
    """The command and seat a service was started for, from the environment the adapter gave it (None: no
    FLOPS actor, or one made by a version that did not record them)."""
    try:
        command = Command(
            command_id=env[actors.ENV_COMMAND],
            project_id=env[actors.ENV_PROJECT],
            kind=env[actors.ENV_KIND],  # type: ignore[arg-type]
            agent_id=env[actors.ENV_AGENT],
        )
    except (KeyError, ValueError):
        return None
    seat = adapter.seats.get(command.agent_id) or adapter.gone.get(command.agent_id)
    return _Started(command, seat or Seat(command.agent_id, "?", ()))


def _own_identity(env: Mapping[str, str], started: _Started, into: dict[str, tuple[str, set[str]]]) -> None:
    """Note the project's own actor identity a service was given (not the shared one) and the seat it reports as."""
    project_id = started.command.project_id
    password = env.get(actors.ENV_BROKER_PASSWORD)
    if env.get(actors.ENV_BROKER_USERNAME) != dynsec.username(project_id) or not password:
        return
    into.setdefault(project_id, (password, set()))[1].add(started.command.agent_id)


def _kind_of(service_name: str) -> str | None:
    """The command kind a service was started for, from its name's prefix (longest first: ``modelbuilder``)."""
    for kind, prefix in sorted(SERVICE_PREFIX.items(), key=lambda item: -len(item[1])):
        if service_name.startswith(prefix):
            return kind
    return None


def from_settings(settings: Settings, address: BrokerAddress) -> OakestraAdapter:
    """The adapter the manager runs with ``--deployer oakestra``: the System Manager, the broker as actors
    reach it, the builder image and data tags from the settings."""
    if not settings.oakestra_url:
        raise ValueError("oakestra_url is required when deployer is oakestra")
    sm = SystemManager(
        settings.oakestra_url,
        Credentials(settings.oakestra_username, settings.oakestra_password.get_secret_value()),
    )
    actors = ActorConfig(
        broker_url=settings.oakestra_broker_url or address.url,
        broker_username=settings.oakestra_actor_username,
        broker_password=password.get_secret_value() if (password := settings.oakestra_actor_password) else None,
        # Actors verify a TLS broker with the CA the manager does; their images do not carry it.
        broker_ca_pem=settings.broker_ca_file.read_text() if settings.broker_ca_file else None,
        registry_ca_pem=settings.tls_ca_file.read_text() if settings.registry_tls and settings.tls_ca_file else None,
        builder_image=settings.oakestra_builder_image,
        registry=settings.registry,
        registry_tls=settings.registry_tls,
        data_server=settings.oakestra_data_server,
        data_servers=settings.oakestra_data_servers,
        data_token=token.get_secret_value() if (token := settings.oakestra_data_token) else None,
        serve_port=settings.oakestra_serve_port,
    )
    config = AdapterConfig(
        actors=actors,
        state_dir=settings.data_dir / "oakestra",
        data_tags=settings.oakestra_data_tags,
        timing=Timing(poll_interval=settings.oakestra_poll_s),
        tls=settings.broker_tls_files(),
    )
    identities = None
    if bool(settings.oakestra_dynsec_username) != bool(settings.oakestra_dynsec_password):
        raise ValueError("oakestra_dynsec_username and oakestra_dynsec_password go together")
    if settings.oakestra_dynsec_username and settings.oakestra_dynsec_password:
        admin = address.model_copy(
            update={
                "username": settings.oakestra_dynsec_username,
                "password": settings.oakestra_dynsec_password.get_secret_value(),
            }
        )
        identities = ActorIdentities(DynSec(admin, tls=settings.broker_tls_files()))
    return OakestraAdapter(sm, address, config, identities=identities)
