"""The base case with every part real: a Mosquitto broker, the manager as a process, three ``flops agent``
processes (node-0 builds, aggregates and serves; node-1 and node-2 only learn), scikit-learn's digits pushed
as three IID partitions over Arrow Flight, the example ML repo as a git repository, real builds and real
Flower rounds. Each test asserts what a user would notice: the outcome and its reason, the accuracy the
inference server gives on held-out digits, where data was read, what the cache saves, and that nothing the
project started keeps running after it ended."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from flops.data.mock import load_dataset, push_partitions, split_iid
from flops.demo import EXAMPLE_REPO
from flops.messages import ProjectState
from flops.settings import BrokerAddress
from tests.base_support import example_model, find_process, held_out_digits, invoke_model, wait_no_processes
from tests.fleet_support import CLEANUP_TIMEOUT, PROJECT_TIMEOUT, Fleet, running_fleet
from tests.support import AgentProc, make_git_repo

SERVE = "flops.runtime.serve"
FIRST_PROJECT_TIMEOUT = 300.0  # includes the cold runtime-base build


@pytest.fixture(scope="module")
def fleet(broker: BrokerAddress, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    # The broker stays up here: an agent's last will is the truth, so a short grace keeps the tests quick.
    with running_fleet(broker, tmp_path_factory.mktemp("base_case"), {"FLOPS_AGENT_GRACE_S": "3"}) as fleet:
        yield fleet


@dataclass
class FirstProject:
    project_id: str
    state: ProjectState
    seconds_to_first_round: float
    seconds_total: float


@pytest.fixture(scope="module")
def first_project(fleet: Fleet) -> FirstProject:
    """The demo's project (both post-training steps) on a cold builder: built, trained, served."""
    project_id, state = fleet.run(fleet.sla(post_training=True), timeout=FIRST_PROJECT_TIMEOUT)
    record = fleet.feed.record(project_id)
    assert record.first_round_at is not None, fleet.feed.messages(project_id)
    return FirstProject(
        project_id,
        state,
        record.first_round_at - record.submitted_at,
        state.stage_timestamps["finished_at"] - record.submitted_at,
    )


def _assert_completed(fleet: Fleet, project_id: str, state: ProjectState) -> None:
    assert state.outcome is not None and state.outcome.value == "completed", (
        f"{state.outcome} in {state.failed_stage}: {state.reason}\n" + "\n".join(fleet.feed.messages(project_id))
    )


def _assert_failed(fleet: Fleet, project_id: str, state: ProjectState, stage: str) -> str:
    assert state.outcome is not None and state.outcome.value == "failed", (
        f"{state.outcome}: {state.reason}\n" + "\n".join(fleet.feed.messages(project_id))
    )
    assert state.failed_stage is not None and state.failed_stage.value == stage, (state.failed_stage, state.reason)
    assert state.reason
    return state.reason


# --- 1. the demo's project, end to end ---------------------------------------------------------------------


def test_demo_project_completes_and_serves_an_accurate_model(fleet: Fleet, first_project: FirstProject) -> None:
    project_id, state = first_project.project_id, first_project.state
    _assert_completed(fleet, project_id, state)
    feed = fleet.feed
    rounds = feed.events(project_id, "round.completed")
    assert [e.data["round"] for e in rounds] == [1, 2, 3]
    assert state.progress.round == 3

    # Every learner trained on exactly the rows its own node holds.
    ready = {
        e.data["agent_id"]: e.data["examples"]
        for e in feed.events(project_id)
        if "examples" in e.data and "agent_id" in e.data
    }
    assert ready == fleet.rows, f"learner.ready examples {ready} vs rows pushed {fleet.rows}"
    assert sum(fleet.rows.values()) == load_dataset("digits", split="train").num_rows

    # The inference server answers held-out digits, accurately.
    assert state.model_url, state
    x_test, y_test = held_out_digits()
    served = invoke_model(state.model_url, x_test, state.model_token)
    accuracy = float((served == y_test).mean())
    assert accuracy >= 0.90, f"inference server accuracy {accuracy:.3f} on {len(y_test)} held-out digits"

    # ... with the model training kept: the best round's parameters in the aggregator's model.npz.
    (aggregator,) = feed.commands(project_id, "run_aggregator")
    assert aggregator.agent_id == "node-0"
    model_npz = fleet.work_dir("node-0", project_id, aggregator.command_id) / "model" / "model.npz"
    assert model_npz.is_file()
    local = example_model(model_npz).predict(x_test)
    assert served.tolist() == local.tolist()

    # Finished: only the model server is left running.
    servers = wait_no_processes(project_id, allow=(SERVE,), timeout=CLEANUP_TIMEOUT)
    assert len(servers) == 1, servers
    print(
        f"\nfirst project: first round {first_project.seconds_to_first_round:.1f} s after submit, finished after "
        f"{first_project.seconds_total:.1f} s; held-out accuracy {accuracy:.3f}"
    )


# --- 2. repositories written like the original FLOps ones ----------------------------------------------------


def test_example_repo_is_written_like_an_original_flops_repo(fleet: Fleet, first_project: FirstProject) -> None:
    data_manager = (EXAMPLE_REPO / "data_manager.py").read_text()
    model_manager = (EXAMPLE_REPO / "model_manager.py").read_text()
    assert "from flops_utils.ml_repo_building_blocks import load_dataset" in data_manager
    assert "from flops_utils.ml_repo_templates import DataManagerTemplate" in data_manager
    assert "load_dataset()" in data_manager and 'set_format("numpy")' in data_manager
    assert "from flops_utils.ml_repo_templates import ModelManagerTemplate" in model_manager
    assert (EXAMPLE_REPO / "conda.yaml").is_file() and not (EXAMPLE_REPO / "requirements.txt").exists()
    _assert_completed(fleet, first_project.project_id, first_project.state)


ORIGINAL_DATA_MANAGER = """\
from typing import Any, Tuple

from flops_utils.ml_repo_building_blocks import load_dataset
from flops_utils.ml_repo_templates import DataManagerTemplate


class DataManager(DataManagerTemplate):
    def __init__(self):
        (self.x_train, self.x_test), (self.y_train, self.y_test) = self._prepare_data()

    def _prepare_data(self, partition_id=1) -> Any:
        dataset = load_dataset()
        dataset.set_format("numpy")
        x, y = dataset["image"].reshape((len(dataset), -1)), dataset["label"]
        # Split the on edge data: 80% train, 20% test
        train_split = int(0.8 * len(x))
        x_train, x_test = x[:train_split], x[train_split:]
        eval_split = int(0.8 * len(y))
        y_train, y_test = y[:eval_split], y[eval_split:]
        return (x_train, x_test), (y_train, y_test)

    def get_data(self) -> Tuple[Any, Any]:
        return (self.x_train, self.x_test), (self.y_train, self.y_test)
"""

ORIGINAL_MODEL_MANAGER = """\
import warnings
from typing import Any, Tuple

import numpy as np
from flops_utils.ml_repo_templates import ModelManagerTemplate
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

from data_manager import DataManager


class ModelManager(ModelManagerTemplate):
    def __init__(self):
        self.model = LogisticRegression(
            penalty="l2",
            max_iter=1,  # local epoch
            warm_start=True,  # prevent refreshing weights when fitting
        )
        # Setting initial parameters, akin to model.compile for keras models
        self._set_init_params()

    def _set_init_params(self) -> None:
        n_classes = 10  # digits has 10 classes
        n_features = 64  # Number of features in dataset (8x8)
        self.model.classes_ = np.array([i for i in range(10)])
        self.model.coef_ = np.zeros((n_classes, n_features))
        if self.model.fit_intercept:
            self.model.intercept_ = np.zeros((n_classes,))

    def set_model_data(self) -> None:
        (self.x_train, self.x_test), (self.y_train, self.y_test) = (
            DataManager().get_data()
        )

    def get_model(self) -> Any:
        return self.model

    def get_model_parameters(self) -> Any:
        if self.model.fit_intercept:
            params = [
                self.model.coef_,
                self.model.intercept_,
            ]
        else:
            params = [
                self.model.coef_,
            ]
        return params

    def set_model_parameters(self, parameters) -> None:
        self.model.coef_ = parameters[0]
        if self.model.fit_intercept:
            self.model.intercept_ = parameters[1]

    def fit_model(self) -> int:
        # Ignore convergence failure due to low local epochs
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model.fit(self.x_train, self.y_train)
        return len(self.x_train)

    def evaluate_model(self) -> Tuple[Any, Any, int]:
        loss = log_loss(self.y_test, self.model.predict_proba(self.x_test), labels=self.model.classes_)
        accuracy = self.model.score(self.x_test, self.y_test)
        # return loss, len(self.x_test), {"accuracy": accuracy}
        return loss, accuracy, len(self.x_test)
"""

ORIGINAL_CONDA_YAML = """\
channels:
- conda-forge
dependencies:
- python=3.10.14
- pip<=24.0
- pip:
  - numpy
  - scikit-learn
  - scipy
name: mlflow-env
"""


def test_original_mnist_repo_layout_trains_unchanged(fleet: Fleet) -> None:
    """The original MNIST/sklearn repo's files, names and quirks (a python=3.10 pin, pip<=24.0, max_iter=1,
    Tuple hints, 784 → 64 features) adapted to digits: built with warnings, trained, completed."""
    repo = make_git_repo(
        fleet.tmp / "flops_ml_repo_digits_sklearn",
        {
            "data_manager.py": ORIGINAL_DATA_MANAGER,
            "model_manager.py": ORIGINAL_MODEL_MANAGER,
            "conda.yaml": ORIGINAL_CONDA_YAML,
        },
    )
    project_id, state = fleet.run(fleet.sla(repo))
    _assert_completed(fleet, project_id, state)
    assert state.progress.round == 3 and state.progress.accuracy is not None
    warnings = [e.message for e in fleet.feed.events(project_id, "warning")]
    assert any("python=3.10.14" in w for w in warnings), warnings
    wait_no_processes(project_id, timeout=CLEANUP_TIMEOUT)


# --- 3. the artifact cache ------------------------------------------------------------------------------------


def test_same_commit_again_skips_the_build_and_trains_sooner(fleet: Fleet, first_project: FirstProject) -> None:
    feed = fleet.feed
    project_id = feed.submit(fleet.sla(training_rounds=3))
    feed.wait_event(project_id, lambda e: e.kind == "round.completed", PROJECT_TIMEOUT, "a round.completed")
    record = feed.record(project_id)
    assert record.first_round_at is not None
    seconds = record.first_round_at - record.submitted_at
    print(
        f"\nfirst round {seconds:.1f} s after submit with a cache hit; {first_project.seconds_to_first_round:.1f} s "
        "on a cold builder"
    )
    assert any("artifact cache hit" in e.message for e in feed.events(project_id)), feed.messages(project_id)
    assert feed.commands(project_id, "build") == []
    assert feed.commands(first_project.project_id, "build"), "the first project built"
    assert seconds < first_project.seconds_to_first_round
    state = feed.wait_finished(project_id, PROJECT_TIMEOUT)
    _assert_completed(fleet, project_id, state)
    wait_no_processes(project_id, timeout=CLEANUP_TIMEOUT)


# --- 4. failures reach the user and end the project -------------------------------------------------------------


def _example_files(*, drop: str | None = None, **replace: str) -> dict[str, str]:
    """The example repo's files, minus ``drop``, with ``replace`` (file name → text; ``.`` written ``_``)."""
    files = {f.name: f.read_text() for f in EXAMPLE_REPO.iterdir() if f.is_file()}
    files.pop(drop or "", None)
    for name, text in replace.items():
        files[name.replace("_py", ".py")] = text
    return files


def test_repo_without_model_manager_fails_in_builder(fleet: Fleet) -> None:
    repo = make_git_repo(fleet.tmp / "no_model_manager", _example_files(drop="model_manager.py"))
    project_id, state = fleet.run(fleet.sla(repo))
    reason = _assert_failed(fleet, project_id, state, "builder")
    assert "model_manager.py" in reason
    assert not fleet.feed.commands(project_id, "run_learner")
    wait_no_processes(project_id, timeout=CLEANUP_TIMEOUT)


def test_repo_with_an_import_error_fails_in_builder_with_the_traceback(fleet: Fleet) -> None:
    broken = (
        (EXAMPLE_REPO / "model_manager.py")
        .read_text()
        .replace("import numpy as np\n", "import numpy as np\nimport sklearn_but_misspelled\n")
    )
    repo = make_git_repo(fleet.tmp / "import_error", _example_files(model_manager_py=broken))
    project_id, state = fleet.run(fleet.sla(repo))
    reason = _assert_failed(fleet, project_id, state, "builder")
    assert "sklearn_but_misspelled" in reason and "ModuleNotFoundError" in reason, reason
    assert "model_manager.py" in reason, "the traceback tail names the failing file"
    wait_no_processes(project_id, timeout=CLEANUP_TIMEOUT)


def test_fedprox_on_an_original_repo_is_refused_at_build_naming_fit_model(fleet: Fleet) -> None:
    """The original contract's ``fit_model(self)`` cannot add FedProx's proximal term: refused after the build,
    before any learner starts, never run as FedAvg."""
    repo = make_git_repo(
        fleet.tmp / "original_repo_fedprox",
        {
            "data_manager.py": ORIGINAL_DATA_MANAGER,
            "model_manager.py": ORIGINAL_MODEL_MANAGER,
            "conda.yaml": ORIGINAL_CONDA_YAML,
        },
    )
    project_id, state = fleet.run(fleet.sla(repo, strategy="fedprox", strategy_params={"proximal_mu": 1.0}))
    reason = _assert_failed(fleet, project_id, state, "builder")
    assert "ModelManager.fit_model()" in reason and "proximal" in reason, reason
    assert fleet.feed.commands(project_id, "build"), "refused after building, by what the build found"
    assert not fleet.feed.commands(project_id, "run_learner")
    wait_no_processes(project_id, timeout=CLEANUP_TIMEOUT)


def test_no_agent_holds_the_data_tag_times_out_in_preparation(fleet: Fleet) -> None:
    body = fleet.sla(data_tags=["nobody-holds-this"], deadlines={"preparation": 3})
    project_id, state = fleet.run(body, timeout=30)
    reason = _assert_failed(fleet, project_id, state, "preparation")
    assert "timed out in preparation" in reason
    warnings = [e.message for e in fleet.feed.events(project_id, "warning")]
    assert any("nobody-holds-this" in w for w in warnings), warnings
    assert fleet.feed.commands(project_id, "run_learner") == []
    wait_no_processes(project_id, timeout=CLEANUP_TIMEOUT)


def _start_long_training(fleet: Fleet, **training: Any) -> str:
    """A project with rounds enough to still be training when the test breaks something; returns its id
    once its first round is done."""
    project_id = fleet.feed.submit(fleet.sla(training_rounds=30, **training))
    fleet.feed.wait_event(project_id, lambda e: e.kind == "round.completed", PROJECT_TIMEOUT, "a round.completed")
    return project_id


def test_learner_killed_mid_training_fails_in_aggregation(fleet: Fleet) -> None:
    project_id = _start_long_training(fleet)
    victim = find_process(project_id, "flops.runtime.learner", str(fleet.agents["node-2"].home))
    os.killpg(victim.pid, signal.SIGKILL)
    state = fleet.feed.wait_finished(project_id, 60)
    reason = _assert_failed(fleet, project_id, state, "aggregation")
    assert "node-2" in reason and "min_fit_clients 3" in reason, reason
    assert state.progress.round < 30
    wait_no_processes(project_id, timeout=CLEANUP_TIMEOUT)


def test_aggregator_crash_fails_in_aggregation_with_the_reason(fleet: Fleet) -> None:
    project_id = _start_long_training(fleet)
    aggregator = find_process(project_id, "flops.runtime.aggregator")
    os.kill(aggregator.pid, signal.SIGKILL)
    state = fleet.feed.wait_finished(project_id, 60)
    reason = _assert_failed(fleet, project_id, state, "aggregation")
    assert "run_aggregator exited with code -9" in reason, reason
    wait_no_processes(project_id, timeout=CLEANUP_TIMEOUT)


def test_agent_going_offline_fails_the_project_and_its_restart_reconciles(fleet: Fleet) -> None:
    """An agent holding the only copy of its tag is the learner and (sorting first) the aggregator; SIGKILL it
    mid-training: its last will fails the project, naming it. Its children die with it; started again, the
    agent reports what it no longer runs."""
    victim = AgentProc("a-victim", fleet.tmp / "agents" / "a-victim", "learner,aggregator", fleet.broker)
    fleet.extra_agents.append(victim)
    try:
        victim.start()
        (status,) = fleet.feed.wait_agents([victim.agent_id]).values()
        part = split_iid(load_dataset("digits", split="train"), 3, seed=1)[0]
        push_partitions([part], [status.data_server], "victim", tokens=[victim.data_token()])
        fleet.feed.wait_agents([victim.agent_id], tag="victim")

        project_id = _start_long_training(
            fleet, data_tags=["victim"], min_available_clients=1, min_fit_clients=1, min_evaluate_clients=1
        )
        (aggregator,) = fleet.feed.commands(project_id, "run_aggregator")
        assert aggregator.agent_id == victim.agent_id
        assert [c.agent_id for c in fleet.feed.commands(project_id, "run_learner")] == [victim.agent_id]

        victim.kill9()
        state = fleet.feed.wait_finished(project_id, 60)
        reason = _assert_failed(fleet, project_id, state, "aggregation")
        assert victim.agent_id in reason and "offline" in reason, reason

        wait_no_processes(project_id, timeout=10)
        victim.start()
    finally:
        victim.stop()
    fleet.feed.wait_offline(victim.agent_id)


# --- 6. after completion -----------------------------------------------------------------------------------


def test_cancel_on_a_completed_project_stops_its_inference_server(fleet: Fleet, first_project: FirstProject) -> None:
    from flops.client import Client

    project_id = first_project.project_id
    url = first_project.state.model_url
    assert url and len(wait_no_processes(project_id, allow=(SERVE,), timeout=CLEANUP_TIMEOUT)) == 1
    with Client(fleet.broker) as client:
        reply = client.cancel(project_id, "model retired")
        assert reply.project_id == project_id and not reply.errors
        assert wait_no_processes(project_id, timeout=CLEANUP_TIMEOUT) == []
        state = client.state(project_id)
        assert state.outcome is not None and state.outcome.value == "completed" and state.model_url is None
        again = client.cancel(project_id, "twice")
        assert again.errors and "already finished" in again.errors[0].message
