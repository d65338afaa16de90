"""Every MQTT topic FLOps uses, built in one place (versioned under ``flops/v1``)."""

from __future__ import annotations

from typing import NamedTuple

PREFIX = "flops/v1"


def requests(customer: str) -> str:
    """A customer publishes project requests here (the customer is the MQTT username; the ACL binds them)."""
    return f"{PREFIX}/customers/{_segment(customer)}/requests"


def request_reply(customer: str, request_id: str) -> str:
    """The manager's answer to one request (project id or field errors), readable by that customer only."""
    return f"{PREFIX}/customers/{_segment(customer)}/requests/{_segment(request_id)}/reply"


def project_state(customer: str, project_id: str) -> str:
    """Retained: the project's current stage, outcome and progress."""
    return f"{PREFIX}/customers/{_segment(customer)}/projects/{_segment(project_id)}/state"


def project_events(customer: str, project_id: str) -> str:
    """Every stage change, round result, warning and rejected message of one project."""
    return f"{PREFIX}/customers/{_segment(customer)}/projects/{_segment(project_id)}/events"


def project_cancel(customer: str, project_id: str) -> str:
    """The project's customer (or an operator) asks the manager to cancel it here."""
    return f"{PREFIX}/customers/{_segment(customer)}/projects/{_segment(project_id)}/cancel"


def reply_namespace(customer: str) -> str:
    """Where a customer's MQTT 5 response topics may point: its own replies, nowhere else."""
    return f"{PREFIX}/customers/{_segment(customer)}/requests/"


def client_scratch(name: str) -> str:
    """A client's private topics (the CLI's end-of-retained marker), under its username or client id."""
    return f"{PREFIX}/clients/{_segment(name)}"


def agent_status(agent_id: str) -> str:
    """Retained birth / last will of one agent, with its capabilities."""
    return f"{PREFIX}/agents/{_segment(agent_id)}/status"


def agent_commands(agent_id: str) -> str:
    """The manager's commands for one agent."""
    return f"{PREFIX}/agents/{_segment(agent_id)}/commands"


def agent_reports(agent_id: str) -> str:
    """An agent's reports (its own and its children's) to the manager; the topic names the sender."""
    return f"{PREFIX}/agents/{_segment(agent_id)}/reports"


def agent_receipts(agent_id: str) -> str:
    """An agent tells the manager which commands it has recorded (the manager stops re-sending them)."""
    return f"{PREFIX}/agents/{_segment(agent_id)}/receipts"


def agent_acks(agent_id: str) -> str:
    """The manager tells an agent which of its reports are committed (the agent stops re-sending them)."""
    return f"{PREFIX}/agents/{_segment(agent_id)}/acks"


def manager_status() -> str:
    """Retained: ``online`` while a manager runs (birth), ``offline`` when it stops or dies (last will)."""
    return f"{PREFIX}/manager/status"


def errors() -> str:
    """Rejections the manager cannot attribute to any project or request."""
    return f"{PREFIX}/errors"


# Subscription wildcards. A customer may subscribe to them too: the broker delivers only what its ACL lets
# that customer read (Mosquitto checks read access per message), so reads need not know the customer.
ALL_REQUESTS = f"{PREFIX}/customers/+/requests"
ALL_CANCELS = f"{PREFIX}/customers/+/projects/+/cancel"
ALL_AGENT_REPORTS = f"{PREFIX}/agents/+/reports"
ALL_AGENT_RECEIPTS = f"{PREFIX}/agents/+/receipts"
ALL_AGENT_STATUS = f"{PREFIX}/agents/+/status"
ALL_PROJECT_STATES = f"{PREFIX}/customers/+/projects/+/state"
ALL_PROJECT_EVENTS = f"{PREFIX}/customers/+/projects/+/events"


def project_state_any(project_id: str) -> str:
    """One project's state, whoever its customer is."""
    return f"{PREFIX}/customers/+/projects/{_segment(project_id)}/state"


def project_events_any(project_id: str) -> str:
    return f"{PREFIX}/customers/+/projects/{_segment(project_id)}/events"


class Parsed(NamedTuple):
    """What a topic says: its kind, the id it names (project, agent or request) and, for customer topics, the
    customer."""

    kind: str
    ident: str | None = None
    customer: str | None = None


def parse(topic: str) -> Parsed:
    """``Parsed("cancel", "p-1", "alice")``, ``Parsed("agent_reports", "node-1")``, ``Parsed("unknown")``."""
    parts = topic.split("/")
    if parts[:2] != PREFIX.split("/"):
        return Parsed("unknown")
    rest = parts[2:]
    if len(rest) == 3 and rest[0] == "customers" and rest[2] == "requests":
        return Parsed("requests", None, rest[1])
    if len(rest) == 5 and rest[0] == "customers" and rest[2] == "requests" and rest[4] == "reply":
        return Parsed("reply", rest[3], rest[1])
    if len(rest) == 5 and rest[0] == "customers" and rest[2] == "projects" and rest[4] in {"state", "events", "cancel"}:
        return Parsed(rest[4], rest[3], rest[1])
    if len(rest) == 3 and rest[0] == "agents" and rest[2] in {"status", "commands", "reports", "receipts", "acks"}:
        return Parsed(f"agent_{rest[2]}", rest[1])
    return Parsed("unknown")


def _segment(value: str) -> str:
    """Refuse ids that would change the topic's shape (wildcards, separators, empty)."""
    if not value or any(ch in value for ch in "/+#\x00"):
        raise ValueError(f"not a valid topic segment: {value!r}")
    return value
