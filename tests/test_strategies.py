"""Strategies reach the training: the SLA's strategy parameters and derived timeouts go to the aggregator; a
strategy with a client side (FedProx) is refused at build time on a repo whose ``fit_model()`` cannot take
it; bad parameters are field errors. (Real Flower runs of each strategy: ``tests/runtime/test_strategies.py``.)"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from flops.builder.import_check import check_model_manager
from flops.lifecycle_stages import Stage
from flops.messages import field_errors
from flops.sla import ProjectSLA
from tests.engine_support import COMMIT, EngineHarness, sla_body

ORIGINAL_FIT = "    def fit_model(self):\n        return 1\n"
CONFIG_FIT = "    def fit_model(self, config=None):\n        return 1\n"
MODEL_MANAGER = """
import numpy as np


class ModelManager:
    def get_model_parameters(self):
        return [np.zeros(3)]

{fit}"""


@pytest.fixture
def h(tmp_path: Path) -> EngineHarness:
    return EngineHarness(tmp_path)


def _body(strategy: str, params: dict[str, float] | None = None, **extra: Any) -> dict[str, Any]:
    body = sla_body(learners=2, rounds=2, steps=(), **extra)
    body["training_configuration"]["strategy"] = strategy
    if params is not None:
        body["training_configuration"]["strategy_params"] = params
    return body


def _build(h: EngineHarness, project_id: str, takes_config: bool | None) -> None:
    h.resolve(project_id)
    cmd = h.command(project_id, "build")
    details = {} if takes_config is None else {"fit_model_takes_config": takes_config}
    h.report(cmd, "build.succeeded", artifact={"ref": "env://x", "commit": COMMIT, "details": details})


def test_fedprox_on_a_repo_whose_fit_model_takes_no_configuration_is_refused_at_build(h: EngineHarness) -> None:
    h.fleet(2)
    project_id = h.submit(_body("fedprox", {"proximal_mu": 1.0}))
    _build(h, project_id, takes_config=False)
    state = h.state(project_id)
    assert state.outcome is not None and state.outcome.value == "failed"
    assert state.failed_stage is Stage.BUILDER
    assert state.reason is not None and "ModelManager.fit_model()" in state.reason, state.reason
    assert "proximal" in state.reason and "fedprox" in state.reason
    assert h.commands(project_id, "run_learner") == []


def test_fedprox_refusal_also_applies_to_a_cached_artifact(h: EngineHarness) -> None:
    h.fleet(2)
    first = h.submit(_body("fedavg"))
    _build(h, first, takes_config=False)
    assert h.stage(first) is Stage.LEARNERS  # FedAvg needs nothing of the repo
    second = h.submit(_body("fedprox"))
    h.resolve(second)
    assert h.commands(second, "build") == []  # the cache hit
    assert h.stage(second) is Stage.FINISHED
    assert "ModelManager.fit_model()" in (h.state(second).reason or "")


@pytest.mark.parametrize("takes_config", [True, None])
def test_fedprox_goes_on_when_the_repo_takes_the_configuration_or_is_not_known(
    h: EngineHarness, takes_config: bool | None
) -> None:
    # None: an artifact recorded before the check existed; its learners refuse FedProx at the first round.
    h.fleet(2)
    project_id = h.submit(_body("fedprox"))
    _build(h, project_id, takes_config=takes_config)
    assert h.stage(project_id) is Stage.LEARNERS


def test_aggregator_gets_the_strategy_params_and_timeouts_from_the_sla(h: EngineHarness) -> None:
    h.fleet(2)
    body = _body("fedadam", {"eta": 0.05, "beta_1": 0.5}, deadlines={"aggregation": 7200.0, "learners": 300.0})
    project_id = h.submit(body)
    h.drive(project_id, Stage.AGGREGATION)
    spec = h.command(project_id, "run_aggregator").spec
    assert spec["strategy"] == "fedadam"
    assert spec["strategy_params"] == {"eta": 0.05, "beta_1": 0.5}
    # An aggregation deadline above an hour is no longer cut to the runtime's fixed 3600 s.
    assert spec["deadline_s"] == 7200.0
    assert spec["round_timeout_s"] == 7200.0
    assert spec["client_wait_s"] == 300.0


def test_fedprox_default_mu_reaches_the_aggregator(h: EngineHarness) -> None:
    h.fleet(2)
    project_id = h.submit(_body("fedprox"))
    h.drive(project_id, Stage.AGGREGATION)
    assert h.command(project_id, "run_aggregator").spec["strategy_params"] == {"proximal_mu": 0.1}


@pytest.mark.parametrize(
    ("strategy", "params", "field", "words"),
    [
        ("fedprox", {"proximal_mu": 0}, "training_configuration.strategy_params.proximal_mu", "greater than 0"),
        ("fedprox", {"eta": 0.1}, "training_configuration.strategy_params", "eta does not apply to strategy fedprox"),
        ("fedavg", {"proximal_mu": 1.0}, "training_configuration.strategy_params", "proximal_mu does not apply"),
        ("fedadam", {"beta_1": 1.0}, "training_configuration.strategy_params.beta_1", "less than 1"),
        ("fedadam", {"eta": "fast"}, "training_configuration.strategy_params.eta", "valid number"),
        ("fedadam", {"momentum": 0.9}, "training_configuration.strategy_params.momentum", "not permitted"),
    ],
)
def test_bad_strategy_params_are_field_errors(strategy: str, params: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(ValidationError) as caught:
        ProjectSLA.model_validate(_body(strategy, params))
    errors = field_errors(caught.value)
    assert [e.field for e in errors] == [field], errors
    assert words in errors[0].message, errors


def test_stored_sla_shows_only_the_strategy_params_given() -> None:
    sla = ProjectSLA.model_validate(_body("fedadam", {"eta": 0.3}))
    dumped = sla.model_dump(mode="json")["training_configuration"]["strategy_params"]
    assert dumped == {"eta": 0.3}
    assert ProjectSLA.model_validate(sla.model_dump(mode="json")) == sla


@pytest.mark.parametrize(("fit", "expected"), [(ORIGINAL_FIT, False), (CONFIG_FIT, True)])
def test_build_import_check_records_whether_fit_model_takes_the_configuration(
    tmp_path: Path, fit: str, expected: bool
) -> None:
    (tmp_path / "model_manager.py").write_text(MODEL_MANAGER.format(fit=fit))
    result = check_model_manager(Path(sys.executable), tmp_path, timeout_s=60)
    assert result["fit_config"] is expected


def test_agent_passes_the_derived_timeouts_to_the_aggregator() -> None:
    from flops.agent import _timeout_args

    spec = {"deadline_s": 7200.0, "round_timeout_s": 7200.0, "client_wait_s": 300}
    expected = ["--deadline", "7200.0", "--round-timeout", "7200.0", "--client-wait-timeout", "300.0"]
    assert _timeout_args(spec) == expected
    assert _timeout_args({}) == []  # a command recorded before the timeouts were derived


def test_a_learner_refuses_fedprox_on_a_fit_model_without_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    """The second line of defence (an artifact built before the build-time check): the round fails, naming
    ModelManager.fit_model(), instead of training FedAvg."""
    from types import SimpleNamespace

    from flops.runtime import clientapp

    class Original:
        def fit_model(self) -> int:
            raise AssertionError("must not train")

    monkeypatch.setattr(clientapp, "_manager", lambda context: Original())
    monkeypatch.setattr(clientapp, "_set_arrays", lambda manager, msg: None)
    monkeypatch.setattr(clientapp, "fit_config", lambda msg: {"strategy": "fedprox", "proximal_mu": 1.0})
    context = SimpleNamespace(node_config={})
    with pytest.raises(TypeError, match=r"ModelManager.fit_model\(\) takes no configuration"):
        clientapp.train(SimpleNamespace(), context)  # type: ignore[arg-type]
    assert clientapp.fit_takes_config(Original()) is False
    assert clientapp.fit_takes_config(SimpleNamespace(fit_model=lambda config: 1)) is True
