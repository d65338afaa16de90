"""Every MQTT topic FLOps uses, built in one place (versioned under ``flops/v1``)."""

from __future__ import annotations

PREFIX = "flops/v1"


def requests() -> str:
    """Clients publish project requests here."""
    return f"{PREFIX}/projects/requests"


def request_reply(request_id: str) -> str:
    """The manager's answer to one request (project id or field errors)."""
    return f"{PREFIX}/projects/requests/{_segment(request_id)}/reply"


def project_state(project_id: str) -> str:
    """Retained: the project's current stage, outcome and progress."""
    return f"{PREFIX}/projects/{_segment(project_id)}/state"


def project_events(project_id: str) -> str:
    """Every stage change, round result, warning and rejected message of one project."""
    return f"{PREFIX}/projects/{_segment(project_id)}/events"


def project_cancel(project_id: str) -> str:
    """Clients ask the manager to cancel a project here."""
    return f"{PREFIX}/projects/{_segment(project_id)}/cancel"


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


# Subscription wildcards.
ALL_CANCELS = f"{PREFIX}/projects/+/cancel"
ALL_AGENT_REPORTS = f"{PREFIX}/agents/+/reports"
ALL_AGENT_RECEIPTS = f"{PREFIX}/agents/+/receipts"
ALL_AGENT_STATUS = f"{PREFIX}/agents/+/status"
ALL_PROJECT_STATES = f"{PREFIX}/projects/+/state"


def parse(topic: str) -> tuple[str, str | None]:
    """Split a topic into (kind, id): ``("reports", "p-1")``, ``("requests", None)``, ``("unknown", None)``."""
    parts = topic.split("/")
    if parts[:2] != PREFIX.split("/"):
        return ("unknown", None)
    rest = parts[2:]
    if rest == ["projects", "requests"]:
        return ("requests", None)
    if len(rest) == 3 and rest[0] == "projects" and rest[2] in {"state", "events", "cancel"}:
        return (rest[2], rest[1])
    if len(rest) == 3 and rest[0] == "agents" and rest[2] in {"status", "commands", "reports", "receipts", "acks"}:
        return (f"agent_{rest[2]}", rest[1])
    if len(rest) == 4 and rest[:2] == ["projects", "requests"] and rest[3] == "reply":
        return ("reply", rest[2])
    return ("unknown", None)


def _segment(value: str) -> str:
    """Refuse ids that would change the topic's shape (wildcards, separators, empty)."""
    if not value or any(ch in value for ch in "/+#\x00"):
        raise ValueError(f"not a valid topic segment: {value!r}")
    return value
