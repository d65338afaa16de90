"""What an agent command becomes on Oakestra: the service that runs its actor, and the report its failure is.

A FLOps agent turns ``build``, ``run_learner``, ``run_aggregator``, ``build_model_image`` and ``serve_model`` into
child processes or containers (:mod:`flops.agent`); on Oakestra each becomes one service of the project's
application running the artifact's image. Its ``cmd`` is the actor's command line (the modules and flags the agent
uses) run by :mod:`flops.oakestra.shim`, which publishes the actor's report lines itself; its ``environment`` is
what the shim needs for that: the broker as actors reach it, the project, the command, the seat it reports as.
Secrets (broker password, data token, the model server's bearer token) go into the environment, never on a
command line. The project's aggregator is told where its model files go (:mod:`flops.runtime.model_files`: its
container takes them along when it ends), and the model builder pulls them from there. A model server asks for a
service IP derived like an aggregator's and reports its URL at it, so the project's ``model_url`` is where users
reach it through Oakestra, not the container's own address. Pure: no IO;
:mod:`flops.oakestra.adapter` acts on the result.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flops.builder import containerfile as cf
from flops.messages import Command
from flops.oakestra.deploy import ActorEvent, ActorSpec, EventKind
from flops.oakestra.seats import BUILDER_ADDON, HOST_SUFFIX, LEARNER_ADDON, Seat
from flops.oakestra.shim import (  # what the shim reads, set here
    ENV_ADVERTISE_HOST,
    ENV_AGENT,
    ENV_BROKER_CA_PEM,
    ENV_BROKER_PASSWORD,
    ENV_BROKER_URL,
    ENV_BROKER_USERNAME,
    ENV_COMMAND,
    ENV_KIND,
    ENV_MODEL_FILES,
    ENV_PROJECT,
    ENV_REGISTRY_CA_PEM,
    ENV_REGISTRY_TLS,
)
from flops.runtime import model_files
from flops.runtime.reports import FAILURE_KIND

SHIM = "flops.oakestra.shim"  # runs the actor and publishes its report lines (no agent forwards them)

# Service names start with what the actor is (the fake System Manager's scripts match on it; a person reading
# ``oak service list`` too) and end with a digest of the command, unique within the project.
SERVICE_PREFIX = {
    "build": "builder",
    "run_learner": "flearner",
    "run_aggregator": "aggregator",
    "build_model_image": "modelbuilder",
    "serve_model": "server",
}
# What of an actor's placement the project's watchers are told (as ``actor.placed`` reports); a failure becomes the
# command's failure report instead, a deletion follows the project's own stop.
PLACEMENT_NEWS = frozenset({EventKind.SCHEDULED, EventKind.PLACED, EventKind.RUNNING, EventKind.RESTARTED})
WORKDIR = "/tmp/flops"  # inside the container: scratch space of the actor
SERVE_PORT = 8080
MODEL_TOKEN_ENV = "FLOPS_MODEL_TOKEN"  # flops.runtime.serve.TOKEN_ENV (that module needs numpy: not the manager's)


@dataclass(frozen=True)
class Size:
    memory: int  # MB
    vcpus: int


@dataclass(frozen=True)
class ActorConfig:
    """What every actor on Oakestra is given, from the manager's settings."""

    broker_url: str
    broker_username: str | None = None
    broker_password: str | None = field(default=None, repr=False)
    broker_ca_pem: str | None = None  # a TLS broker's CA certificate, handed to actors in their environment
    registry_ca_pem: str | None = None  # the CA of a TLS registry's certificate, likewise
    builder_image: str | None = None
    registry: str = "127.0.0.1:5000"
    registry_tls: bool = False
    data_server: str = "grpc://127.0.0.1:11027"
    data_servers: Mapping[str, str] = field(default_factory=dict)  # per seat, else data_server
    # The read token learners present to their node's data server. The manager's per-project token (the spec's)
    # is granted by an agent's data server when it starts a learner; on Oakestra no agent does, so a configured
    # node read token comes first.
    data_token: str | None = field(default=None, repr=False)
    # Where a model server listens in its container; users reach it at its service IP on this port.
    serve_port: int = SERVE_PORT
    # Per command kind, unless the command's spec says ``resources: {memory, vcpus}`` (the SLA's constraints).
    sizes: Mapping[str, Size] = field(
        default_factory=lambda: {
            "build": Size(2000, 1),
            "build_model_image": Size(2000, 1),
            "run_learner": Size(1000, 1),
            "run_aggregator": Size(1000, 1),
            "serve_model": Size(500, 1),
        }
    )


@dataclass(frozen=True)
class Refusal:
    """The command cannot run on Oakestra; ``reason`` goes to the user in the command's failure report."""

    reason: str


def service_name(cmd: Command) -> str:
    digest = hashlib.sha256(cmd.command_id.encode()).hexdigest()[:12]
    return f"{SERVICE_PREFIX[cmd.kind]}{digest}"


def service_ip(project_id: str, seat_id: str, port: int) -> str:
    """The service IP of the aggregator a project runs on a seat at a port: derived, so learners started before
    it know where it will be (in 10.30/16, Oakestra's range for round-robin service IPs)."""
    digest = hashlib.sha256(f"{project_id}|{seat_id}|{port}".encode()).digest()
    return f"10.30.{digest[0]}.{digest[1] % 254 + 1}"


def reachable(address: str, project_id: str) -> str:
    """``host:port`` as a service on Oakestra reaches it: a seat's host name becomes the service IP of the
    project's aggregator there; any other address stays what it is."""
    host, sep, port = address.rpartition(":")
    if not sep or not host.endswith(HOST_SUFFIX) or not port.isdigit():
        return address
    return f"{service_ip(project_id, host.removesuffix(HOST_SUFFIX), int(port))}:{port}"


def actor_spec(cmd: Command, seat: Seat, config: ActorConfig) -> ActorSpec | Refusal:
    """The service that runs ``cmd`` on ``seat``'s cluster, or why there is none."""
    if cmd.kind not in SERVICE_PREFIX:
        return Refusal(f"{cmd.kind} is not an actor")
    spec = cmd.spec
    env = {
        ENV_BROKER_URL: config.broker_url,
        ENV_PROJECT: cmd.project_id,
        ENV_COMMAND: cmd.command_id,
        ENV_KIND: cmd.kind,
        ENV_AGENT: seat.agent_id,
        "PYTHONUNBUFFERED": "1",
    }
    if config.broker_username:
        env[ENV_BROKER_USERNAME] = config.broker_username
    if config.broker_password:
        env[ENV_BROKER_PASSWORD] = config.broker_password
    if config.broker_ca_pem:
        env[ENV_BROKER_CA_PEM] = config.broker_ca_pem
    size = _size(cmd.kind, spec.get("resources"), config)
    if isinstance(size, Refusal):
        return size
    try:
        rr_ip = _service_address(cmd, seat, config)
        made = _command_line(cmd, seat, config, env, rr_ip)
    except KeyError as exc:  # the spec lacks what the actor needs: the user sees which field
        return Refusal(f"spec.{exc.args[0]}: required for {cmd.kind} on Oakestra")
    if isinstance(made, Refusal):
        return made
    image, argv, addon = made
    if rr_ip:
        env[ENV_ADVERTISE_HOST] = rr_ip
    return ActorSpec(
        project_id=cmd.project_id,
        actor=service_name(cmd),
        image=image,
        cmd=("python", "-m", SHIM, *argv),
        env=env,
        memory=size.memory,
        vcpus=size.vcpus,
        one_shot=cmd.kind in ("build", "build_model_image"),
        addon=addon,
        cluster=seat.cluster,
        rr_ip=rr_ip,
    )


def _service_address(cmd: Command, seat: Seat, config: ActorConfig) -> str | None:
    """The service IP an actor asks for: an aggregator the one its learners were told (:func:`reachable`), a model
    server one derived the same way, which it reports as its URL (the user's way in); others need none."""
    if cmd.kind == "run_aggregator":
        return service_ip(cmd.project_id, seat.agent_id, int(cmd.spec["port"]))
    if cmd.kind == "serve_model":
        return service_ip(cmd.project_id, seat.agent_id, config.serve_port)
    return None


def _command_line(
    cmd: Command, seat: Seat, config: ActorConfig, env: dict[str, str], rr_ip: str | None
) -> tuple[str, list[str], str | None] | Refusal:
    """(image, ``python -m`` arguments, the add-on its cluster must offer) of each kind, as :mod:`flops.agent`
    builds them for a container; ``rr_ip`` is the service IP it asks for (:func:`_service_address`)."""
    spec = cmd.spec
    registry = ["--registry", config.registry, *(["--registry-tls"] if config.registry_tls else [])]
    if cmd.kind in ("build", "build_model_image"):
        if not config.builder_image:
            return Refusal(f"{cmd.kind} on Oakestra needs a builder image (FLOPS_OAKESTRA_BUILDER_IMAGE)")
        if cmd.kind == "build" and spec.get("backend") != "image":
            return Refusal("builds on Oakestra make images: set FLOPS_ARTIFACTS=image on the manager")
        module = "flops.builder.worker" if cmd.kind == "build" else "flops.builder.model_image"
        # buildah in the builder image keeps vfs storage (no overlay on the container's own overlay).
        argv = [module, "--spec", json.dumps(spec), "--workdir", WORKDIR, *registry, "--storage-driver", "vfs"]
        argv += ["--backend", "image"] if cmd.kind == "build" else []
        return config.builder_image, argv, BUILDER_ADDON
    if cmd.kind == "serve_model":
        ref = str(spec.get("image_ref", ""))
        if not ref.startswith("image://"):
            return Refusal(f"serve_model on Oakestra needs a model image, not {ref or 'nothing'}")
        argv = ["flops.runtime.mlflow_serve", "--model", cf.MODEL_DIR, "--host", "0.0.0.0"]
        argv += ["--port", str(config.serve_port), "--advertise-host", str(rr_ip)]  # its URL: the service IP
        if spec.get("token"):  # the project's bearer token: a secret, so in the environment
            env[MODEL_TOKEN_ENV] = str(spec["token"])
        return ref.removeprefix("image://"), argv, None
    image = _role_image(spec, "learner" if cmd.kind == "run_learner" else "aggregator")
    if isinstance(image, Refusal):
        return image
    if cmd.kind == "run_learner":
        from flops.data.client import DATA_TOKEN_ENV

        if token := config.data_token or spec.get("data_token"):
            env[DATA_TOKEN_ENV] = str(token)
        tags = ",".join(spec.get("data_tags", []))
        aggregator = reachable(str(spec["aggregator_address"]), cmd.project_id)
        argv = ["flops.runtime.learner", "--repo", cf.REPO_DIR, "--aggregator", aggregator]
        data_server = config.data_servers.get(seat.agent_id, config.data_server)
        argv += ["--data-server", data_server, "--data-tags", tags, "--work-dir", WORKDIR]
        return image, argv, LEARNER_ADDON
    if "cluster" not in spec:  # the project's (root) aggregator: its model must outlive its container
        customer = str(spec.get("customer") or "default")
        env[ENV_MODEL_FILES] = model_files.target(config.registry, customer, cmd.project_id)
        if config.registry_tls:
            env[ENV_REGISTRY_TLS] = "1"
            if config.registry_ca_pem:
                env[ENV_REGISTRY_CA_PEM] = config.registry_ca_pem
    return image, _aggregator_argv(spec, cmd.project_id), None


def _aggregator_argv(spec: Mapping[str, Any], project_id: str) -> list[str]:
    argv = ["flops.runtime.aggregator", "--repo", cf.REPO_DIR, "--rounds", str(spec["rounds"])]
    for key in ("min_available_clients", "min_fit_clients", "min_evaluate_clients"):
        argv += ["--" + key.replace("_", "-"), str(spec[key])]
    argv += ["--strategy", str(spec.get("strategy", "fedavg"))]
    argv += ["--strategy-params", json.dumps(spec.get("strategy_params", {}))]
    flags = {"deadline_s": "--deadline", "round_timeout_s": "--round-timeout", "client_wait_s": "--client-wait-timeout"}
    argv += [arg for key, flag in flags.items() if key in spec for arg in (flag, str(float(spec[key])))]
    if "cluster" in spec:
        argv += ["--cluster", str(spec["cluster"]), "--root-address", reachable(str(spec["root_address"]), project_id)]
    argv += ["--address", f"0.0.0.0:{spec['port']}", "--model-out", f"{WORKDIR}/model"]
    return [*argv, "--work-dir", f"{WORKDIR}/flower"]


def _role_image(spec: Mapping[str, Any], role: str) -> str | Refusal:
    details = spec.get("artifact", {}).get("details", {})
    if details.get("kind") != "image":
        return Refusal(f"{role}s on Oakestra run images: the project's artifact is no image (FLOPS_ARTIFACTS=image)")
    image = details.get("images", {}).get(role)
    return str(image) if image else Refusal(f"the project's artifact has no {role} image")


def _size(kind: str, resources: object, config: ActorConfig) -> Size | Refusal:
    default = config.sizes.get(kind, Size(1000, 1))
    if resources is None:
        return default
    if not isinstance(resources, dict):
        return Refusal(f"resources: expected {{memory, vcpus}}, got {type(resources).__name__}")
    memory, vcpus = resources.get("memory", default.memory), resources.get("vcpus", default.vcpus)
    for name, value in (("memory", memory), ("vcpus", vcpus)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            return Refusal(f"resources.{name}: expected a positive integer, got {value!r}")
    return Size(int(memory), int(vcpus))


def failure_report(cmd: Command, seat: Seat, reason: str, *, event_suffix: str) -> dict[str, Any]:
    """The report an agent would send when the command's actor failed: the kind the stage waits for, naming the
    seat as the learner's agent. ``event_suffix`` makes its id deterministic (a re-send is recognised)."""
    kind = FAILURE_KIND.get(cmd.kind, "command.failed")
    body: dict[str, Any] = {
        "event_id": f"{cmd.command_id}.oak.{event_suffix}",
        "project_id": cmd.project_id,
        "source": f"oakestra/{seat.agent_id}",
        "command_id": cmd.command_id,
        "kind": kind,
        "reason": reason,
    }
    if kind == "learner.failed":
        body["agent_id"] = seat.agent_id
    return body


def placement_report(cmd: Command, seat: Seat, event: ActorEvent) -> dict[str, Any]:
    """The ``actor.placed`` report of one placement event of the command's actor. Its id is deterministic per
    instance and step (a restarted adapter that adopts the actor sees the same steps again: the manager drops
    them as repeats); each restart has its own (its reason counts the failures)."""
    instance = "" if event.instance is None else f" instance {event.instance}"
    where = {
        EventKind.SCHEDULED: f"scheduled on cluster {event.cluster}",
        EventKind.PLACED: f"placed on node {event.node}",
        EventKind.RUNNING: f"running on node {event.node}",
        EventKind.RESTARTED: f"restarted by Oakestra: {event.reason}",
    }.get(event.kind, str(event.kind))
    step = f"{event.kind}.{event.instance if event.instance is not None else 'x'}"
    if event.kind is EventKind.RESTARTED:
        step += "." + hashlib.sha256((event.reason or "").encode()).hexdigest()[:8]
    return {
        "event_id": f"{cmd.command_id}.oak.{step}",
        "project_id": cmd.project_id,
        "source": f"oakestra/{seat.agent_id}",
        "command_id": cmd.command_id,
        "kind": "actor.placed",
        "actor": event.actor,
        "what": str(event.kind),
        "message": f"{event.actor}{instance} ({cmd.kind} on {seat.agent_id}): {where}",
        "cluster": event.cluster,
        "node": event.node,
    }
