"""The manager service: drains the bus into the engine, commits in batches, publishes the outbox.

One worker thread does everything that touches the store or the machine. paho's thread only enqueues
(received messages, broker acknowledgements). Inbound QoS 1 messages are acknowledged to the broker only
after the unit that handled them is committed (manual ack), so a killed manager gets them again; the
outbox is re-published at start-up, so a command committed but not yet sent still reaches its agent.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import structlog

from flops import topics
from flops.builder.repo import RepoError, resolve_commit
from flops.bus import Bus, BusOptions, Inbound, Will
from flops.engine import Engine, Result
from flops.errors import PublishFailed
from flops.hooks import Internal
from flops.messages import FieldError
from flops.settings import BrokerAddress, Settings
from flops.store import OutboxItem, Store

log = structlog.get_logger(__name__)

BATCH_MAX = 512
SUBSCRIPTIONS = [topics.requests(), topics.ALL_CANCELS, topics.ALL_REPORTS, topics.ALL_AGENT_STATUS]


class Manager:
    def __init__(
        self, settings: Settings, store: Store, address: BrokerAddress, *, client_id: str = "flops-manager"
    ) -> None:
        self.settings = settings
        self.store = store
        self.engine = Engine(store, settings, resolver=self._resolve)
        self.bus = Bus(
            address,
            BusOptions(
                client_id=client_id,
                subscriptions=list(SUBSCRIPTIONS),
                clean_start=False,
                session_expiry_s=settings.session_expiry_s,
                manual_ack=True,
                will=Will(topics.manager_status(), b'{"online": false}'),
                birth=lambda: (topics.manager_status(), b'{"online": true}'),
                ca_file=str(settings.broker_ca_file) if settings.broker_ca_file else None,
                client_cert=str(settings.broker_client_cert) if settings.broker_client_cert else None,
                client_key=str(settings.broker_client_key) if settings.broker_client_key else None,
            ),
        )
        self._acked: collections.deque[OutboxItem] = collections.deque()
        self._resolvers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="resolve")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> Manager:
        """Boot (resume projects), connect, publish what the outbox still holds, start the worker."""
        # One durable commit for every project's on_resume unit (each still atomic as a savepoint), instead
        # of one fsync per resumed project.
        with self.store.batch():
            pending = self.engine.boot()
        self.bus.connect()
        self._publish(pending)
        self._thread = threading.Thread(target=self._run, name="manager", daemon=True)
        self._thread.start()
        self.ready.set()
        log.info("manager ready", resumed=len(self.engine.lifecycle.projects), outbox=len(pending))
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
        next_deadline_check = 0.0
        while not self._stop.is_set():
            try:
                first = self.bus.inbox.get(timeout=self.settings.deadline_check_interval_s)
            except queue.Empty:
                first = None
            batch = [] if first is None else [first]
            while len(batch) < BATCH_MAX:
                try:
                    batch.append(self.bus.inbox.get_nowait())
                except queue.Empty:
                    break
            out: list[OutboxItem] = []
            acked = self._drain_acked()
            try:
                with self.store.batch():
                    self.store.sent(acked)
                    for item in batch:
                        out.extend(self._handle(item).outbox)
                    if time.monotonic() >= next_deadline_check:
                        out.extend(self.engine.check_deadlines())
                        next_deadline_check = time.monotonic() + self.settings.deadline_check_interval_s
            except Exception:
                # Broken infrastructure (disk full, database locked): nothing of this batch committed.
                # The messages stay unacknowledged, so the broker redelivers them after a reconnect.
                log.exception("batch failed; messages stay unacknowledged")
                self._acked.extend(acked)
                # The machines may be ahead of what was rolled back: rebuild them from the store.
                self.engine.reload_all()
                continue
            for item in batch:
                if isinstance(item, Inbound):
                    self.bus.ack(item)
            self._publish(_latest_retained(out))

    def _handle(self, item: Inbound | Internal) -> Result:
        if isinstance(item, Internal):
            return self._guarded(lambda: self.engine.internal(item), item.kind)
        if len(item.payload) > self.settings.max_payload_bytes:
            kind, ident = topics.parse(item.topic)
            reason = f"payload of {len(item.payload)} bytes exceeds {self.settings.max_payload_bytes}"
            if kind == "requests":
                size = f"request of {len(item.payload)} bytes exceeds {self.settings.max_payload_bytes}"
                errors = [FieldError(field="payload", message=size)]
                return self.engine.refuse(item.payload, item.response_topic, errors, size)
            if kind in {"reports", "cancel"} and ident:
                return self.engine.reject_for(ident, reason, None)
            return self.engine.error(item.topic, reason)
        kind, ident = topics.parse(item.topic)
        if kind == "requests":
            return self._guarded(lambda: self.engine.request(item.payload, item.response_topic), item.topic)
        if kind == "reports" and ident:
            return self._guarded(lambda: self.engine.report(ident, item.payload), item.topic)
        if kind == "cancel" and ident:
            return self._guarded(lambda: self.engine.cancel(ident, item.payload, item.response_topic), item.topic)
        if kind == "agent_status" and ident:
            if not item.payload:
                return Result("ignore", "cleared status")
            return self._guarded(lambda: self.engine.agent_status(item.payload), item.topic)
        return self.engine.error(item.topic, "topic not handled by the manager")

    def _guarded(self, handle: Callable[[], Result], what: str) -> Result:
        """A bug in one handler must not stop the manager: log it, reject the message, go on."""
        try:
            return handle()
        except Exception as exc:
            log.exception("handler failed", what=what)
            return self.engine.error(what, f"internal error: {type(exc).__name__}: {exc}")

    # --- publishing ------------------------------------------------------------------------------

    def _publish(self, items: list[OutboxItem]) -> None:
        for item in items:
            try:
                self.bus.publish(
                    item.topic, item.payload, retain=item.retain, on_acked=lambda i=item: self._acked.append(i)
                )
            except PublishFailed:
                # Still in the outbox; re-published at the next start.
                log.exception("publish failed; left in the outbox", topic=item.topic)

    def _drain_acked(self) -> list[OutboxItem]:
        out = []
        while self._acked:
            out.append(self._acked.popleft())
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
