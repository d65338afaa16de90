"""MLflow tracking with every part real: ``flops tracking``'s server on loopback (SQLite, artifacts under its
directory), a manager with ``FLOPS_TRACKING_URI``, three agents and real Flower rounds. After a project the
experiment holds one run per round whose metrics are the round events', the best model is logged with its
flavor, registered and loads, the inference server serves that logged model with MLflow's own scoring server,
and the state carries the run ids; a tracking server stopped mid-training
costs a warning, not the project."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest

from flops.broker import free_port
from flops.data.mock import load_dataset
from flops.lifecycle_stages import Outcome
from flops.settings import BrokerAddress
from flops.tracking.project import experiment_name
from flops.tracking.server import TrackingServer, start_tracking
from tests.base_support import invoke_model
from tests.fleet_support import Fleet, running_fleet
from tests.support import cli
from tests.ui.support import UiProc

mlflow = pytest.importorskip("mlflow", reason="the tracking extra installs mlflow-skinny")

FIRST_PROJECT_TIMEOUT = 420.0  # a cold runtime base (now with mlflow-skinny) on a fresh machine


@pytest.fixture(scope="module")
def tracking(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrackingServer]:
    server = start_tracking(tmp_path_factory.mktemp("mlflow"), port=free_port())
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def fleet(broker: BrokerAddress, tmp_path_factory: pytest.TempPathFactory, tracking: TrackingServer) -> Iterator[Fleet]:
    env = {"FLOPS_AGENT_GRACE_S": "3", "FLOPS_TRACKING_URI": tracking.url}
    with running_fleet(broker, tmp_path_factory.mktemp("tracked"), env) as fleet:
        yield fleet


def test_each_round_is_a_run_and_the_best_model_is_registered(
    fleet: Fleet, tracking: TrackingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.url)  # where models:/ URIs resolve
    project_id, state = fleet.run(fleet.sla(training_rounds=3, post_training=True), timeout=FIRST_PROJECT_TIMEOUT)
    assert state.outcome is Outcome.COMPLETED, fleet.feed.messages(project_id)
    client = mlflow.MlflowClient(tracking_uri=tracking.url, registry_uri=tracking.url)
    experiment = client.get_experiment_by_name(experiment_name(project_id))
    assert experiment is not None

    runs = client.search_runs([experiment.experiment_id], "tags.`flops.kind` = 'round'")
    by_round = {int(r.data.tags["flops.round"]): r for r in runs}
    rounds = {e.data["round"]: e.data for e in fleet.feed.events(project_id, "round.completed")}
    assert sorted(by_round) == sorted(rounds) == [1, 2, 3]
    for number, event in rounds.items():
        metrics = by_round[number].data.metrics
        assert metrics["loss"] == pytest.approx(event["loss"])
        assert metrics["accuracy"] == pytest.approx(event["accuracy"])
        assert metrics["examples"] == event["examples"]
        assert "system/cpu_utilization_percentage" in metrics
        assert by_round[number].data.params["strategy"] == "fedavg"
        assert by_round[number].info.status == "FINISHED"

    tracked = state.tracking
    assert tracked is not None and tracked["url"] == tracking.url
    assert tracked["run_ids"] == {str(k): r.info.run_id for k, r in by_round.items()}
    best_round = max(rounds, key=lambda k: (-rounds[k]["loss"], k))  # the aggregator keeps the lowest loss
    assert tracked["run_id"] == by_round[best_round].info.run_id
    assert tracked["run_url"].endswith(f"/runs/{tracked['run_id']}")
    assert not tracked.get("warnings")

    versions = client.search_model_versions(f"name = 'flops-{project_id}'")
    assert [v.version for v in versions] == ["1"] and tracked["model_version"] == "1"
    model = mlflow.sklearn.load_model(f"models:/flops-{project_id}/1")
    assert type(mlflow.sklearn.load_model(tracked["model_uri"])) is type(model)
    digits = load_dataset("digits", split="test")
    images = np.asarray(digits.column("image").to_pylist(), dtype=float).reshape(len(digits), -1) / 16.0
    labels = np.asarray(digits.column("label").to_pylist())
    assert (model.predict(images) == labels).mean() > 0.8

    # The served model is the logged one, answered by MLflow's own scoring server behind the project's token.
    assert state.model_url and state.model_token
    version = urllib.request.Request(
        state.model_url.rstrip("/") + "/version", headers={"Authorization": f"Bearer {state.model_token}"}
    )
    with urllib.request.urlopen(version, timeout=10) as response:
        assert response.read().decode().strip() == mlflow.__version__
    served = invoke_model(state.model_url, images, state.model_token)
    assert (served == model.predict(images)).all()

    # The web view (another subscriber) links the best run.
    ui = UiProc(fleet.tmp, {"FLOPS_BROKER_URL": fleet.broker.url}).start()
    try:
        assert ui.known(f"/api/projects/{project_id}")["tracking"]["run_url"] == tracked["run_url"]
    finally:
        ui.stop()

    shown = cli(fleet.broker, "project", "status", project_id)
    assert shown.returncode == 0, shown.stderr
    assert tracked["run_id"] in shown.stdout and experiment_name(project_id) in shown.stdout


def test_a_tracking_server_stopped_mid_training_costs_a_warning_not_the_project(
    fleet: Fleet, tracking: TrackingServer
) -> None:
    project_id = fleet.feed.submit(fleet.sla(training_rounds=3))
    fleet.feed.wait_event(
        project_id, lambda e: e.message.startswith("round 1 logged to MLflow"), 300, "round 1 tracked"
    )
    tracking.stop()
    state = fleet.feed.wait_finished(project_id, 180)
    assert state.outcome is Outcome.COMPLETED, fleet.feed.messages(project_id)
    warnings = [e.message for e in fleet.feed.events(project_id, "warning")]
    assert any("unreachable" in w for w in warnings), warnings
    assert any("were not logged to MLflow" in w for w in warnings), warnings
    assert state.tracking is not None and state.tracking["warnings"]
    assert list(state.tracking["run_ids"]) == ["1"]
