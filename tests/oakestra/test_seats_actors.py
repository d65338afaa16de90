"""The Oakestra adapter's pure parts: which seats the active clusters make, and what a command becomes on Oakestra
(image, command line, environment, size, cluster) or why it cannot run there."""

from __future__ import annotations

import json
from typing import Any

import pytest

from flops.messages import Command, decode_report
from flops.oakestra.actors import (
    MODEL_TOKEN_ENV,
    ActorConfig,
    Refusal,
    actor_spec,
    failure_report,
    reachable,
    service_ip,
    service_name,
)
from flops.oakestra.deploy import ActorSpec
from flops.oakestra.fake_state import cluster_doc
from flops.oakestra.models import Cluster
from flops.oakestra.seats import Seat, seat_id, seats
from flops.runtime.serve import TOKEN_ENV

CONFIG = ActorConfig(
    broker_url="mqtt://broker:1883", broker_username="actor", broker_password="s3cret", builder_image="reg/builder:1"
)
SEAT = Seat("oak-c1", "c1", ("aggregator", "serve", "builder", "learner"))
IMAGES = {"kind": "image", "images": {"learner": "reg/p-learner:abc", "aggregator": "reg/p-aggregator:abc"}}


def cluster(name: str, addons: list[str], **extra: Any) -> Cluster:
    return Cluster.model_validate(cluster_doc({"cluster_name": name, "supported_addons": addons, **extra}, 0))


def command(kind: str, **spec: Any) -> Command:
    return Command(command_id="c-1", project_id="p-1", kind=kind, agent_id="oak-c1", spec=spec)  # type: ignore[arg-type]


def placed(cmd: Command) -> ActorSpec:
    spec = actor_spec(cmd, SEAT, CONFIG)
    assert isinstance(spec, ActorSpec), spec
    return spec


def test_each_active_cluster_is_a_seat_with_roles_from_its_addons_and_one_learner_seat_per_learner_node() -> None:
    found = seats(
        [
            cluster("zeta", []),
            cluster("alpha", ["image-builder", "FLOps-learner", "FLOps-learner"], memory=8000, vcpus=4),
            cluster("off", ["FLOps-learner"], active=False),
        ]
    )

    assert [(s.agent_id, s.cluster, s.roles) for s in found] == [
        ("oak-alpha", "alpha", ("aggregator", "serve", "builder", "learner")),
        ("oak-alpha-2", "alpha", ("learner",)),
        ("oak-zeta", "zeta", ("aggregator", "serve")),
    ]
    assert (found[0].cpus, found[0].memory_mb) == (4, 8000)


def test_only_learner_seats_claim_the_configured_data_tags() -> None:
    learner, aggregator = seats([cluster("a", ["FLOps-learner"]), cluster("b", [])])

    assert learner.status(online=True, data_tags={"digits": 100}).data_tags == {"digits": 100}
    assert aggregator.status(online=True, data_tags={"digits": 100}).data_tags == {}
    assert aggregator.status(online=False, data_tags={}).cluster == "b"


def test_a_cluster_name_an_agent_id_cannot_hold_is_made_safe() -> None:
    assert seat_id("edge cluster/1") == "oak-edge_cluster_1"
    assert seat_id("c1", 3) == "oak-c1-3"


def test_a_learner_runs_the_artifacts_learner_image_on_its_seats_cluster_with_its_token_in_the_environment() -> None:
    learner = {"aggregator_address": "10.30.0.9:19100", "data_tags": ["digits"], "data_token": "tok"}
    spec = placed(command("run_learner", artifact={"details": IMAGES}, **learner))

    assert spec.image == "reg/p-learner:abc"
    assert spec.cluster == "c1" and spec.addon == "FLOps-learner" and not spec.one_shot
    assert spec.cmd[:4] == ("python", "-m", "flops.oakestra.shim", "flops.runtime.learner")
    assert "--aggregator" in spec.cmd and "10.30.0.9:19100" in spec.cmd and "digits" in spec.cmd
    assert spec.env["FLOPS_DATA_TOKEN"] == "tok" and "tok" not in spec.cmd
    assert spec.env["FLOPS_COMMAND_KIND"] == "run_learner"
    assert spec.env["FLOPS_BROKER_URL"] == "mqtt://broker:1883" and spec.env["FLOPS_BROKER_PASSWORD"] == "s3cret"
    assert (spec.env["FLOPS_PROJECT_ID"], spec.env["FLOPS_COMMAND_ID"], spec.env["FLOPS_AGENT_ID"]) == (
        "p-1",
        "c-1",
        "oak-c1",
    )
    assert spec.actor == service_name(command("run_learner")) and spec.actor.startswith("flearner")
    assert (spec.memory, spec.vcpus) == (1000, 1)


def test_a_learner_reads_its_seats_data_server_with_the_configured_node_read_token() -> None:
    """On Oakestra no agent grants the manager's per-project token, so a configured node read token wins."""
    config = ActorConfig(
        broker_url="mqtt://b", data_servers={"oak-c1": "grpc+tcp://127.0.0.1:4001"}, data_token="node-read-token"
    )
    learner = {"aggregator_address": "10.30.0.9:19100", "data_tags": ["digits"], "data_token": "project-tok"}
    cmd = command("run_learner", artifact={"details": IMAGES}, **learner)

    spec = actor_spec(cmd, SEAT, config)
    other = actor_spec(cmd, Seat("oak-c1-2", "c1", ("learner",)), config)

    assert isinstance(spec, ActorSpec) and isinstance(other, ActorSpec)
    assert spec.cmd[spec.cmd.index("--data-server") + 1] == "grpc+tcp://127.0.0.1:4001"
    assert other.cmd[other.cmd.index("--data-server") + 1] == "grpc://127.0.0.1:11027"  # the add-on's default
    assert spec.env["FLOPS_DATA_TOKEN"] == "node-read-token" and "node-read-token" not in spec.cmd


def test_a_build_is_a_one_shot_of_the_builder_image_on_a_cluster_offering_image_builder() -> None:
    spec = placed(command("build", repo_url="https://x/r.git", commit="a" * 40, backend="image"))

    assert spec.image == "reg/builder:1" and spec.one_shot and spec.addon == "image-builder"
    assert spec.cmd[3] == "flops.builder.worker" and spec.cmd[spec.cmd.index("--backend") + 1] == "image"
    assert spec.cmd[spec.cmd.index("--storage-driver") + 1] == "vfs"  # buildah inside the builder image
    assert (spec.memory, spec.vcpus) == (2000, 1)


def test_a_model_image_build_is_a_one_shot_of_the_builder_image_with_buildahs_storage_nested_safely() -> None:
    model = {"model_ref": "oci://reg/acme/model-files@sha256:" + "0" * 64}
    spec = placed(command("build_model_image", artifact={"details": IMAGES}, model=model, customer="acme"))

    assert spec.image == "reg/builder:1" and spec.one_shot and spec.addon == "image-builder"
    assert spec.cmd[3] == "flops.builder.model_image" and spec.cmd[spec.cmd.index("--storage-driver") + 1] == "vfs"
    assert json.loads(spec.cmd[spec.cmd.index("--spec") + 1])["model"] == model


def test_an_aggregator_listens_on_all_interfaces_at_its_port() -> None:
    spec = placed(
        command(
            "run_aggregator",
            artifact={"details": IMAGES},
            port=19100,
            rounds=3,
            min_available_clients=2,
            min_fit_clients=2,
            min_evaluate_clients=2,
            deadline_s=60,
        )
    )

    assert spec.image == "reg/p-aggregator:abc" and spec.addon is None
    assert spec.cmd[spec.cmd.index("--address") + 1] == "0.0.0.0:19100"
    assert spec.cmd[spec.cmd.index("--deadline") + 1] == "60.0"


def test_resources_in_the_spec_size_the_service() -> None:
    sizes = {"resources": {"memory": 4096, "vcpus": 2}}
    training = {"rounds": 1, "min_available_clients": 1, "min_fit_clients": 1, "min_evaluate_clients": 1}
    spec = placed(command("run_aggregator", artifact={"details": IMAGES}, port=1, **training, **sizes))

    assert (spec.memory, spec.vcpus) == (4096, 2)


@pytest.mark.parametrize(
    ("cmd", "config", "reason"),
    [
        (command("run_learner", artifact={"details": {"kind": "env"}}), CONFIG, "run images"),
        (command("build", backend="env"), CONFIG, "FLOPS_ARTIFACTS=image"),
        (command("build", backend="image"), ActorConfig(broker_url="mqtt://b"), "FLOPS_OAKESTRA_BUILDER_IMAGE"),
        (command("serve_model", image_ref="dir:///x"), CONFIG, "needs a model image"),
        (command("run_learner", artifact={"details": IMAGES}, resources={"memory": 0}), CONFIG, "resources.memory"),
        (command("run_learner", artifact={"details": IMAGES}), CONFIG, "spec.aggregator_address: required"),
    ],
)
def test_what_cannot_run_on_oakestra_is_refused_with_the_reason(cmd: Command, config: ActorConfig, reason: str) -> None:
    refused = actor_spec(cmd, SEAT, config)

    assert isinstance(refused, Refusal) and reason in refused.reason


@pytest.mark.parametrize(
    ("kind", "report"),
    [
        ("run_learner", "learner.failed"),
        ("build", "build.failed"),
        ("run_aggregator", "training.failed"),
        ("serve_model", "model.failed"),
    ],
)
def test_a_failure_is_the_report_the_stage_waits_for(kind: str, report: str) -> None:
    body = failure_report(command(kind), SEAT, "pull failed", event_suffix="failed")
    decoded = decode_report(json.dumps(body).encode())

    assert decoded.kind == report and decoded.command_id == "c-1" and decoded.event_id == "c-1.oak.failed"
    fields = decoded.model_dump()
    assert fields["reason"] == "pull failed"
    if report == "learner.failed":
        assert fields["agent_id"] == "oak-c1"


def test_a_learner_finds_its_aggregator_at_the_service_ip_the_aggregator_asks_for() -> None:
    training = {"rounds": 1, "min_available_clients": 1, "min_fit_clients": 1, "min_evaluate_clients": 1}
    aggregator = placed(command("run_aggregator", artifact={"details": IMAGES}, port=19100, **training))
    address = SEAT.status(online=True, data_tags={}).host + ":19100"  # what the learners stage tells learners
    learner = placed(command("run_learner", artifact={"details": IMAGES}, aggregator_address=address))

    ip = service_ip("p-1", "oak-c1", 19100)
    assert address == "oak-c1.oakestra:19100" and ip.startswith("10.30.")
    assert aggregator.rr_ip == ip and aggregator.env["FLOPS_ADVERTISE_HOST"] == ip
    assert f"{ip}:19100" in learner.cmd
    assert service_ip("p-2", "oak-c1", 19100) != ip  # another project's aggregator there: another address


def test_addresses_outside_oakestra_stay_what_they_are_and_a_cluster_aggregator_finds_its_root() -> None:
    assert reachable("192.168.1.5:19100", "p-1") == "192.168.1.5:19100"
    assert reachable("oak-c1.oakestra", "p-1") == "oak-c1.oakestra"
    training = {"rounds": 1, "min_available_clients": 1, "min_fit_clients": 1, "min_evaluate_clients": 1}
    hierarchy = {"cluster": "c1", "root_address": "oak-root.oakestra:19200"}
    spec = placed(command("run_aggregator", artifact={"details": IMAGES}, port=19100, **training, **hierarchy))

    assert spec.cmd[spec.cmd.index("--root-address") + 1] == f"{service_ip('p-1', 'oak-root', 19200)}:19200"
    assert "FLOPS_MODEL_FILES" not in spec.env  # a cluster aggregator's model is the root's business


def test_the_projects_aggregator_is_told_where_its_model_files_go_in_its_customers_namespace() -> None:
    training = {"rounds": 1, "min_available_clients": 1, "min_fit_clients": 1, "min_evaluate_clients": 1}
    config = ActorConfig(broker_url="mqtt://b", registry="reg.example:5000", registry_tls=True)
    spec = actor_spec(
        command("run_aggregator", artifact={"details": IMAGES}, port=19100, customer="Acme", **training), SEAT, config
    )

    assert isinstance(spec, ActorSpec)
    assert spec.env["FLOPS_MODEL_FILES"] == "reg.example:5000/acme/model-files:p-1"
    assert spec.env["FLOPS_REGISTRY_TLS"] == "1"


def test_a_model_server_reports_its_url_at_the_service_ip_it_asks_for_and_gets_its_token_privately() -> None:
    spec = placed(command("serve_model", image_ref="image://reg/acme/trained_model:p-1", token="t0ken"))

    ip = service_ip("p-1", "oak-c1", 8080)
    assert spec.image == "reg/acme/trained_model:p-1" and not spec.one_shot
    assert spec.rr_ip == ip and spec.cmd[spec.cmd.index("--advertise-host") + 1] == ip
    assert spec.cmd[spec.cmd.index("--host") + 1] == "0.0.0.0" and spec.cmd[spec.cmd.index("--port") + 1] == "8080"
    assert spec.env[MODEL_TOKEN_ENV] == "t0ken" and "t0ken" not in " ".join(spec.cmd)
    assert MODEL_TOKEN_ENV == TOKEN_ENV  # the variable the model server reads
