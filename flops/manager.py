"""The manager service: drains the bus into the engine, commits in batches, publishes the outbox.

One worker thread does everything that touches the store or the machine. paho's thread only enqueues
(received messages, broker acknowledgements). Inbound QoS 1 messages are acknowledged to the broker only
after the unit that handled them is committed (manual ack), so a killed manager gets them again; the
outbox is re-published at start-up, so a command committed but not yet sent still reaches its agent.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import structlog
from pydantic import ValidationError

from flops import topics
from flops.builder.repo import RepoError, resolve_commit
from flops.bus import Bus, BusOptions, Inbound, Will
from flops.delivery import CommandDelivery
from flops.engine import Engine, Result
from flops.errors import PublishFailed, StoreError
from flops.hooks import Internal
from flops.intake import FairIntake
from flops.messages import CommandReceipt, ErrorEvent, FieldError, ReportAck, describe, new_id
from flops.provisioning import AgentPolicy
from flops.settings import BrokerAddress, Settings
from flops.store import OutboxItem, Store

T = TypeVar("T")

log = structlog.get_logger(__name__)

BATCH_MAX = 512
# Finished projects past the retention are forgotten in rounds (at most 1,000 per round) this often.
PRUNE_EVERY_S = 300.0
# How long after a (re)connect the manager holds reports back waiting for its end-of-retained marker (the
# agents' retained statuses come first); a broker that never echoes it delays work by this much, no more.
AGENT_SYNC_TIMEOUT_S = 10.0
SUBSCRIPTIONS = [
    topics.ALL_REQUESTS,
    topics.ALL_CANCELS,
    topics.ALL_AGENT_REPORTS,
    topics.ALL_AGENT_RECEIPTS,
    topics.ALL_AGENT_STATUS,
]


@dataclass(frozen=True)
class Reconnected:
    """The bus is (re)connected and subscribed; ``session_present`` False means the broker lost our session."""

    session_present: bool


class Manager:
    def __init__(
        self, settings: Settings, store: Store, address: BrokerAddress, *, client_id: str = "flops-manager"
    ) -> None:
        self.settings = settings
        self.store = store
        # After every (re)connect: reports, requests and deadlines wait until the agents' retained statuses are
        # in (our marker came back), so a report queued in our session cannot move a project into a stage
        # that picks agents from an empty registry.
        self._sync_topic = f"{topics.client_scratch(address.username or client_id)}/sync"
        self._sync_marker: bytes | None = b""  # holding from the start: the first connection's marker is not out
        self._sync_deadline = float("inf")  # start() sets it
        self._held: list[object] = []
        policy = AgentPolicy.load(settings.agents_file) if settings.agents_file else None
        self.engine = Engine(store, settings, resolver=self._resolve, policy=policy)
        self.bus = Bus(
            address,
            BusOptions(
                client_id=client_id,
                subscriptions=[*SUBSCRIPTIONS, self._sync_topic],
                clean_start=False,
                session_expiry_s=settings.session_expiry_s,
                manual_ack=True,
                will=Will(topics.manager_status(), b'{"online": false}'),
                birth=lambda: (topics.manager_status(), b'{"online": true}'),
                on_ready=lambda present: self.bus.inbox.put(Reconnected(present)),  # type: ignore[arg-type]
                ca_file=str(settings.broker_ca_file) if settings.broker_ca_file else None,
                client_cert=str(settings.broker_client_cert) if settings.broker_client_cert else None,
                client_key=str(settings.broker_client_key) if settings.broker_client_key else None,
            ),
        )
        self.intake = FairIntake(self.bus.inbox, self.bus.ack)
        self.delivery = CommandDelivery(settings.command_resend_s, settings.command_ttl_s)
        # Filled on paho's thread (PUBACKs), drained by the worker.
        self._acked: collections.deque[OutboxItem] = collections.deque()
        self._refused: collections.deque[tuple[OutboxItem, str]] = collections.deque()
        self._resolvers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="resolve")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # The outbox boot found (published once the first connection is up); None once that happened.
        self._unsent_at_boot: list[OutboxItem] | None = None
        self._next_prune = 0.0
        self.ready = threading.Event()

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> Manager:
        """Boot (resume projects), connect, start the worker; it publishes what the outbox still holds."""
        # One durable commit for every project's on_resume unit (each still atomic as a savepoint), instead
        # of one fsync per resumed project.
        with self.store.batch():
            self._unsent_at_boot = self.engine.boot()
        self._sync_deadline = time.monotonic() + AGENT_SYNC_TIMEOUT_S
        self.bus.connect()
        self._thread = threading.Thread(target=self._run, name="manager", daemon=True)
        self._thread.start()
        self.ready.set()
        log.info("manager ready", resumed=len(self.engine.lifecycle.projects))
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self._resolvers.shutdown(wait=False, cancel_futures=True)
        if self.bus.connected:
            try:
                self.bus.publish_wait(topics.manager_status(), b'{"online": false}', retain=True, timeout=2.0)
            except PublishFailed:
                log.warning("could not publish offline status")
        self.bus.close()
        self.store.close()

    def wait(self) -> None:
        """Block until :meth:`stop` is called."""
        self._stop.wait()

    # --- the worker ------------------------------------------------------------------------------

    def _run(self) -> None:
        next_tick = 0.0
        while not self._stop.is_set():
            batch = self._synced(self.intake.take(self.settings.deadline_check_interval_s, BATCH_MAX))
            tick = self._sync_marker is None and time.monotonic() >= next_tick
            if tick:
                next_tick = time.monotonic() + self.settings.deadline_check_interval_s
            handled = self._commit(batch, tick)
            if handled is None:
                return  # stopping while a commit kept failing: the messages stay unacknowledged
            out, acks = handled
            for item in batch:
                if isinstance(item, Inbound):
                    self.bus.ack(item)
            self._publish(_latest_retained(out))
            self._send_acks(acks)
            self._surface_refusals()
            for item in batch:
                if isinstance(item, Reconnected):
                    self._on_reconnected(item)
            if tick:
                self._resend_commands()

    def _synced(self, batch: list[object]) -> list[object]:
        """``batch`` as the worker may handle it now: agent statuses and reconnects at once; everything else
        held back from a (re)connect until our end-of-retained marker arrives (or its deadline passes)."""
        now: list[object] = []
        for item in batch:
            if isinstance(item, Reconnected):
                self._begin_sync()
                now.append(item)
            elif isinstance(item, Inbound) and item.topic == self._sync_topic:
                self.bus.ack(item)
                if item.payload == self._sync_marker:
                    self._end_sync("marker")
                    now, self._held = [*now, *self._held], []  # before what arrived after the marker
            elif isinstance(item, Inbound) and topics.parse(item.topic).kind == "agent_status":
                now.append(item)
            elif self._sync_marker is not None:
                self._held.append(item)
            else:
                now.append(item)
        if self._sync_marker is not None and time.monotonic() >= self._sync_deadline:
            log.warning("agent statuses not confirmed in time; going on", timeout_s=AGENT_SYNC_TIMEOUT_S)
            self._end_sync("deadline")
        if self._sync_marker is None and self._held:
            now, self._held = [*now, *self._held], []
        return now

    def _begin_sync(self) -> None:
        self._sync_marker = new_id("sync").encode()
        self._sync_deadline = time.monotonic() + AGENT_SYNC_TIMEOUT_S
        try:
            self.bus.publish(self._sync_topic, self._sync_marker, qos=1)
        except PublishFailed:
            log.warning("could not publish the agent sync marker; waiting for the deadline")

    def _end_sync(self, why: str) -> None:
        log.debug("agent statuses in", held=len(self._held), via=why)
        self._sync_marker = None

    def _commit(self, batch: list[object], tick: bool) -> tuple[list[OutboxItem], dict[str, list[str]]] | None:
        """Handle ``batch`` in one durable commit, retrying with backoff while the store fails.

        Nothing of a failed try is acknowledged or published and the machines are rebuilt from the store, so
        the retry handles every message as if it were the first time (and dedup keeps it at once).
        """
        delay = 0.1
        acked = self._drain(self._acked)
        while not self._stop.is_set():
            out: list[OutboxItem] = []
            acks: dict[str, list[str]] = collections.defaultdict(list)
            try:
                with self.store.batch():
                    self.store.sent(acked)
                    for item in batch:
                        result = self._handle(item)
                        out.extend(result.outbox)
                        if result.ack and isinstance(item, Inbound):
                            acks[topics.parse(item.topic).ident or ""].append(result.ack)
                    if tick:
                        out.extend(self.engine.check_deadlines())
                        out.extend(self.engine.check_suspects())
                        self.store.sent(self.delivery.expired())
                        if time.monotonic() >= self._next_prune:
                            out.extend(self.engine.prune())
                            self._next_prune = time.monotonic() + PRUNE_EVERY_S
                return out, acks
            except Exception:
                # Broken infrastructure (disk full, database locked): nothing of this batch committed.
                log.exception("batch failed; retrying", retry_in_s=delay, messages=len(batch))
                self.engine.reload_all()
                self._stop.wait(delay)
                delay = min(delay * 2, self.settings.commit_retry_max_s)
        return None

    def _handle(self, item: object) -> Result:
        if isinstance(item, Reconnected):
            if not item.session_present:
                # In arrival order: the statuses the broker delivers after our SUBACK confirm the agents.
                self.engine.fresh_session()
            return Result("accept", "reconnected")
        if isinstance(item, Internal):
            return self._guarded(lambda: self.engine.internal(item), item.kind)
        assert isinstance(item, Inbound)
        kind, ident, customer = topics.parse(item.topic)
        if len(item.payload) > self.settings.max_payload_bytes:
            reason = f"payload of {len(item.payload)} bytes exceeds {self.settings.max_payload_bytes}"
            if kind == "requests" and customer:
                size = f"request of {len(item.payload)} bytes exceeds {self.settings.max_payload_bytes}"
                errors = [FieldError(field="payload", message=size)]
                return self.engine.refuse(customer, item.payload, item.response_topic, errors, size)
            return self.engine.error(item.topic, reason)
        if kind == "requests" and customer:
            return self._guarded(lambda: self.engine.request(customer, item.payload, item.response_topic), item.topic)
        if kind == "agent_reports" and ident:
            return self._guarded(lambda: self.engine.report(ident, item.payload), item.topic)
        if kind == "agent_receipts" and ident:
            return self._guarded(lambda: self._receipts(ident, item.payload), item.topic)
        if kind == "cancel" and ident and customer:
            return self._guarded(
                lambda: self.engine.cancel(customer, ident, item.payload, item.response_topic), item.topic
            )
        if kind == "agent_status" and ident:
            if not item.payload:
                return Result("ignore", "cleared status")
            result = self._guarded(lambda: self.engine.agent_status(ident, item.payload), item.topic)
            status = self.engine.agents.get(ident)
            if status is not None and status.online:
                # Its birth follows its subscriptions: whatever it has not receipted goes out again now, and it
                # re-sends whatever we have not acknowledged (we may have been away when it sent it).
                self._publish(self.delivery.for_agent(ident))
                with contextlib.suppress(PublishFailed):
                    self.bus.publish(topics.agent_acks(ident), ReportAck(resend=True).to_bytes())
            return result
        return self.engine.error(item.topic, "topic not handled by the manager")

    def _receipts(self, agent_id: str, payload: bytes) -> Result:
        try:
            receipt = CommandReceipt.model_validate_json(payload)
        except ValidationError as exc:
            return self.engine.error(topics.agent_receipts(agent_id), f"invalid receipt: {describe(exc)}")
        self.store.sent(self.delivery.receipted(agent_id, receipt.command_ids))
        return Result("accept", "receipt")

    def _guarded(self, handle: Callable[[], Result], what: str) -> Result:
        """A bug in one handler must not stop the manager: log it, reject the message, go on. A failing store
        is no bug of one message: it fails the batch, which is retried."""
        try:
            return handle()
        except StoreError:
            raise
        except Exception as exc:
            log.exception("handler failed", what=what)
            return self.engine.error(what, f"internal error: {type(exc).__name__}: {exc}")

    def _on_reconnected(self, event: Reconnected) -> None:
        """Publish what the broker may have lost: the outbox after a restart of ours, and on a fresh broker
        session every project's retained state (a broker without persistence forgets them)."""
        if not event.session_present:
            states = self.engine.retained_states()
            log.info("fresh broker session; re-publishing retained states", projects=len(states))
            for item in states:
                self._send(item, track=False)
        if self._unsent_at_boot is not None:
            # Items committed since boot went out with their batch; only what boot found is owed.
            self._publish(self._unsent_at_boot)
            self._unsent_at_boot = None
        elif not event.session_present:
            self._publish(self.store.outbox())

    # --- publishing ------------------------------------------------------------------------------

    def _publish(self, items: list[OutboxItem]) -> None:
        for item in items:
            self._send(item, track=True)

    def _send(self, item: OutboxItem, *, track: bool) -> None:
        """Publish one item. Tracked items leave the outbox on their PUBACK, commands on their agent's receipt;
        a refused PUBACK keeps the row (re-published after a restart or a fresh broker session)."""
        command = track and self.delivery.is_command(item)
        on_acked = _noop if not track or command else (lambda i=item: self._acked.append(i))
        try:
            self.bus.publish(
                item.topic,
                item.payload,
                retain=item.retain,
                on_acked=on_acked,
                on_refused=lambda reason, i=item: self._refused.append((i, reason)),
            )
        except (PublishFailed, ValueError):
            # Still in the outbox; re-published at the next start or fresh session. (paho raises ValueError for
            # a topic it cannot publish to, e.g. a requester's response topic with wildcards.)
            log.exception("publish failed; left in the outbox", topic=item.topic)
            return
        if command:
            self.delivery.sent(item)

    def _resend_commands(self) -> None:
        due = self.delivery.due()
        if due:
            log.info("re-sending commands not yet receipted", count=len(due))
            self._publish(due)

    def _send_acks(self, acks: dict[str, list[str]]) -> None:
        for agent_id, event_ids in acks.items():
            with contextlib.suppress(PublishFailed, ValueError):
                self.bus.publish(topics.agent_acks(agent_id), ReportAck(event_ids=event_ids).to_bytes())

    def _surface_refusals(self) -> None:
        """A publish the broker refused is an error an operator must see: the log and ``flops/v1/errors``."""
        for item, reason in self._drain(self._refused):
            if self.delivery.is_command(item):
                self.delivery.refused(item)
            log.error("broker refused a publish; kept in the outbox", topic=item.topic, reason=reason)
            if item.topic == topics.errors():
                continue
            error = ErrorEvent(topic=item.topic, reason=f"broker refused the manager's publish: {reason}")
            with contextlib.suppress(PublishFailed):
                self.bus.publish(topics.errors(), error.to_bytes())

    @staticmethod
    def _drain(source: collections.deque[T]) -> list[T]:
        out = []
        while source:
            out.append(source.popleft())
        return out

    # --- commit resolution off the worker --------------------------------------------------------

    def _resolve(self, project_id: str, url: str, ref: str | None) -> None:
        def job() -> None:
            # The builder's resolver: one implementation of "which commit does this ref name".
            try:
                commit = resolve_commit(url, ref, timeout_s=30.0)
                event = Internal(project_id, "repo.resolved", {"commit": commit})
            except RepoError as exc:
                event = Internal(project_id, "repo.unresolved", {"reason": exc.reason})
            except Exception as exc:
                event = Internal(project_id, "repo.unresolved", {"reason": f"{type(exc).__name__}: {exc}"})
            self.bus.inbox.put(event)  # type: ignore[arg-type]

        self._resolvers.submit(job)


def _noop() -> None:
    return None


def _latest_retained(items: list[OutboxItem]) -> list[OutboxItem]:
    """Drop retained items a later item of the same batch replaces (a project's state, several events deep).

    The outbox row already holds only the newest (same key); publishing the older ones would cost a
    PUBLISH and a PUBACK each for a value no subscriber keeps. Non-retained items (the event stream,
    commands, replies) all go out, in order. A state followed by a reply before it is replaced is kept: a
    client reading the state right after its reply must find it.
    """
    n = len(items)
    superseded_at: dict[int, int] = {}
    later: dict[str, int] = {}
    reply_after: list[int | None] = [None] * n
    next_reply: int | None = None
    for i in range(n - 1, -1, -1):
        item = items[i]
        reply_after[i] = next_reply
        if item.key.startswith("reply:"):
            next_reply = i
        if item.retain:
            if item.key in later:
                superseded_at[i] = later[item.key]
            later[item.key] = i
    out = []
    for i, item in enumerate(items):
        replaced = superseded_at.get(i)
        reply = reply_after[i]
        if replaced is not None and (reply is None or reply > replaced):
            continue
        out.append(item)
    return out
