"""Client side of the protocol (what the CLI and tests use): submit, cancel, read state, follow events."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from flops import topics
from flops.bus import Bus, BusOptions, Inbound
from flops.errors import NotFound, TimedOut
from flops.lifecycle_stages import Stage
from flops.messages import AgentStatus, CancelRequest, ProjectEvent, ProjectRequest, ProjectState, Reply, new_id
from flops.settings import BrokerAddress
from flops.sla import ProjectSLA

# The original FLOps SLA's default customer, whom an anonymous (development) client acts as.
DEFAULT_CUSTOMER = ProjectSLA.model_fields["customerID"].default


class Client:
    """A short-lived MQTT client for one user action."""

    def __init__(
        self,
        address: BrokerAddress,
        *,
        ca_file: str | None = None,
        client_cert: str | None = None,
        client_key: str | None = None,
    ) -> None:
        self.bus = Bus(
            address,
            BusOptions(client_id=new_id("flops-cli"), ca_file=ca_file, client_cert=client_cert, client_key=client_key),
        )
        # Who we are on the broker: a customer submits under its user name (the ACL allows nothing else). Without
        # one (the development broker) the SLA's customerID names the customer.
        self.username = address.username

    def __enter__(self) -> Client:
        self.bus.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bus.close()

    def _request(self, topic: str, customer: str, request_id: str, payload: bytes, timeout: float) -> Reply:
        reply_topic = topics.request_reply(customer, request_id)
        # No wait for SUBACK needed: the broker handles one connection's packets in order, so the reply
        # subscription exists before the request is seen.
        self.bus.subscribe([reply_topic])
        self.bus.publish(topic, payload, response_topic=reply_topic)
        for message in self._messages(timeout):
            if message.topic == reply_topic:
                return Reply.model_validate_json(message.payload)
        raise TimedOut("reply from the manager (is `flops manager` running?)", timeout)

    def submit(self, sla: ProjectSLA, *, timeout: float = 15.0, request_id: str | None = None) -> Reply:
        return self.send(ProjectRequest(request_id=request_id or new_id("r"), sla=sla), timeout=timeout)

    def send(self, request: ProjectRequest, *, timeout: float = 15.0) -> Reply:
        if self.username and "customerID" not in request.sla.model_fields_set:
            # The SLA names no customer: it is ours (the manager would fill it in the same way).
            request = request.model_copy(update={"sla": request.sla.model_copy(update={"customerID": self.username})})
        customer = self.username or request.sla.customerID
        return self._request(topics.requests(customer), customer, request.request_id, request.to_bytes(), timeout)

    def submit_raw(
        self, payload: bytes, request_id: str, *, customer: str | None = None, timeout: float = 15.0
    ) -> Reply:
        """Publish bytes as a request (tests of bad input); as ``customer``, else as ourselves."""
        who = customer or self.username or DEFAULT_CUSTOMER
        return self._request(topics.requests(who), who, request_id, payload, timeout)

    def cancel(self, project_id: str, reason: str, *, timeout: float = 15.0) -> Reply:
        """Cancel on the project's own topic (its state names its customer: an operator cancels any project)."""
        customer = self.state(project_id, timeout=timeout).customer or self.username or DEFAULT_CUSTOMER
        request = CancelRequest(request_id=new_id("c"), reason=reason)
        topic = topics.project_cancel(customer, project_id)
        return self._request(topic, self.username or customer, request.request_id, request.to_bytes(), timeout)

    def state(self, project_id: str, *, timeout: float = 5.0) -> ProjectState:
        """The project's retained state; NotFound when the broker holds none (or none we may read)."""
        found = _valid(ProjectState, self._retained(topics.project_state_any(project_id), timeout))
        if not found:
            raise NotFound("project", project_id)
        return found[0]

    def states(self, *, timeout: float = 5.0) -> list[ProjectState]:
        """Every retained project state."""
        found = _valid(ProjectState, self._retained(topics.ALL_PROJECT_STATES, timeout))
        return sorted(found, key=lambda s: s.stage_timestamps.get("preparation_at", 0))

    def agents(self, *, timeout: float = 5.0) -> list[AgentStatus]:
        """Every agent's retained status (online or not)."""
        found = _valid(AgentStatus, self._retained(topics.ALL_AGENT_STATUS, timeout))
        return sorted(found, key=lambda a: a.agent_id)

    def _retained(self, wildcard: str, timeout: float) -> list[bytes]:
        """Retained payloads under ``wildcard``. A marker published after subscribing arrives after all of
        them (the broker handles one connection in order), so no quiet period is needed."""
        # Again: a filter this client read before (cancel reads the state first) delivers its retained messages
        # only on a new SUBSCRIBE.
        self.bus.subscribe([wildcard], again=True)
        marker = self._marker()
        found: dict[str, bytes] = {}
        for message in self._messages(timeout):
            if message.topic == marker:
                return list(found.values())
            if message.payload:
                found[message.topic] = message.payload
        raise TimedOut(f"retained messages under {wildcard}", timeout)

    def follow(self, project_id: str, *, timeout: float) -> Iterator[ProjectState | ProjectEvent]:
        """States and events of one project until it is finished (or ``timeout`` passes). An event whose
        ``seq`` was already yielded (the manager re-publishes its outbox after a crash) is skipped.

        NotFound when the broker holds no state for it (allowing two seconds for one submitted just now).
        """
        self.bus.subscribe([topics.project_state_any(project_id), topics.project_events_any(project_id)])
        marker = self._marker()
        deadline = time.monotonic() + timeout
        seen_state = False
        seen_seqs: set[int] = set()
        unknown_after: float | None = None
        while (left := deadline - time.monotonic()) > 0:
            if unknown_after is not None and not seen_state and time.monotonic() > unknown_after:
                raise NotFound("project", project_id)
            try:
                message = self.bus.inbox.get(timeout=min(left, 0.25))
            except queue.Empty:
                continue
            if message.topic == marker:
                # Retained messages precede the marker: no state by now means no such project.
                unknown_after = time.monotonic() + 2.0
            elif not message.payload or (parsed := topics.parse(message.topic)).ident != project_id:
                continue
            elif parsed.kind == "events":
                event = ProjectEvent.model_validate_json(message.payload)
                if event.seq not in seen_seqs:
                    seen_seqs.add(event.seq)
                    yield event
            elif parsed.kind == "state":
                state = ProjectState.model_validate_json(message.payload)
                seen_state = True
                yield state
                if state.stage is Stage.FINISHED:
                    return
        raise TimedOut(f"end of project {project_id}", timeout)

    def _marker(self) -> str:
        """Subscribe to and publish a private marker; it arrives after every retained message of the
        subscriptions made before it (the broker handles one connection's packets in order). Under the
        client's username when it has one: the production ACL grants ``flops/v1/clients/<username>/#``."""
        owner = self.username or self.bus.options.client_id
        marker = f"{topics.client_scratch(owner)}/marker/{new_id('m')}"
        self.bus.subscribe([marker])
        self.bus.publish(marker, b"end", qos=1)
        return marker

    def _messages(self, timeout: float) -> Iterator[Inbound]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                yield self.bus.inbox.get(timeout=left)
            except queue.Empty:
                return


M = TypeVar("M", bound=BaseModel)


def _valid(model: type[M], payloads: list[bytes]) -> list[M]:
    """Parse what parses; a foreign or stale retained message is skipped, not fatal."""
    out = []
    for payload in payloads:
        try:
            out.append(model.model_validate_json(payload))
        except ValidationError:
            continue
    return out
