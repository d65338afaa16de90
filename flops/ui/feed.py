"""The web view's MQTT subscriber: retained project states, project events and agent statuses, folded into
an :class:`~flops.ui.view.Observed` by one worker thread (paho's callbacks only enqueue, as everywhere).

It subscribes with the customer wildcards of :mod:`flops.topics`; the broker delivers only what the
credentials it connected with may read, so a customer's feed holds that customer's projects only.
"""

from __future__ import annotations

import queue
import threading

import structlog
from pydantic import ValidationError

from flops import topics
from flops.bus import Bus, BusOptions, Inbound
from flops.messages import AgentStatus, ProjectEvent, ProjectState, new_id
from flops.settings import BrokerAddress
from flops.ui.view import Observed

log = structlog.get_logger(__name__)

SUBSCRIPTIONS = [topics.ALL_PROJECT_STATES, topics.ALL_PROJECT_EVENTS, topics.ALL_AGENT_STATUS]


class Feed:
    """One broker connection (one identity) and the view it keeps up to date."""

    def __init__(
        self,
        address: BrokerAddress,
        *,
        ca_file: str | None = None,
        client_cert: str | None = None,
        client_key: str | None = None,
    ) -> None:
        self.observed = Observed()
        self.bus = Bus(
            address,
            BusOptions(
                client_id=new_id("flops-ui"),
                subscriptions=list(SUBSCRIPTIONS),
                ca_file=ca_file,
                client_cert=client_cert,
                client_key=client_key,
            ),
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="flops-ui-feed", daemon=True)
        self._log = log.bind(broker=address.url, username=address.username)

    def start(self, timeout: float = 10.0) -> Feed:
        """Connect (BrokerUnavailable when refused: wrong password, broker down) and start folding."""
        self.bus.connect(timeout)
        self._thread.start()
        self._log.info("ui feed connected")
        return self

    def stop(self) -> None:
        self._stop.set()
        self.bus.close()
        if self._thread.is_alive():
            self._thread.join(5)

    def _pump(self) -> None:
        while not self._stop.is_set():
            try:
                message = self.bus.inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                self.handle(message)
            except ValidationError as exc:
                # Someone else's payload on our wildcard: skip it, keep the view.
                self._log.warning("ui feed skipped a message", topic=message.topic, error=str(exc)[:200])

    def handle(self, message: Inbound) -> None:
        parsed = topics.parse(message.topic)
        if parsed.kind == "state":
            if not message.payload:
                self.observed.forget_project(parsed.ident or "")
            else:
                self.observed.apply_state(parsed.customer, ProjectState.model_validate_json(message.payload))
        elif parsed.kind == "events" and message.payload:
            self.observed.apply_event(parsed.customer, ProjectEvent.model_validate_json(message.payload))
        elif parsed.kind == "agent_status":
            if not message.payload:
                self.observed.forget_agent(parsed.ident or "")
            else:
                self.observed.apply_agent(AgentStatus.model_validate_json(message.payload))
