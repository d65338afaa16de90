"""The typed errors of FLOps: facts as attributes, mapped to exit codes only at the edge (the CLI)."""

from __future__ import annotations


class FlopsError(Exception):
    """Base of every error FLOps raises on purpose."""

    exit_code = 1


class ConfigError(FlopsError):
    """A setting is missing or unusable (bad broker URL, unreadable file)."""

    exit_code = 78


class BrokerUnavailable(FlopsError):
    """The MQTT broker could not be reached or refused us within the deadline."""

    exit_code = 69

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"broker {url} unavailable: {reason}")
        self.url = url
        self.reason = reason


class PublishFailed(FlopsError):
    """paho refused or did not complete a publish (queue full, disconnected, timed out)."""

    def __init__(self, topic: str, reason: str) -> None:
        super().__init__(f"publish to {topic} failed: {reason}")
        self.topic = topic
        self.reason = reason


class StaleWrite(FlopsError):
    """A compare-and-set on a project's stage found another stage: someone else moved it first."""

    def __init__(self, project_id: str, expected: str, found: str | None) -> None:
        super().__init__(f"project {project_id}: expected stage {expected}, found {found}")
        self.project_id = project_id
        self.expected = expected
        self.found = found


class StoreError(FlopsError):
    """The store could not do its job (database locked past its timeout, disk full): infrastructure, not input.
    The manager keeps the messages unacknowledged and retries."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"store unavailable: {reason}")
        self.reason = reason


class NotFound(FlopsError):
    """The named project (or agent) does not exist."""

    exit_code = 4

    def __init__(self, what: str, ident: str) -> None:
        super().__init__(f"{what} {ident} not found")
        self.what = what
        self.ident = ident


class TimedOut(FlopsError):
    """A bounded wait ran out (no reply from the manager, no state retained)."""

    exit_code = 75

    def __init__(self, what: str, seconds: float) -> None:
        super().__init__(f"no {what} within {seconds:g} s")
        self.what = what
        self.seconds = seconds


class BrokerStartFailed(FlopsError):
    """The embedded broker could not be started (no binary, port taken, bad config)."""

    exit_code = 69
