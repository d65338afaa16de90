"""Each named guard of the stage table: a stage it fires in (refuses, with a reason the user sees) and a
stage or case where it must not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from flops import lifecycle
from flops.lifecycle import EDGES, Lifecycle, Project
from flops.lifecycle_stages import Outcome, Stage
from flops.sla import ProjectSLA
from flops.store import ProjectRecord
from tests.engine_support import COMMIT, EngineHarness, sla_body

TESTED = {
    "require_inventory",
    "require_resolved_commit",
    "reject_stale_build_result",
    "require_enough_learners",
    "reject_stale_training_result",
    "require_deadline_passed",
}


def test_every_guard_of_the_table_is_tested_here() -> None:
    assert {g.__name__ for e in EDGES for g in e.guards} == TESTED
    for name in TESTED:
        assert getattr(lifecycle, name).__doc__, f"{name} must say which race or misuse it prevents"


@pytest.fixture
def h(tmp_path: Path) -> EngineHarness:
    return EngineHarness(tmp_path)


def _machine(stage: Stage, learners: int = 1, **ctx: Any) -> tuple[Lifecycle, Project]:
    sla = ProjectSLA.model_validate(sla_body(learners=learners))
    record = ProjectRecord("p-1", stage, sla.model_dump(mode="json"), 0.0, 0.0, deadline_at=100.0, ctx=dict(ctx))
    project = Project(record=record, sla=sla, on_change=lambda *a: None)
    machine = Lifecycle()
    machine.add(project)
    return machine, project


def _rejections(h: EngineHarness, pid: str) -> list[str]:
    return [e.message for e in h.events(pid) if e.kind == "rejected"]


# --- require_resolved_commit ---------------------------------------------------------------------------


def test_require_resolved_commit_holds_preparation_until_the_repo_is_pinned(h: EngineHarness) -> None:
    h.fleet(1)
    pid = h.submit(sla_body(learners=1))
    assert h.stage(pid) is Stage.PREPARATION  # inventory is there, the commit is not
    machine, project = _machine(Stage.PREPARATION, inventory_ok=True)
    assert not machine.fire(project, "prepared")
    assert project.refusal == "require_resolved_commit: the repository commit is not resolved yet"
    h.resolve(pid)
    assert h.stage(pid) is Stage.BUILDER
    assert h.store.get(pid).ctx["commit"] == COMMIT  # type: ignore[union-attr]


def test_require_resolved_commit_does_not_guard_later_stages() -> None:
    # A record without a commit (it cannot happen, but the guard must not be consulted) still builds on.
    machine, project = _machine(Stage.BUILDER, build_command_id="c-1")
    assert machine.fire(project, "built", command_id="c-1")
    assert project.stage is Stage.LEARNERS


# --- require_inventory ---------------------------------------------------------------------------------


def test_require_inventory_holds_preparation_until_enough_learners(h: EngineHarness) -> None:
    h.announce("builder-1", ("builder",), {})
    h.announce("agg-1", ("aggregator",), {})
    h.announce("learner-0", ("learner",))
    h.announce("learner-other", ("learner",), {"cifar10": 50})  # holds other data: does not count
    pid = h.submit(sla_body(learners=2))
    h.resolve(pid)
    assert h.stage(pid) is Stage.PREPARATION
    assert h.commands(pid) == []
    machine, project = _machine(Stage.PREPARATION, commit=COMMIT, inventory_ok=False)
    assert not machine.fire(project, "prepared")
    assert project.refusal == "require_inventory: not enough online agents hold the requested data"
    h.announce("learner-1", ("learner",))
    assert h.stage(pid) is Stage.BUILDER


def test_require_inventory_counts_agents_going_offline(h: EngineHarness) -> None:
    h.fleet(2)
    h.offline("learner-1")
    pid = h.submit(sla_body(learners=2))
    h.resolve(pid)
    assert h.stage(pid) is Stage.PREPARATION
    h.announce("learner-1", ("learner",))
    assert h.stage(pid) is Stage.BUILDER


def test_require_inventory_does_not_guard_the_builder(h: EngineHarness) -> None:
    h.fleet(2)
    pid = h.submit(sla_body(learners=2))
    h.resolve(pid)
    h.offline("learner-1")  # inventory no longer satisfied, but preparation is over
    assert h.stage(pid) is Stage.BUILDER
    cmd = h.command(pid, "build")
    h.report(cmd, "build.succeeded", artifact={"ref": "env://x"})
    # The builder advanced; the learners stage then finds too few learners and says so.
    record = h.store.get(pid)
    assert record is not None and record.failed_stage is Stage.LEARNERS
    assert record.reason == "only 1 of 2 learner agents with the data are online (in learners)"


# --- reject_stale_build_result ------------------------------------------------------------------------


def test_reject_stale_build_result_refuses_another_command_and_says_so(h: EngineHarness) -> None:
    h.fleet(1)
    pid = h.submit(sla_body(learners=1))
    h.resolve(pid)
    cmd = h.command(pid, "build")
    stale = cmd.model_copy(update={"command_id": f"{pid}.99.build"})
    h.sent_earlier(stale)
    result = h.report(stale, "build.succeeded", artifact={"ref": "env://old"})
    assert result.verdict == "reject"
    expected = (
        f"reject_stale_build_result: build result for command {pid}.99.build "
        f"does not answer the pending build {cmd.command_id}"
    )
    assert result.reason == expected
    assert _rejections(h, pid) == [expected]
    assert h.stage(pid) is Stage.BUILDER
    assert "artifact" not in h.store.get(pid).ctx  # type: ignore[union-attr]
    # The answer to the pending build still advances the project.
    assert h.report(cmd, "build.succeeded", artifact={"ref": "env://new"}).verdict == "accept"
    assert h.stage(pid) is Stage.LEARNERS
    assert h.commands(pid, "run_learner")[0].spec["artifact"]["ref"] == "env://new"


def test_reject_stale_build_result_refuses_a_result_without_command_id(h: EngineHarness) -> None:
    h.fleet(1)
    pid = h.submit(sla_body(learners=1))
    h.resolve(pid)
    body = {
        "event_id": "e-nocmd",
        "project_id": pid,
        "source": "x",
        "kind": "build.succeeded",
        "artifact": {"ref": "env://x"},
        "cached": True,  # a worker's claim of a cache hit does not bypass the guard
    }
    assert h.report_raw("builder-1", body).verdict == "reject"
    assert h.stage(pid) is Stage.BUILDER


def test_reject_stale_build_result_lets_a_cache_hit_through(h: EngineHarness) -> None:
    h.fleet(1)
    first = h.submit(sla_body(learners=1, rounds=1, steps=()))
    h.drive(first, Stage.FINISHED)
    second = h.submit(sla_body(learners=1, rounds=1, steps=()))
    h.resolve(second)
    assert h.stage(second) is Stage.LEARNERS  # no build command, so no command id to match
    assert _rejections(h, second) == []


def test_stale_build_result_after_the_builder_is_not_a_transition(h: EngineHarness) -> None:
    h.fleet(1)
    pid = h.submit(sla_body(learners=1))
    h.drive(pid, Stage.LEARNERS)
    cmd = h.command(pid, "build")
    result = h.report(cmd, "build.succeeded", artifact={"ref": "env://late"})
    assert result.verdict == "ignore"
    assert h.stage(pid) is Stage.LEARNERS
    assert [t.dest for t in h.store.transitions(pid)].count(Stage.LEARNERS) == 1


# --- require_enough_learners --------------------------------------------------------------------------


def test_require_enough_learners_waits_for_all_of_them(h: EngineHarness) -> None:
    h.fleet(3)
    pid = h.submit(sla_body(learners=3))
    h.drive(pid, Stage.LEARNERS)
    cmds = h.commands(pid, "run_learner")
    for cmd in cmds[:2]:
        assert h.report(cmd, "learner.ready", agent_id=cmd.agent_id).verdict == "accept"
        assert h.stage(pid) is Stage.LEARNERS
    # A repeated learner (new event id, same agent) does not count twice.
    h.report(cmds[0], "learner.ready", agent_id=cmds[0].agent_id)
    assert h.stage(pid) is Stage.LEARNERS
    assert _rejections(h, pid) == []  # waiting is not a refusal
    machine, project = _machine(Stage.LEARNERS, learners=3, learners_ready=["a", "b"])
    assert not machine.fire(project, "learners_ready")
    assert project.refusal == "require_enough_learners: 2 of 3 learners ready"
    h.report(cmds[2], "learner.ready", agent_id=cmds[2].agent_id)
    assert h.stage(pid) is Stage.AGGREGATION
    assert h.command(pid, "run_aggregator").spec["learners"] == 3


def test_require_enough_learners_ignores_agents_it_did_not_pick(h: EngineHarness) -> None:
    h.fleet(2)
    h.announce("extra", ("learner",), {"digits": 1})
    pid = h.submit(sla_body(learners=2))
    h.drive(pid, Stage.LEARNERS)
    cmd = h.commands(pid, "run_learner")[0]
    h.report(cmd, "learner.ready", agent_id=cmd.agent_id)
    result = h.report(cmd, "learner.ready", agent_id="extra")
    assert result.verdict == "ignore" and "answers no pending command" in result.reason
    assert h.stage(pid) is Stage.LEARNERS


def test_require_enough_learners_does_not_guard_failing() -> None:
    machine, project = _machine(Stage.LEARNERS, learners=3, learners_ready=[])
    assert machine.fire(project, "fail", reason="x")
    assert project.stage is Stage.FINISHED


# --- reject_stale_training_result ---------------------------------------------------------------------


def test_reject_stale_training_result_refuses_another_aggregator(h: EngineHarness) -> None:
    h.fleet(1)
    pid = h.submit(sla_body(learners=1))
    h.drive(pid, Stage.AGGREGATION)
    cmd = h.command(pid, "run_aggregator")
    stale = cmd.model_copy(update={"command_id": f"{pid}.1.run_aggregator"})
    h.sent_earlier(stale)
    result = h.report(stale, "training.succeeded", best_round=1, model_ref="/old")
    assert result.verdict == "reject"
    expected = (
        f"reject_stale_training_result: training result for command {pid}.1.run_aggregator "
        f"does not answer the running aggregator {cmd.command_id}"
    )
    assert _rejections(h, pid) == [expected]
    assert h.stage(pid) is Stage.AGGREGATION
    assert "model" not in h.store.get(pid).ctx  # type: ignore[union-attr]
    h.report(cmd, "training.succeeded", best_round=2, model_ref="/best")
    assert h.stage(pid) is Stage.POST_TRAINING
    assert h.command(pid, "build_model_image").spec["model"]["model_ref"] == "/best"


def test_reject_stale_training_result_is_not_consulted_after_aggregation(h: EngineHarness) -> None:
    h.fleet(1)
    pid = h.submit(sla_body(learners=1))
    h.drive(pid, Stage.POST_TRAINING)
    cmd = h.command(pid, "run_aggregator")
    result = h.report(cmd, "training.succeeded", best_round=1, model_ref="/again")
    assert result.verdict == "ignore"
    assert h.stage(pid) is Stage.POST_TRAINING
    assert _rejections(h, pid) == []


# --- require_deadline_passed --------------------------------------------------------------------------


def test_require_deadline_passed_refuses_an_earlier_stages_deadline() -> None:
    machine, project = _machine(Stage.BUILDER)
    assert not machine.fire(project, "time_out", stage=Stage.PREPARATION, now=1000.0, reason="x")
    assert project.refusal == "require_deadline_passed: deadline was for preparation, project is in builder"
    assert project.stage is Stage.BUILDER


def test_require_deadline_passed_refuses_a_deadline_still_ahead() -> None:
    machine, project = _machine(Stage.AGGREGATION)
    assert not machine.fire(project, "time_out", stage=Stage.AGGREGATION, now=99.0, reason="x")
    assert project.refusal == "require_deadline_passed: deadline not reached"


def test_require_deadline_passed_lets_a_due_deadline_through(h: EngineHarness) -> None:
    machine, project = _machine(Stage.AGGREGATION)
    assert machine.fire(project, "time_out", stage=Stage.AGGREGATION, now=100.0, reason="x")
    assert project.stage is Stage.FINISHED
    # And through the engine: not before the deadline, exactly at it.
    pid = h.submit(sla_body(deadlines={"preparation": 30}))
    h.clock.advance(29.999)
    assert h.check_deadlines() == []
    h.clock.advance(0.001)
    h.check_deadlines()
    record = h.store.get(pid)
    assert record is not None and record.outcome is Outcome.FAILED


# --- rejections reach the user with their place in the stream -----------------------------------------


def test_rejections_keep_the_event_stream_in_sequence(h: EngineHarness) -> None:
    """A rejected report on an active project is recorded on its stream without reusing a sequence number
    (which would also let a later event replace the rejection in the outbox); an unreadable one names no
    project and goes to the error topic."""
    h.fleet(1)
    pid = h.submit(sla_body(learners=1))
    h.resolve(pid)
    result = h.report_raw("builder-1", {"garbage": 1})
    assert result.verdict == "reject" and "invalid report" in result.reason
    assert [i.topic for i in result.outbox] == ["flops/v1/errors"]
    build = h.command(pid, "build")
    # A report the project's guards refuse (an earlier build's result): on its stream, numbered like any event.
    stale = build.model_copy(update={"command_id": f"{pid}.99.build"})
    h.sent_earlier(stale)
    assert h.report(stale, "build.succeeded", artifact={"ref": "env://old"}).verdict == "reject"
    # A report naming no command sent to its agent: refused on the error topic, the stream untouched.
    stray = {"event_id": "e-x", "project_id": pid, "source": "x", "kind": "build.succeeded", "artifact": {"ref": "x"}}
    stray_result = h.report_raw("builder-1", stray)
    assert stray_result.verdict == "reject" and [i.topic for i in stray_result.outbox] == ["flops/v1/errors"]
    h.drive(pid, Stage.FINISHED)
    seqs = [e.seq for e in h.events(pid)]
    assert seqs == list(range(1, len(seqs) + 1))
    assert len([e.message for e in h.events(pid) if e.kind == "rejected"]) == 1
    # Nothing of the stream was coalesced away in the outbox.
    keys = [i.key for i in h.store.outbox() if i.key.startswith(f"ev:{pid}:")]
    assert len(keys) == len(seqs)


def test_reports_for_a_finished_project_are_rejected_once(h: EngineHarness) -> None:
    h.fleet(1)
    pid = h.submit(sla_body(learners=1))
    h.resolve(pid)
    h.cancel(pid)
    cmd = h.command(pid, "build")
    first = h.report(cmd, "build.succeeded", event_id="e-late", artifact={"ref": "env://x"})
    assert first.verdict == "reject" and f"for finished project {pid}" in first.reason
    assert h.report(cmd, "build.succeeded", event_id="e-late", artifact={"ref": "env://x"}).verdict == "ignore"
    assert len(_rejections(h, pid)) == 1
    record = h.store.get(pid)
    assert record is not None and record.outcome is Outcome.CANCELLED


def test_report_for_an_unknown_project_goes_to_the_error_topic(h: EngineHarness) -> None:
    body = {"event_id": "e-1", "project_id": "p-ghost", "source": "x", "kind": "build.started"}
    result = h.report_raw("x", body)
    assert result.verdict == "reject" and result.reason == "unknown project p-ghost"
    assert [i.topic for i in result.outbox] == ["flops/v1/errors"]
