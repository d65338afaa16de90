"""An actor's own reporter inside an Oakestra container: what its agent would otherwise forward.

On a FLOps agent, a learner, aggregator, builder or model server writes report lines to a pipe and the agent turns
them into reports on its ``agents/{id}/reports`` topic. On Oakestra there is no agent, so the service runs
``python -m flops.oakestra.shim <module> <args…>``: the shim starts ``python -m <module> <args…> --report-fd N``
and publishes each line as the same report, on the topic of the seat the command was sent to, with the ids an
agent would give it. A child that exits before reporting an outcome becomes its command's failure report. What it
needs comes from the environment the adapter set (:mod:`flops.oakestra.actors`): broker URL and identity, project,
command and its kind, seat.

An aggregator's container takes its model with it when it ends, so when the adapter names a registry tag for its
model files, the shim pushes the model directory there before it forwards ``training.succeeded``, whose
``model_ref`` then names the pushed files (:mod:`flops.runtime.model_files`, where the model builder service finds
them). Here and not in the aggregator: only the shim knows the aggregator runs in a container that will vanish;
on an agent the same aggregator leaves its model on the host and reports its path, as before.

Exit status: the child's, so Oakestra sees the actor's outcome (a one-shot builder ends COMPLETED or DEAD).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from flops import topics
from flops.bus import Bus, BusOptions
from flops.errors import FlopsError
from flops.messages import decode_report
from flops.registry import RegistryError
from flops.runtime import model_files, reports
from flops.runtime.reports import FAILURE_KIND, TERMINAL
from flops.settings import BrokerAddress

log = structlog.get_logger(__name__)

# What the shim reads (set by flops.oakestra.actors). The shim runs inside the actor's image, which carries the
# runtime's packages only: it imports neither the agent nor the manager nor the Oakestra client.
ENV_BROKER_URL = "FLOPS_BROKER_URL"
ENV_BROKER_USERNAME = "FLOPS_BROKER_USERNAME"
ENV_BROKER_PASSWORD = "FLOPS_BROKER_PASSWORD"
ENV_PROJECT = "FLOPS_PROJECT_ID"
ENV_COMMAND = "FLOPS_COMMAND_ID"
ENV_AGENT = "FLOPS_AGENT_ID"
ENV_KIND = "FLOPS_COMMAND_KIND"
ENV_ADVERTISE_HOST = "FLOPS_ADVERTISE_HOST"  # the aggregator's service IP, for the address it reports
# The broker's CA certificate itself (PEM, public), not a path: the actor's image does not carry the fleet's CA.
ENV_BROKER_CA_PEM = "FLOPS_BROKER_CA_PEM"
# An aggregator's model files go to this registry tag before training.succeeded (flops.runtime.model_files).
ENV_MODEL_FILES = "FLOPS_MODEL_FILES"
ENV_REGISTRY_TLS = "FLOPS_REGISTRY_TLS"  # "1": the registry speaks HTTPS
ENV_REGISTRY_CA_PEM = "FLOPS_REGISTRY_CA_PEM"  # its CA certificate (PEM), when not a public one
HAND_OVER_ATTEMPTS = 3  # a registry that blinks is tried again (1 s, then 2 s later) before the model is given up
PUBLISH_TIMEOUT_S = 30.0  # per report: the broker's PUBACK; a report not acknowledged by then is lost (logged)


@dataclass(frozen=True)
class Identity:
    """Whom the shim reports for, from the service's environment."""

    broker: BrokerAddress
    project_id: str
    command_id: str
    kind: str
    agent_id: str
    advertise_host: str | None = None  # an aggregator's service IP: where others reach what it reports
    ca_pem: str | None = None  # a TLS broker's CA certificate
    model_files: str | None = None  # an aggregator's: where its model files go (registry/repository:tag)
    registry_tls: bool = False
    registry_ca_pem: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Identity:
        names = (ENV_BROKER_URL, ENV_PROJECT, ENV_COMMAND, ENV_KIND, ENV_AGENT)
        missing = [name for name in names if not env.get(name)]
        if missing:
            raise ValueError(f"environment lacks {', '.join(missing)} (set by the Oakestra adapter)")
        address = BrokerAddress.parse(env[ENV_BROKER_URL])
        if env.get(ENV_BROKER_USERNAME):
            address = address.model_copy(
                update={"username": env[ENV_BROKER_USERNAME], "password": env.get(ENV_BROKER_PASSWORD)}
            )
        ids = (env[ENV_PROJECT], env[ENV_COMMAND], env[ENV_KIND], env[ENV_AGENT])
        ca_pem, registry_ca_pem = (_pem(env, name) for name in (ENV_BROKER_CA_PEM, ENV_REGISTRY_CA_PEM))
        return cls(
            address,
            *ids,
            advertise_host=env.get(ENV_ADVERTISE_HOST) or None,
            ca_pem=ca_pem,
            model_files=env.get(ENV_MODEL_FILES) or None,
            registry_tls=env.get(ENV_REGISTRY_TLS) == "1",
            registry_ca_pem=registry_ca_pem,
        )


def _pem(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name) or None
    if value and "BEGIN CERTIFICATE" not in value:
        raise ValueError(f"{name} holds no PEM certificate")
    return value


class Reporter:
    """Publishes the reports of one actor as its seat's, numbered like an agent's (``<command>.r<n>``)."""

    def __init__(self, identity: Identity, bus: Bus, *, registry_ca_file: Path | None = None) -> None:
        self.identity = identity
        self.bus = bus
        self.registry_ca_file = registry_ca_file
        self.lines = 0
        self.terminal = False
        self.log = log.bind(project_id=identity.project_id, command_id=identity.command_id, agent_id=identity.agent_id)

    def line(self, text: str) -> None:
        try:
            kind, payload = reports.decode_report(text)
        except ValueError:
            self.log.warning("unreadable report line", line=text[:200])
            return
        self.lines += 1
        fields = dict(payload)
        if kind == reports.TRAINING_SUCCEEDED and self.identity.model_files:
            kind, fields = self.hand_over(fields, self.identity.model_files)
        self.terminal = self.terminal or kind in TERMINAL
        if kind == reports.AGGREGATOR_STARTED and self.identity.advertise_host and "address" in fields:
            # It listens on every interface of its container; others reach it at its service IP.
            port = str(fields["address"]).rpartition(":")[2]
            fields["address"] = f"{self.identity.advertise_host}:{port}"
        if kind.startswith("learner."):
            fields["agent_id"] = self.identity.agent_id
            fields.pop("node_id", None)
            fields.pop("aggregator", None)
        self.send(kind, fields, f"{self.identity.command_id}.r{self.lines}")

    def hand_over(self, fields: dict[str, Any], to: str) -> tuple[str, dict[str, Any]]:
        """``training.succeeded`` with its model files pushed to the registry (``model_ref`` their ``oci://``
        reference), or ``training.failed`` when they cannot be: the container and its model are about to go."""
        model_ref = Path(str(fields.get("model_ref", "")))
        model_dir = model_ref.parent if model_ref.suffix else model_ref
        error: Exception | None = None
        for attempt in range(HAND_OVER_ATTEMPTS):
            if attempt:
                time.sleep(attempt)  # a retry's back-off, not a synchronisation
            try:
                ref = model_files.push(model_dir, to, tls=self.identity.registry_tls, ca_file=self.registry_ca_file)
            except (RegistryError, OSError) as exc:  # OSError: the registry unreachable, the files unreadable
                error = exc
                self.log.warning("model files not pushed", to=to, attempt=attempt + 1, error=str(exc)[:300])
                continue
            self.log.info("model files pushed", ref=ref, model_dir=str(model_dir))
            return reports.TRAINING_SUCCEEDED, {**fields, "model_ref": ref}
        reason = f"the trained model could not be handed over to the registry ({to}): {error}"
        return reports.TRAINING_FAILED, {"reason": reason[:4000]}

    def exited(self, code: int) -> None:
        """The child is gone: without an outcome reported, that is its command's failure."""
        if self.terminal:
            return
        kind = FAILURE_KIND.get(self.identity.kind, "command.failed")
        fields: dict[str, Any] = {"reason": f"{self.identity.kind} exited with code {code} before reporting an outcome"}
        if kind == "learner.failed":
            fields["agent_id"] = self.identity.agent_id
        self.send(kind, fields, f"{self.identity.command_id}.exit")

    def send(self, kind: str, fields: Mapping[str, Any], event_id: str) -> None:
        body = {
            "event_id": event_id,
            "project_id": self.identity.project_id,
            "source": f"oakestra/{self.identity.agent_id}",
            "command_id": self.identity.command_id,
            "kind": kind,
            **fields,
        }
        try:
            report = decode_report(json.dumps(body).encode())
        except ValueError as exc:
            self.log.warning("dropping malformed report", kind=kind, error=str(exc)[:300])
            return
        try:
            self.bus.publish_wait(
                topics.agent_reports(self.identity.agent_id), report.to_bytes(), timeout=PUBLISH_TIMEOUT_S
            )
        except FlopsError as exc:
            self.log.error("report not delivered", kind=kind, event_id=event_id, error=str(exc)[:300])


def run(argv: Sequence[str], env: Mapping[str, str]) -> int:
    """Run ``python -m argv…`` with a report pipe, publish its lines; the child's exit status."""
    identity = Identity.from_env(env)
    with tempfile.TemporaryDirectory(prefix="flops-shim-") as tmp:
        # paho and urllib read CA certificates from files.
        ca_file, registry_ca_file = (
            _written(Path(tmp) / name, pem)
            for name, pem in (("broker-ca.crt", identity.ca_pem), ("registry-ca.crt", identity.registry_ca_pem))
        )
        options = BusOptions(client_id=f"flops-actor-{identity.command_id}", ca_file=str(ca_file) if ca_file else None)
        bus = Bus(identity.broker, options)
        bus.connect()
        try:
            return _run_child(argv, env, Reporter(identity, bus, registry_ca_file=registry_ca_file))
        finally:
            bus.close()


def _written(path: Path, text: str | None) -> Path | None:
    if text is None:
        return None
    path.write_text(text, encoding="ascii")
    return path


def _run_child(argv: Sequence[str], env: Mapping[str, str], reporter: Reporter) -> int:
    """The actor itself, its report lines published by ``reporter``; its exit status."""
    # The child runs the project's code and never speaks MQTT: it does not get the broker password.
    child_env = {k: v for k, v in env.items() if k != ENV_BROKER_PASSWORD}
    read_fd, write_fd = os.pipe()
    with os.fdopen(read_fd, "r", encoding="utf-8", errors="replace") as stream:
        try:
            child = subprocess.Popen(
                [sys.executable, "-m", *argv, "--report-fd", str(write_fd)], pass_fds=(write_fd,), env=child_env
            )
        finally:
            os.close(write_fd)  # ours closed: the stream ends when the child's copy closes
        for text in stream:
            if text.strip():
                reporter.line(text.strip())
    code = child.wait()
    reporter.exited(code)
    return code


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print("usage: python -m flops.oakestra.shim <module> [args…]", file=sys.stderr)
        return 2
    try:
        return run(args, os.environ)
    except ValueError as exc:
        print(f"flops.oakestra.shim: {exc}", file=sys.stderr)
        return 2
    except FlopsError as exc:  # the broker is unreachable: the actor could not report anything
        print(f"flops.oakestra.shim: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
