"""The project SLA: every original FLOps project SLA validates unchanged; nonsense is refused with the
field path a user can act on (as the manager's reply reports it)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from flops.messages import field_errors
from flops.sla import PostTrainingStep, ProjectSLA, TrainingMode

FIXTURES = Path(__file__).parent / "fixtures" / "original_slas"
# Mock-data-provider SLAs (mocks/) are another document type; everything else is a project SLA.
PROJECT_SLAS = sorted(p for p in FIXTURES.rglob("*.json") if "mocks" not in p.relative_to(FIXTURES).parts)


def _ids(path: Path) -> str:
    return str(path.relative_to(FIXTURES))


def test_fixture_set_is_complete() -> None:
    # A moved or renamed fixture folder must not silently turn this suite into zero tests.
    assert len(PROJECT_SLAS) == 13
    assert any("legacy/early" in _ids(p) for p in PROJECT_SLAS)
    assert any("versions" in _ids(p) for p in PROJECT_SLAS)


@pytest.mark.parametrize("path", PROJECT_SLAS, ids=_ids)
def test_original_project_sla_validates_unchanged(path: Path) -> None:
    raw = json.loads(path.read_text())
    sla = ProjectSLA.model_validate_json(path.read_bytes())
    dumped = sla.model_dump(mode="json", by_alias=True, exclude_unset=True)
    expected = copy.deepcopy(raw)
    tags = expected.get("training_configuration", {}).get("data_tags")
    if isinstance(tags, str):
        expected["training_configuration"]["data_tags"] = [tags]
    # Every value the user wrote is kept as written (only a bare tag string becomes a list).
    assert dumped == expected
    # And the model is what the file says.
    assert sla.ml_repo_url == raw["ml_repo_url"]
    assert sla.training_configuration.training_rounds == raw["training_configuration"]["training_rounds"]
    # A validated SLA survives the store's JSON round trip (the manager persists it as JSON).
    assert ProjectSLA.model_validate(sla.model_dump(mode="json", by_alias=True)) == sla


def test_hierarchical_original_keeps_its_cycles() -> None:
    sla = ProjectSLA.model_validate_json(
        (FIXTURES / "current/projects/hierarchical_mnist_sklearn_large.SLA.json").read_bytes()
    )
    assert sla.training_configuration.mode is TrainingMode.HIERARCHICAL
    assert sla.training_configuration.training_cycles == 10
    assert sla.post_training_steps == [
        PostTrainingStep.BUILD_IMAGE_FOR_TRAINED_MODEL,
        PostTrainingStep.DEPLOY_TRAINED_MODEL_IMAGE,
    ]


@pytest.mark.parametrize(
    "path", [p for p in PROJECT_SLAS if _ids(p).startswith("legacy/projects") and "datafree" not in p.name], ids=_ids
)
def test_legacy_string_data_tags_become_a_list(path: Path) -> None:
    raw = json.loads(path.read_text())
    assert isinstance(raw["training_configuration"]["data_tags"], str)
    sla = ProjectSLA.model_validate(raw)
    assert sla.training_configuration.data_tags == [raw["training_configuration"]["data_tags"]]


def _base() -> dict[str, Any]:
    return {
        "customerID": "Admin",
        "ml_repo_url": "https://github.com/Malyuk-A/flops_ml_repo_mnist_sklearn",
        "ml_model_flavor": "sklearn",
        "training_configuration": {
            "data_tags": ["mnist"],
            "training_rounds": 3,
            "min_available_clients": 2,
            "min_fit_clients": 2,
            "min_evaluate_clients": 2,
        },
    }


def test_base_is_valid() -> None:
    ProjectSLA.model_validate(_base())


def test_customer_id_alias() -> None:
    body = _base()
    del body["customerID"]
    body["customer_id"] = "alice"
    assert ProjectSLA.model_validate(body).customerID == "alice"
    assert ProjectSLA.model_validate(_base() | {"customerID": "bob"}).customerID == "bob"
    assert ProjectSLA.model_validate({k: v for k, v in _base().items() if k != "customerID"}).customerID == "Admin"


def _tc(**changes: Any) -> dict[str, Any]:
    body = _base()
    body["training_configuration"] = body["training_configuration"] | changes
    return body


def _top(**changes: Any) -> dict[str, Any]:
    return _base() | changes


BUILD, DEPLOY = "build_image_for_trained_model", "deploy_trained_model_image"

NONSENSE: list[tuple[str, dict[str, Any], str, str]] = [
    ("zero rounds", _tc(training_rounds=0), "training_configuration.training_rounds", "greater than or equal to 1"),
    ("too many rounds", _tc(training_rounds=10_001), "training_configuration.training_rounds", "less than"),
    ("negative clients", _tc(min_available_clients=-1), "training_configuration.min_available_clients", ">= 1|greater"),
    ("zero fit clients", _tc(min_fit_clients=0), "training_configuration.min_fit_clients", "greater than"),
    ("zero cycles", _tc(training_cycles=0), "training_configuration.training_cycles", "greater than"),
    ("fit > available", _tc(min_fit_clients=3), "training_configuration", "min_fit_clients \\(3\\) cannot exceed"),
    (
        "evaluate > available",
        _tc(min_evaluate_clients=5),
        "training_configuration",
        "min_evaluate_clients \\(5\\) cannot exceed",
    ),
    ("cycles in classic mode", _tc(training_cycles=2), "training_configuration", "hierarchical mode only"),
    ("deploy without build", _top(post_training_steps=[DEPLOY]), "post_training_steps", "needs build_image"),
    ("duplicate steps", _top(post_training_steps=[BUILD, BUILD]), "post_training_steps", "must not repeat"),
    ("unknown step", _top(post_training_steps=["train_again"]), "post_training_steps.0", "Input should be"),
    ("duplicate tags", _tc(data_tags=["mnist", "mnist"]), "training_configuration.data_tags", "must not repeat"),
    ("tag with a dot", _tc(data_tags=["mnist.v2"]), "training_configuration.data_tags.0", "pattern"),
    ("tag with a comma", _tc(data_tags=["a,b"]), "training_configuration.data_tags.0", "pattern"),
    ("bare tag with a dot", _tc(data_tags="mnist.v2"), "training_configuration.data_tags.0", "pattern"),
    ("empty tag", _tc(data_tags=[""]), "training_configuration.data_tags.0", "at least 1"),
    (
        "duplicate platforms",
        _top(supported_platforms=["linux/amd64", "linux/amd64"]),
        "supported_platforms",
        "must not repeat",
    ),
    ("no platform", _top(supported_platforms=[]), "supported_platforms", "at least 1"),
    ("unknown platform", _top(supported_platforms=["windows/x86"]), "supported_platforms.0", "linux/amd64"),
    ("unknown flavor", _top(ml_model_flavor="caffe"), "ml_model_flavor", "sklearn"),
    ("unknown mode", _tc(mode="federated"), "training_configuration.mode", "classic"),
    ("unknown strategy", _tc(strategy="fedsgd"), "training_configuration.strategy", "fedavg"),
    ("unknown top-level key", _top(ml_repo="x"), "ml_repo", "Extra inputs are not permitted"),
    ("unknown nested key", _tc(rounds=3), "training_configuration.rounds", "Extra inputs are not permitted"),
    (
        "unknown resource key",
        _top(resource_constraints={"gpus": 1}),
        "resource_constraints.gpus",
        "Extra inputs are not permitted",
    ),
    ("zero memory", _top(resource_constraints={"memory": 0}), "resource_constraints.memory", "greater than"),
    (
        "devel images on arm64",
        _top(use_devel_base_images=True, supported_platforms=["linux/amd64", "linux/arm64"]),
        "(message)",
        "use_devel_base_images works only",
    ),
    (
        "devel images arm64 only",
        _top(use_devel_base_images=True, supported_platforms=["linux/arm64"]),
        "(message)",
        "use_devel_base_images works only",
    ),
    ("repo URL without scheme", _top(ml_repo_url="github.com/x/y"), "ml_repo_url", "must be a git URL"),
    ("repo URL ftp", _top(ml_repo_url="ftp://host/repo"), "ml_repo_url", "must be a git URL"),
    ("empty repo URL", _top(ml_repo_url=""), "ml_repo_url", "at least 1"),
    ("missing repo URL", {k: v for k, v in _base().items() if k != "ml_repo_url"}, "ml_repo_url", "Field required"),
    ("missing flavor", {k: v for k, v in _base().items() if k != "ml_model_flavor"}, "ml_model_flavor", "required"),
    ("deadline for finished", _top(deadlines={"finished": 10}), "deadlines", "finished is terminal"),
    ("deadline for unknown stage", _top(deadlines={"training": 10}), "deadlines.training.[key]", "preparation"),
    ("zero deadline", _top(deadlines={"builder": 0}), "deadlines.builder", "greater than 0"),
    ("week-long deadline", _top(deadlines={"builder": 8 * 24 * 3600}), "deadlines.builder", "less than"),
    ("empty customer", _top(customerID=""), "customerID", "at least 1"),
    ("rounds as text", _tc(training_rounds="many"), "training_configuration.training_rounds", "integer"),
    ("rounds as a numeric string", _tc(training_rounds="3"), "training_configuration.training_rounds", "integer"),
    ("rounds as a float", _tc(training_rounds=2.0), "training_configuration.training_rounds", "integer"),
    ("clients as a string", _tc(min_fit_clients="2"), "training_configuration.min_fit_clients", "integer"),
    ("memory as a float", _top(resource_constraints={"memory": 100.0}), "resource_constraints.memory", "integer"),
    ("vcpus as a string", _top(resource_constraints={"vcpus": "1"}), "resource_constraints.vcpus", "integer"),
    ("no data tags", _tc(data_tags=[]), "training_configuration.data_tags", "at least one data tag"),
]


@pytest.mark.parametrize(("body", "path", "message"), [n[1:] for n in NONSENSE], ids=[n[0] for n in NONSENSE])
def test_nonsense_is_refused_with_its_field_path(body: dict[str, Any], path: str, message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        ProjectSLA.model_validate(body)
    errors = field_errors(caught.value)
    matching = [e for e in errors if e.field == path]
    assert matching, f"no error at {path!r}: {[(e.field, e.message) for e in errors]}"
    assert any(re.search(message, e.message) for e in matching), [e.message for e in matching]


def test_hierarchical_mode_allows_cycles() -> None:
    sla = ProjectSLA.model_validate(_tc(mode="hierarchical", training_cycles=4))
    assert sla.training_configuration.training_cycles == 4


def test_deploy_after_build_is_kept_in_order() -> None:
    sla = ProjectSLA.model_validate(_top(post_training_steps=[DEPLOY, BUILD]))
    assert [s.value for s in sla.post_training_steps] == [BUILD, DEPLOY]


def test_deadlines_override_known_stages() -> None:
    sla = ProjectSLA.model_validate(_top(deadlines={"builder": 5, "aggregation": 7.5}))
    assert {s.value: v for s, v in sla.deadlines.items()} == {"builder": 5.0, "aggregation": 7.5}


@pytest.mark.parametrize("url", ["git@github.com:x/y.git", "ssh://git@h/x", "file:///tmp/r", "/abs/repo", "./rel"])
def test_repo_url_forms_users_write(url: str) -> None:
    assert ProjectSLA.model_validate(_top(ml_repo_url=url)).ml_repo_url == url


@pytest.mark.parametrize("value", ['"3"', "2.0"])
def test_json_integers_are_strict(value: str) -> None:
    body = json.dumps(_base()).replace('"training_rounds": 3', f'"training_rounds": {value}')
    with pytest.raises(ValidationError) as caught:
        ProjectSLA.model_validate_json(body)
    assert [e.field for e in field_errors(caught.value)] == ["training_configuration.training_rounds"]


def test_sla_without_data_tags_survives_the_store_round_trip() -> None:
    # Leaving data_tags out (the original's data-free SLAs) stays allowed, also once the manager stored it.
    body = _base()
    del body["training_configuration"]["data_tags"]
    sla = ProjectSLA.model_validate(body)
    assert ProjectSLA.model_validate(sla.model_dump(mode="json", by_alias=True)) == sla


def test_resource_constraints_become_the_actors_resources_and_survive_the_store_round_trip() -> None:
    sla = ProjectSLA.model_validate(_top(resource_constraints={"memory": 512, "vcpus": 2, "storage": 0}))
    stored = ProjectSLA.model_validate(sla.model_dump(mode="json", by_alias=True))

    assert stored.actor_resources() == {"resources": {"memory": 512, "vcpus": 2}}
    assert ProjectSLA.model_validate(_top(resource_constraints={"memory": 256})).actor_resources() == {
        "resources": {"memory": 256, "vcpus": 1}
    }


def test_without_resource_constraints_the_actors_get_no_resources_even_once_stored() -> None:
    # The deployer's own sizes then apply: the original's default of 100 MiB is never imposed.
    sla = ProjectSLA.model_validate(_base())
    assert sla.actor_resources() == {}
    assert ProjectSLA.model_validate(sla.model_dump(mode="json", by_alias=True)).actor_resources() == {}
