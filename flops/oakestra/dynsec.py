"""Per-project broker identities for actors on Oakestra, made through Mosquitto's dynamic-security plugin.

An actor on Oakestra reports itself over MQTT (:mod:`flops.oakestra.shim`), so its service environment carries
a broker password. One shared identity would let any actor report as any seat of any project; instead the
adapter, holding a dynamic-security admin identity, gives each project its own client ``flops-actor-<project>``
(random password) with a role ``flops-actor-<project>`` that may publish only the reports of the seats that
project's commands went to (one ``publishClientSend`` ACL per seat, added when a command is placed there) and
nothing else: the plugin's default denies every other publish and subscribe. The client and role go when the
project's application does. Commands travel on ``$CONTROL/dynamic-security/v1`` and their answers come on its
``/response`` topic (Mosquitto's documented control API); this module sends them and waits, bounded, for the
answers. Passwords are never logged.
"""

from __future__ import annotations

import json
import queue
import secrets
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import structlog

from flops import topics
from flops.bus import Bus, BusOptions
from flops.errors import FlopsError
from flops.settings import BrokerAddress

log = structlog.get_logger(__name__)

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"
PREFIX = "flops-actor-"
PASSWORD_BYTES = 24
# Answers that mean "already as wanted": a create repeated after a restart, a delete of what is gone.
_ALREADY = ("already exists", "not found")


class DynSecError(FlopsError):
    """The broker refused a dynamic-security command, or did not answer it in time."""

    def __init__(self, command: str, reason: str) -> None:
        super().__init__(f"dynamic-security {command}: {reason}")
        self.command = command
        self.reason = reason


def username(project_id: str) -> str:
    """The broker client (and role) name of a project's actors."""
    return f"{PREFIX}{project_id}"


def new_password() -> str:
    return secrets.token_urlsafe(PASSWORD_BYTES)


def report_acl(project_id: str, seat_id: str) -> dict[str, Any]:
    """The one right a seat adds to a project's role: publishing that seat's reports."""
    return {
        "command": "addRoleACL",
        "rolename": username(project_id),
        "acltype": "publishClientSend",
        "topic": topics.agent_reports(seat_id),
        "priority": 0,
        "allow": True,
    }


def project_commands(project_id: str, password: str) -> list[dict[str, Any]]:
    """Create (or, when it exists, re-key) a project's actor client with its own role, which allows nothing yet."""
    name = username(project_id)
    return [
        {"command": "createRole", "rolename": name, "textname": f"FLOps actors of project {project_id}"},
        {"command": "createClient", "username": name, "password": password, "roles": [{"rolename": name}]},
        # An existing client (a restarted adapter re-creating what it adopted) gets the password its services hold.
        {"command": "setClientPassword", "username": name, "password": password},
    ]


def delete_commands(project_id: str) -> list[dict[str, Any]]:
    name = username(project_id)
    return [{"command": "deleteClient", "username": name}, {"command": "deleteRole", "rolename": name}]


class DynSec:
    """A dynamic-security admin connection: sends command batches and waits for their answers."""

    def __init__(
        self,
        address: BrokerAddress,
        *,
        client_id: str = "flops-oakestra-dynsec",
        timeout_s: float = 10.0,
        tls: Mapping[str, str | None] | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        self.bus = Bus(
            address,
            BusOptions(client_id=client_id, subscriptions=[RESPONSE_TOPIC], **dict(tls or {})),  # type: ignore[arg-type]
        )
        self.log = log.bind(client_id=client_id, broker=address.url)

    def connect(self) -> DynSec:
        self.bus.connect(self.timeout_s)
        return self

    def close(self) -> None:
        self.bus.close()

    def execute(self, commands: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Run ``commands`` in order; their answers. Raises on the first error that is not "already so"."""
        batch = uuid.uuid4().hex
        sent = [{**command, "correlationData": f"{batch}.{i}"} for i, command in enumerate(commands)]
        self.bus.publish_wait(CONTROL_TOPIC, json.dumps({"commands": sent}).encode(), timeout=self.timeout_s)
        answers: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + self.timeout_s
        while len(answers) < len(sent):
            left = deadline - time.monotonic()
            if left <= 0:
                raise DynSecError(str(commands[0].get("command")), f"no answer within {self.timeout_s} s")
            try:
                message = self.bus.inbox.get(timeout=left)
            except queue.Empty:
                continue
            try:
                responses = json.loads(message.payload).get("responses", [])
            except (ValueError, AttributeError):
                continue
            for response in responses:
                if str(response.get("correlationData", "")).startswith(f"{batch}."):
                    answers[response["correlationData"]] = response
        out = [answers[command["correlationData"]] for command in sent]
        for command, answer in zip(sent, out, strict=True):
            error = answer.get("error")
            if error and not any(text in str(error).lower() for text in _ALREADY):
                raise DynSecError(str(command["command"]), str(error))
        return out

    def ensure_project(self, project_id: str, password: str) -> None:
        """The project's actor client exists with ``password`` and its own role (idempotent)."""
        self.execute(project_commands(project_id, password))
        self.log.info("actor identity ready", project_id=project_id, username=username(project_id))

    def allow_seat(self, project_id: str, seat_id: str) -> None:
        self.execute([report_acl(project_id, seat_id)])

    def delete_project(self, project_id: str) -> None:
        """The project's actor client and role are gone; connected actors are disconnected by the broker."""
        self.execute(delete_commands(project_id))
        self.log.info("actor identity deleted", project_id=project_id, username=username(project_id))

    def projects(self) -> list[str]:
        """The projects that have an actor client on the broker."""
        (answer,) = self.execute([{"command": "listClients", "verbose": False}])
        names = answer.get("data", {}).get("clients", [])
        return sorted(str(name)[len(PREFIX) :] for name in names if str(name).startswith(PREFIX))
