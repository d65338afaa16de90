"""The actor-side shim as an Oakestra service would run it: a runtime module's report lines become the seat's
reports over MQTT (what an agent would have forwarded), an exit without an outcome becomes the failure, and an
aggregator's model files reach the model builder through the run's registry."""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flops import topics
from flops.builder.model_image import ModelImageBuilder, parse_spec
from flops.bus import Bus, BusOptions
from flops.messages import new_id
from flops.ports import free_port
from flops.registry import RunningRegistry, start_registry
from flops.runtime import model_files
from flops.settings import BrokerAddress
from tests.certs import fleet_certificates
from tests.oakestra.support import run_shim
from tests.support import REPO_ROOT

END = b"end-of-test"


@pytest.fixture
def reports(broker: BrokerAddress) -> Iterator[tuple[str, Bus]]:
    seat = new_id("oak-shim")
    bus = Bus(broker, BusOptions(client_id=new_id("test-reports"), subscriptions=[topics.agent_reports(seat)]))
    bus.connect()
    yield seat, bus
    bus.close()


def shim(
    broker: BrokerAddress,
    seat: str,
    kind: str,
    script: list[Any],
    tmp_path: Path,
    exit_code: int = 0,
    **extra_env: str,
) -> tuple[str, int]:
    command_id = new_id("c")
    env = {
        "FLOPS_BROKER_URL": broker.url,
        "FLOPS_PROJECT_ID": "p-shim",
        "FLOPS_COMMAND_ID": command_id,
        "FLOPS_COMMAND_KIND": kind,
        "FLOPS_AGENT_ID": seat,
        **extra_env,
    }
    return command_id, run_shim(env, script, tmp_path, exit_code)


def collected(bus: Bus, seat: str, timeout: float = 20.0) -> list[dict[str, Any]]:
    """Every report until our end marker: published after the shim exited, so it comes after all of its."""
    bus.publish_wait(topics.agent_reports(seat), END)
    deadline = time.monotonic() + timeout
    out: list[dict[str, Any]] = []
    while True:
        try:
            message = bus.inbox.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"no end marker within {timeout} s; got {out}") from None
        if message.payload == END:
            return out
        out.append(json.loads(message.payload))


def test_report_lines_become_the_seats_reports_and_an_outcome_ends_it(
    broker: BrokerAddress, reports: tuple[str, Bus], tmp_path: Path
) -> None:
    seat, bus = reports
    script = [
        ["aggregator.started", {"address": "0.0.0.0:19100"}],
        ["round.completed", {"round": 1, "loss": 0.5, "accuracy": 0.9}],
        ["training.succeeded", {"best_round": 1, "loss": 0.5, "accuracy": 0.9, "model_ref": "/tmp/m"}],
    ]
    command_id, code = shim(broker, seat, "run_aggregator", script, tmp_path, FLOPS_ADVERTISE_HOST="10.30.7.9")

    got = collected(bus, seat)

    assert code == 0
    assert [r["kind"] for r in got] == ["aggregator.started", "round.completed", "training.succeeded"]
    assert got[0]["address"] == "10.30.7.9:19100"  # where others reach it, not the interface it listens on
    assert [r["event_id"] for r in got] == [f"{command_id}.r1", f"{command_id}.r2", f"{command_id}.r3"]
    assert {(r["project_id"], r["command_id"], r["source"]) for r in got} == {
        ("p-shim", command_id, f"oakestra/{seat}")
    }


def test_a_learner_that_exits_without_an_outcome_is_reported_failed_as_its_seat(
    broker: BrokerAddress, reports: tuple[str, Bus], tmp_path: Path
) -> None:
    seat, bus = reports
    ready = ["learner.ready", {"node_id": "n", "examples": 5}]
    command_id, code = shim(broker, seat, "run_learner", [ready], tmp_path, exit_code=3)

    got = collected(bus, seat)

    assert code == 3
    assert [r["kind"] for r in got] == ["learner.ready", "learner.failed"]
    assert got[0]["agent_id"] == seat and "node_id" not in got[0]
    assert got[1]["agent_id"] == seat and "before reporting an outcome" in got[1]["reason"]
    assert got[1]["event_id"] == f"{command_id}.exit"


def test_without_its_environment_the_shim_names_what_is_missing(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOPS_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    done = subprocess.run(
        [sys.executable, "-m", "flops.oakestra.shim", "flops.runtime.learner"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 2
    assert "FLOPS_BROKER_URL" in done.stderr and "FLOPS_AGENT_ID" in done.stderr


def test_the_shim_imports_only_what_an_actors_image_carries() -> None:
    """It runs inside the learner/aggregator image (the runtime's packages): not the agent, the manager's state
    machine or the Oakestra client, whose dependencies (transitions, httpx, sh) are not there."""
    probe = "import sys, flops.oakestra.shim; print(' '.join(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True, env=env
    ).stdout.split()

    assert not {"flops.agent", "flops.lifecycle", "flops.oakestra.client", "transitions", "httpx", "sh"} & set(loaded)


def test_an_aggregators_model_files_go_to_the_registry_and_the_model_builder_unpacks_them(
    broker: BrokerAddress, reports: tuple[str, Bus], registry: RunningRegistry, tmp_path: Path
) -> None:
    """The hand-over on Oakestra: the aggregator's container takes its model directory along when it ends, so the
    shim pushes it before training.succeeded goes out and the model builder pulls what the report names."""
    seat, bus = reports
    model_dir = tmp_path / "container" / "model"
    model_dir.mkdir(parents=True)
    np.savez(model_dir / "model.npz", np.arange(6.0).reshape(2, 3), np.ones(2))
    (model_dir / "metrics.json").write_text('{"best_round": 2}')
    succeeded = {"best_round": 2, "loss": 0.3, "accuracy": 0.9, "model_ref": str(model_dir / "model.npz")}
    to = model_files.target(registry.address, "Acme Corp", "p-shim")
    _, code = shim(broker, seat, "run_aggregator", [["training.succeeded", succeeded]], tmp_path, FLOPS_MODEL_FILES=to)
    got = collected(bus, seat)
    shutil.rmtree(model_dir.parent)  # the container is gone

    assert code == 0
    assert [r["kind"] for r in got] == ["training.succeeded"]
    model_ref = got[0]["model_ref"]
    assert model_ref.startswith(f"oci://{registry.address}/acme-corp/model-files@sha256:"), model_ref
    assert registry.client().tags("acme-corp/model-files") == ["p-shim"]
    # The model builder's spec carries the project's model as the aggregation stage recorded it.
    images = {"kind": "image", "images": {"learner": f"{registry.address}/acme/digits/learner:abc"}}
    spec = parse_spec({"artifact": {"details": images}, "model": got[0], "customer": "Acme Corp", "project_id": "p"})
    builder = ModelImageBuilder(registry.address, tmp_path / "builder")
    model_file = builder.model_file(spec)
    assert model_file.name == "model.npz" and (model_file.parent / "metrics.json").read_text() == '{"best_round": 2}'
    with np.load(model_file) as params:
        assert [params[k].tolist() for k in params.files] == [[[0, 1, 2], [3, 4, 5]], [1, 1]]


def test_an_aggregator_whose_model_cannot_be_handed_over_fails_its_training_saying_where_to(
    broker: BrokerAddress, reports: tuple[str, Bus], tmp_path: Path
) -> None:
    seat, bus = reports
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    np.savez(model_dir / "model.npz", np.ones(2))
    nowhere = f"127.0.0.1:{free_port()}"  # no registry listens there
    succeeded = {"best_round": 1, "model_ref": str(model_dir / "model.npz")}
    command_id, code = shim(
        broker,
        seat,
        "run_aggregator",
        [["training.succeeded", succeeded]],
        tmp_path,
        FLOPS_MODEL_FILES=model_files.target(nowhere, "acme", "p-shim"),
    )
    got = collected(bus, seat)

    assert code == 0
    assert [r["kind"] for r in got] == ["training.failed"]
    assert f"handed over to the registry ({nowhere}/acme/model-files:p-shim)" in got[0]["reason"]
    assert got[0]["event_id"] == f"{command_id}.r1"


def test_model_files_reach_a_tls_registry_with_the_private_ca_the_adapter_hands_over(
    broker: BrokerAddress, reports: tuple[str, Bus], tmp_path: Path
) -> None:
    """The production registry's certificate is signed by the fleet CA, which the actor's image does not carry:
    with the CA the adapter puts in the environment the push verifies the registry; without it, it is refused."""
    seat, bus = reports
    certs = fleet_certificates(tmp_path / "certs")
    registry = start_registry(
        tmp_path / "registry", port=free_port(), cert_file=certs["cert"], key_file=certs["key"], ca_file=certs["ca"]
    )
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    np.savez(model_dir / "model.npz", np.ones(2))
    succeeded = {"best_round": 1, "model_ref": str(model_dir / "model.npz")}
    to = model_files.target(registry.address, "acme", "p-shim")
    tls = {"FLOPS_MODEL_FILES": to, "FLOPS_REGISTRY_TLS": "1"}
    try:
        shim(broker, seat, "run_aggregator", [["training.succeeded", succeeded]], tmp_path, **tls)
        without_ca = collected(bus, seat)
        ca = certs["ca"].read_text()
        shim(
            broker,
            seat,
            "run_aggregator",
            [["training.succeeded", succeeded]],
            tmp_path,
            **tls,
            FLOPS_REGISTRY_CA_PEM=ca,
        )
        with_ca = collected(bus, seat)
    finally:
        registry.stop()

    assert [r["kind"] for r in without_ca] == ["training.failed"]
    assert "CERTIFICATE_VERIFY_FAILED" in without_ca[0]["reason"]
    assert [r["kind"] for r in with_ca] == ["training.succeeded"]
    assert with_ca[0]["model_ref"].startswith(f"oci://{registry.address}/acme/model-files@sha256:")
