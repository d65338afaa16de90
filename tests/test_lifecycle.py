"""The project lifecycle: the stage table, and the engine taking projects through it.

Table-driven over every (stage, trigger) pair; then engine-level (no broker): the happy path, cancel and
deadlines in every stage a project can rest in, failures, and the retained state a watcher sees.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import pytest

from flops.lifecycle import EDGES, TRIGGERS, Lifecycle, Project, edges_for, mermaid
from flops.lifecycle_stages import ACTIVE_STAGES, Outcome, Stage
from flops.messages import ProjectRequest, Reply
from flops.sla import ProjectSLA
from flops.store import ProjectRecord
from flops.store_sqlite import SQLiteStore
from tests.engine_support import COMMIT, RESTING_STAGES, EngineHarness, sla_body

P, S, B, L, A, T, F = (
    Stage.PREPARATION,
    Stage.START,
    Stage.BUILDER,
    Stage.LEARNERS,
    Stage.AGGREGATION,
    Stage.POST_TRAINING,
    Stage.FINISHED,
)

# The stage table as the architecture brief states it, written out independently of EDGES.
EXPECTED: dict[tuple[Stage, str], Stage] = {
    (P, "prepared"): S,
    (S, "started"): B,
    (B, "built"): L,
    (L, "learners_ready"): A,
    (A, "trained"): T,
    (T, "post_trained"): F,
    **{(s, "fail"): F for s in (P, S, B, L, A, T)},
    **{(s, "cancel"): F for s in (P, S, B, L, A, T)},
    **{(s, "time_out"): F for s in (P, S, B, L, A, T)},
}
PAIRS = [(stage, trigger) for stage in Stage for trigger in sorted(TRIGGERS)]


def test_triggers_are_the_documented_ones() -> None:
    documented = {"prepared", "started", "built", "learners_ready", "trained", "post_trained", "fail", "cancel"}
    assert documented | {"time_out"} == TRIGGERS


@pytest.mark.parametrize(("stage", "trigger"), PAIRS, ids=[f"{s.value}-{t}" for s, t in PAIRS])
def test_table_allows_exactly_the_documented_edges(stage: Stage, trigger: str) -> None:
    dests = [e.dest for e in edges_for(stage) if e.trigger == trigger]
    assert dests == ([EXPECTED[(stage, trigger)]] if (stage, trigger) in EXPECTED else [])


def _project(stage: Stage, **ctx: Any) -> tuple[Lifecycle, Project, list[tuple[Stage, Stage, str]]]:
    """A project at ``stage`` whose context satisfies every guard (unless ``ctx`` says otherwise)."""
    sla = ProjectSLA.model_validate(sla_body(learners=1))
    context = {
        "commit": COMMIT,
        "inventory_ok": True,
        "build_command_id": "p-1.1.build",
        "learners_ready": ["learner-0"],
        "aggregator_command_id": "p-1.4.run_aggregator",
        **ctx,
    }
    record = ProjectRecord("p-1", stage, sla.model_dump(mode="json"), 0.0, 0.0, deadline_at=10.0, ctx=context)
    changes: list[tuple[Stage, Stage, str]] = []
    project = Project(record=record, sla=sla, on_change=lambda p, s, d, t, data: changes.append((s, d, t)))
    lifecycle = Lifecycle()
    lifecycle.add(project)
    return lifecycle, project, changes


GUARD_DATA = {
    "built": {"command_id": "p-1.1.build"},
    "trained": {"command_id": "p-1.4.run_aggregator"},
    "time_out": {"now": 11.0},
}


@pytest.mark.parametrize(("stage", "trigger"), PAIRS, ids=[f"{s.value}-{t}" for s, t in PAIRS])
def test_machine_fires_exactly_the_documented_edges(stage: Stage, trigger: str) -> None:
    lifecycle, project, changes = _project(stage)
    data = dict(GUARD_DATA.get(trigger, {}))
    if trigger == "time_out":
        data["stage"] = stage
    fired = lifecycle.fire(project, trigger, **data)
    if (stage, trigger) in EXPECTED:
        assert fired, project.refusal
        assert project.stage is EXPECTED[(stage, trigger)]
        assert changes == [(stage, EXPECTED[(stage, trigger)], trigger)]
    else:
        assert not fired
        assert project.stage is stage
        assert changes == []
        assert project.refusal == f"{trigger} is not possible in stage {stage}"


def test_unknown_trigger_is_a_bug_not_a_refusal() -> None:
    lifecycle, project, _ = _project(P)
    with pytest.raises(ValueError, match="unknown trigger"):
        lifecycle.fire(project, "teleport")


def test_terminal_edges_carry_the_outcome() -> None:
    outcomes = {e.trigger: e.outcome for e in EDGES if e.dest is F}
    assert outcomes == {
        "post_trained": Outcome.COMPLETED,
        "fail": Outcome.FAILED,
        "cancel": Outcome.CANCELLED,
        "time_out": Outcome.FAILED,
    }
    assert not edges_for(F)


def test_mermaid_diagram_is_rendered_from_the_table() -> None:
    text = mermaid()
    assert "preparation --> start: prepared [require_resolved_commit, require_inventory]" in text
    assert "builder --> learners: built [reject_stale_build_result]" in text
    assert "from any active stage: fail, cancel, time_out" in text


# --- engine level ------------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite"])
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> EngineHarness:
    store = SQLiteStore(tmp_path / "m.sqlite3") if request.param == "sqlite" else None
    return EngineHarness(tmp_path, store)


@pytest.fixture
def h(tmp_path: Path) -> EngineHarness:
    return EngineHarness(tmp_path)


def test_happy_path_visits_every_stage_once_in_order(harness: EngineHarness) -> None:
    h = harness
    h.fleet(2)
    pid = h.submit()
    entered = {P: h.clock()}
    for stage in (B, L, A, T, F):
        h.clock.advance(10)
        h.drive(pid, stage)
        entered[stage] = h.clock()
    entered[S] = entered[B]  # start is left in the unit that enters it
    record = h.store.get(pid)
    assert record is not None
    assert (record.stage, record.outcome, record.reason) == (
        F,
        Outcome.COMPLETED,
        "model served at http://127.0.0.1:9/",
    )
    assert record.failed_stage is None
    assert list(record.timestamps) == [f"{s.value}_at" for s in Stage]
    assert record.timestamps == {f"{s.value}_at": entered[s] for s in Stage}
    log = h.store.transitions(pid)
    assert [(t.source, t.dest) for t in log] == [(None, P), (P, S), (S, B), (B, L), (L, A), (A, T), (T, F)]
    assert [t.trigger for t in log] == ["create", *EXPECTED_TRIGGERS]
    assert [t.ts for t in log[1:]] == [entered[t.dest] for t in log[1:]]
    state = h.state(pid)
    assert state.stage is F and state.outcome is Outcome.COMPLETED
    assert state.model_url == "http://127.0.0.1:9/"
    assert state.progress.round == state.progress.rounds == 3
    changes = [e.message for e in h.events(pid) if e.kind == "stage.changed"]
    assert changes[0] == "preparation -> start" and changes[-1].startswith("post_training -> finished: completed")
    # Every involved agent is told to stop, and the model server is kept running.
    stops = h.commands(pid, "stop_project")
    assert {c.agent_id for c in stops} == {"builder-1", "agg-1", "learner-0", "learner-1"}
    assert all(c.spec == {"keep": ["serve_model"]} for c in stops)
    # The finished project has left the machine: nothing more fires for it.
    assert pid not in h.engine.lifecycle.projects
    assert h.store.unfinished() == []


EXPECTED_TRIGGERS = ["prepared", "started", "built", "learners_ready", "trained", "post_trained"]


def test_no_post_training_steps_finish_right_after_training(h: EngineHarness) -> None:
    h.fleet(1)
    pid = h.submit(sla_body(learners=1, rounds=1, steps=()))
    h.drive(pid, T)
    record = h.store.get(pid)
    assert record is not None
    assert (record.stage, record.outcome, record.reason) == (F, Outcome.COMPLETED, "training completed")
    assert h.commands(pid, "build_model_image") == []
    assert "post_training_at" in record.timestamps


def test_build_only_post_training_completes_when_packaged(h: EngineHarness) -> None:
    h.fleet(1)
    pid = h.submit(sla_body(learners=1, rounds=1, steps=("build_image_for_trained_model",)))
    h.drive(pid, F)
    record = h.store.get(pid)
    assert record is not None and (record.outcome, record.reason) == (Outcome.COMPLETED, "model packaged")
    assert h.commands(pid, "serve_model") == []
    assert all(c.spec == {"keep": ["serve_model"]} for c in h.commands(pid, "stop_project"))


def test_artifact_cache_hit_skips_the_build(h: EngineHarness) -> None:
    h.fleet(1)
    first = h.submit(sla_body(learners=1, rounds=1, steps=()))
    h.drive(first, F)
    second = h.submit(sla_body(learners=1, rounds=1, steps=()))
    h.resolve(second)
    assert h.stage(second) is L
    assert h.commands(second, "build") == []
    assert any("cache hit" in e.message for e in h.events(second))


def test_start_is_transient(h: EngineHarness) -> None:
    """A project never rests in start: it is entered and left in one unit (so only the table tests it)."""
    h.fleet(1)
    pid = h.submit(sla_body(learners=1))
    h.resolve(pid)
    record = h.store.get(pid)
    assert record is not None and record.stage is B
    assert record.timestamps["start_at"] == record.timestamps["builder_at"]
    assert record.ctx["workspace"]["root"] == str(h.tmp_path / "projects" / pid)


def _involved(h: EngineHarness, pid: str) -> set[str]:
    return {c.agent_id for c in h.commands(pid) if c.kind != "stop_project"}


@pytest.mark.parametrize("stage", RESTING_STAGES, ids=lambda s: s.value)
def test_cancel_in_every_active_stage(h: EngineHarness, stage: Stage) -> None:
    h.fleet(2)
    pid = h.submit()
    h.drive(pid, stage)
    assert h.stage(pid) is stage
    involved = _involved(h, pid)
    h.clock.advance(3)
    result = h.cancel(pid, "wrong data")
    assert result.verdict == "accept"
    record = h.store.get(pid)
    assert record is not None
    assert (record.stage, record.outcome, record.reason) == (F, Outcome.CANCELLED, "wrong data")
    assert record.failed_stage is None
    assert record.timestamps["finished_at"] == h.clock()
    stops = h.commands(pid, "stop_project")
    assert sorted(c.agent_id for c in stops) == sorted(involved)
    assert all(c.spec == {"keep": []} for c in stops)
    if stage is not P:
        assert involved  # from the builder on, the project has something running somewhere
    state = h.state(pid)
    assert (state.stage, state.outcome, state.reason) == (F, Outcome.CANCELLED, "wrong data")
    # A second cancel is refused with a reason, not an exception.
    again = h.cancel(pid)
    assert again.verdict == "reject" and "already finished" in again.reason
    assert [t.dest for t in h.store.transitions(pid)].count(F) == 1


def test_cancel_of_unknown_project_is_refused(h: EngineHarness) -> None:
    result = h.cancel("p-nope")
    assert result.verdict == "reject" and "unknown project p-nope" in result.reason


DEFAULT_DEADLINES = {P: 600, B: 1800, L: 600, A: 3600, T: 900}


@pytest.mark.parametrize("stage", RESTING_STAGES, ids=lambda s: s.value)
def test_deadline_fails_the_project_in_every_active_stage(h: EngineHarness, stage: Stage) -> None:
    h.fleet(2)
    pid = h.submit()
    h.drive(pid, stage)
    involved = _involved(h, pid)
    h.clock.advance(DEFAULT_DEADLINES[stage] - 1)
    assert h.check_deadlines() == []
    assert h.stage(pid) is stage
    h.clock.advance(2)
    assert h.check_deadlines()
    record = h.store.get(pid)
    assert record is not None
    assert (record.stage, record.outcome, record.failed_stage) == (F, Outcome.FAILED, stage)
    assert record.reason == f"timed out in {stage.value} after {DEFAULT_DEADLINES[stage]} s"
    assert sorted(c.agent_id for c in h.commands(pid, "stop_project")) == sorted(involved)
    state = h.state(pid)
    assert (state.outcome, state.failed_stage, state.reason) == (Outcome.FAILED, stage, record.reason)
    assert h.store.transitions(pid)[-1].trigger == "time_out"
    # Later checks find nothing more to do.
    h.clock.advance(10_000)
    assert h.check_deadlines() == []


@pytest.mark.parametrize("stage", RESTING_STAGES, ids=lambda s: s.value)
def test_sla_deadline_overrides_the_default(h: EngineHarness, stage: Stage) -> None:
    h.fleet(2)
    pid = h.submit(sla_body(deadlines={stage.value: 5}))
    h.drive(pid, stage)
    record = h.store.get(pid)
    assert record is not None and record.deadline_at == h.clock() + 5
    h.clock.advance(4)
    assert h.check_deadlines() == [] and h.stage(pid) is stage
    h.clock.advance(1)
    h.check_deadlines()
    record = h.store.get(pid)
    assert record is not None
    assert (record.outcome, record.reason) == (Outcome.FAILED, f"timed out in {stage.value} after 5 s")


def test_deadline_restarts_in_every_stage(h: EngineHarness) -> None:
    """The clock of a stage starts when it is entered: slow earlier stages do not eat a later one's time."""
    h.fleet(1)
    pid = h.submit(sla_body(learners=1, deadlines={"builder": 100, "learners": 100}))
    h.drive(pid, B)
    h.clock.advance(90)
    h.drive(pid, L)
    h.clock.advance(90)
    assert h.check_deadlines() == []
    assert h.stage(pid) is L


class _Watched(ProjectRecord):
    """A record that notes, in ``read``, every project whose deadline is looked at."""

    read: ClassVar[set[str]] = set()

    def __getattribute__(self, name: str) -> Any:
        if name == "deadline_at":
            _Watched.read.add(object.__getattribute__(self, "project_id"))
        return object.__getattribute__(self, name)


def test_a_deadline_check_looks_only_at_the_projects_that_are_due(h: EngineHarness) -> None:
    """The check runs twice a second: it must cost O(due projects), not a scan of every live one."""
    now = h.clock()
    body = ProjectSLA.model_validate(sla_body()).model_dump(mode="json", by_alias=True)
    with h.store.batch():
        for i in range(5_000):
            deadline = now - 1 if i == 1234 else now + 60 + i % 500
            record = _Watched(f"p-{i}", P, body, now - 10, now - 10, deadline_at=deadline)
            with h.store.unit() as unit:
                unit.insert(record)
    h.engine.reload_all()
    assert len(h.engine.lifecycle.projects) == 5_000
    _Watched.read.clear()

    assert h.check_deadlines()
    assert _Watched.read == {"p-1234"}
    assert h.stage("p-1234") is F

    _Watched.read.clear()
    assert h.check_deadlines() == []
    assert _Watched.read == set()
    # The next ones come due in deadline order.
    h.clock.advance(60.5)
    assert h.check_deadlines()
    assert h.stage("p-0") is F and h.stage("p-1") is P


def test_the_deadline_index_stays_bounded_as_projects_come_and_go(h: EngineHarness) -> None:
    """Entries of finished projects are dropped lazily; many short projects must not pile them up."""
    keep = h.submit(sla_body(deadlines={"preparation": 5000}))
    for _ in range(1_500):
        h.cancel(h.submit())
    assert len(h.engine.lifecycle.projects) == 1
    assert len(h.engine._deadlines) <= 1_100
    h.clock.advance(4_999)
    assert h.check_deadlines() == []
    h.clock.advance(1)
    assert h.check_deadlines() and h.stage(keep) is F


def _fail_case(h: EngineHarness, pid: str, what: str) -> None:
    if what == "build.failed":
        h.report(h.command(pid, "build"), "build.failed", reason="no model_manager.py", log_tail="ls: repo")
    elif what == "learner.failed":
        cmd = h.commands(pid, "run_learner")[0]
        h.report(cmd, "learner.failed", agent_id=cmd.agent_id, reason="no data", log_tail="")
    elif what == "training.failed":
        h.report(h.command(pid, "run_aggregator"), "training.failed", reason="flower crashed", log_tail="trace")
    elif what == "model.failed":
        h.report(h.command(pid, "build_model_image"), "model.failed", reason="disk full")
    elif what == "command.failed":
        h.report(h.command(pid, "build"), "command.failed", reason="unknown kind")
    elif what.startswith("offline:"):
        h.offline(what.split(":", 1)[1])
    elif what == "repo.unresolved":
        from flops.hooks import Internal

        h.published.extend(h.engine.internal(Internal(pid, "repo.unresolved", {"reason": "no such repo"})).outbox)
    else:  # pragma: no cover
        raise AssertionError(what)


FAILURES = [
    (P, "repo.unresolved", "cannot resolve https://example.org/ml-repo.git: no such repo (in preparation)"),
    (B, "build.failed", "build failed: no model_manager.py (in builder)\nls: repo"),
    (B, "command.failed", "build failed: unknown kind (in builder)"),
    (B, "offline:builder-1", "agent builder-1 went offline during builder"),
    (L, "learner.failed", "learner failed: no data (in learners)"),
    (L, "offline:learner-1", "agent learner-1 went offline during learners"),
    (L, "offline:agg-1", "aggregator agent agg-1 went offline (in learners)"),
    (A, "training.failed", "training failed: flower crashed (in aggregation)\ntrace"),
    (A, "offline:agg-1", "agent agg-1 went offline during aggregation"),
    (T, "model.failed", "post-training failed: disk full (in post_training)"),
    (T, "offline:agg-1", "agent agg-1 went offline during post_training"),
]


@pytest.mark.parametrize(("stage", "what", "reason"), FAILURES, ids=[f"{s.value}-{w}" for s, w, _ in FAILURES])
def test_failures_end_the_project_with_their_cause(h: EngineHarness, stage: Stage, what: str, reason: str) -> None:
    h.fleet(2)
    pid = h.submit()
    h.drive(pid, stage)
    involved = _involved(h, pid)
    _fail_case(h, pid, what)
    record = h.store.get(pid)
    assert record is not None
    assert (record.stage, record.outcome, record.failed_stage, record.reason) == (F, Outcome.FAILED, stage, reason)
    state = h.state(pid)
    assert (state.outcome, state.failed_stage, state.reason) == (Outcome.FAILED, stage, reason)
    assert sorted(c.agent_id for c in h.commands(pid, "stop_project")) == sorted(involved)
    assert [e.message for e in h.events(pid) if e.kind == "stage.changed"][-1] == (
        f"{stage.value} -> finished: failed ({reason})"
    )


def test_losing_a_learner_during_aggregation_fails_when_too_few_remain(h: EngineHarness) -> None:
    """Flower waits for min_available_clients learners before every round, without end: fail now instead."""
    h.fleet(2)
    pid = h.submit()
    h.drive(pid, A)
    cmd = h.commands(pid, "run_learner")[0]
    assert h.report(cmd, "learner.failed", agent_id=cmd.agent_id, reason="oom").verdict == "accept"
    record = h.store.get(pid)
    assert (record.stage, record.outcome, record.failed_stage) == (Stage.FINISHED, Outcome.FAILED, A)
    assert record.reason.startswith(f"learner on {cmd.agent_id} failed: oom; 1 learner(s) left")
    assert "min_fit_clients 2" in record.reason


def test_a_learner_agent_going_offline_during_aggregation_counts_as_a_lost_learner(h: EngineHarness) -> None:
    h.fleet(2)
    pid = h.submit()
    h.drive(pid, A)
    learner = next(
        c.agent_id for c in h.commands(pid, "run_learner") if c.agent_id != h.command(pid, "run_aggregator").agent_id
    )
    h.offline(learner)
    record = h.store.get(pid)
    assert (record.stage, record.outcome) == (Stage.FINISHED, Outcome.FAILED)
    assert f"learner on {learner} failed: its agent went offline" in record.reason


def test_uninvolved_agent_going_offline_changes_nothing(h: EngineHarness) -> None:
    h.fleet(2)
    h.announce("bystander", ("learner",), {"digits": 1})  # least data: not picked
    pid = h.submit()
    h.drive(pid, A)
    assert "bystander" not in _involved(h, pid)
    before = h.store.get(pid)
    h.offline("bystander")
    assert h.store.get(pid) == before


def test_retained_state_follows_the_rounds(h: EngineHarness) -> None:
    h.fleet(2)
    pid = h.submit(sla_body(rounds=3))
    h.drive(pid, A)
    state = h.state(pid)
    assert (state.stage, state.outcome, state.progress.round, state.progress.rounds) == (A, None, 0, 3)
    assert state.deadline_at == h.clock() + 3600
    cmd = h.command(pid, "run_aggregator")
    h.report(cmd, "round.completed", round=1, loss=0.9, accuracy=0.4, examples=10)
    h.report(cmd, "round.completed", round=2, loss=0.5, accuracy=0.7, examples=10)
    state = h.state(pid)
    assert state.stage is A and state.outcome is None and state.reason is None
    assert state.progress.model_dump() == {"round": 2, "rounds": 3, "loss": 0.5, "accuracy": 0.7}
    assert list(state.stage_timestamps) == ["preparation_at", "start_at", "builder_at", "learners_at", "aggregation_at"]
    # A late report of an earlier round does not move progress backwards.
    h.report(cmd, "round.completed", round=1, loss=0.9, accuracy=0.4)
    assert h.state(pid).progress.round == 2
    rounds = [e for e in h.events(pid) if e.kind == "round.completed"]
    assert [e.data["round"] for e in rounds] == [1, 2, 1]
    assert rounds[1].message == "round 2/3: loss 0.5 accuracy 0.7"


def test_preparation_waits_for_inventory_then_starts(h: EngineHarness) -> None:
    pid = h.submit(sla_body(learners=2))
    assert h.resolves == [(pid, "https://example.org/ml-repo.git", None)]
    h.resolve(pid)
    assert h.stage(pid) is P
    state = h.state(pid)
    assert state.stage is P and state.outcome is None
    waiting = [e.message for e in h.events(pid) if e.kind == "warning"]
    assert waiting and "0 of 2 online learner agents holding ['digits']" in waiting[-1]
    h.fleet(1)
    assert h.stage(pid) is P
    h.announce("learner-9", ("learner",))
    assert h.stage(pid) is B


def test_pinned_commit_needs_no_resolution(h: EngineHarness) -> None:
    h.fleet(1)
    pid = h.submit(sla_body(learners=1, commit="b" * 40))
    assert h.resolves == []
    assert h.stage(pid) is B
    assert h.command(pid, "build").spec["commit"] == "b" * 40


def test_active_stages_are_all_but_finished() -> None:
    assert ACTIVE_STAGES == (P, S, B, L, A, T)


@pytest.mark.parametrize("stage", RESTING_STAGES, ids=lambda s: s.value)
def test_a_restarted_engine_resumes_at_the_stored_stage(tmp_path: Path, stage: Stage) -> None:
    first = EngineHarness(tmp_path, SQLiteStore(tmp_path / "m.sqlite3"))
    first.fleet(2)
    pid = first.submit()
    first.drive(pid, stage)
    first.store.close()

    second = EngineHarness(tmp_path, SQLiteStore(tmp_path / "m.sqlite3"))
    second.clock.now = first.clock.now
    second.published.extend(first.published)  # the workers still hold the commands they were sent
    pending = second.engine.boot()
    assert pid in second.engine.lifecycle.projects
    assert second.engine.lifecycle.projects[pid].stage is stage
    assert pending  # what was not acknowledged yet is published again
    second.fleet(2)  # agents re-announce (retained statuses)
    second.drive(pid, F)
    record = second.store.get(pid)
    assert record is not None and record.outcome is Outcome.COMPLETED
    dests = [t.dest for t in second.store.transitions(pid)]
    assert dests == list(Stage)
    # Nothing was sent twice because of the restart.
    ids = [c.command_id for c in second.commands(pid)]
    assert len(ids) == len(set(ids))


def test_duplicate_request_returns_the_same_project(h: EngineHarness) -> None:
    request = ProjectRequest(request_id="r-same", sla=ProjectSLA.model_validate(sla_body()))
    first = h.engine.request("tests", request.to_bytes(), None)
    mine = "flops/v1/customers/tests/requests/r-other/reply"
    again = h.engine.request("tests", request.to_bytes(), mine)
    assert first.verdict == "accept" and again.verdict == "ignore"
    assert again.project_id == first.project_id
    reply = Reply.model_validate_json(again.outbox[0].payload)
    assert again.outbox[0].topic == mine and reply.duplicate and reply.project_id == first.project_id
    assert len(h.store.projects()) == 1


def test_invalid_request_is_answered_with_field_errors(h: EngineHarness) -> None:
    body = {"request_id": "r-bad", "sla": sla_body() | {"ml_model_flavor": "caffe"}}
    body["sla"]["training_configuration"]["training_rounds"] = 0
    result = h.engine.request("tests", json.dumps(body).encode(), None)
    assert result.verdict == "reject"
    (item,) = result.outbox
    assert item.topic == "flops/v1/customers/tests/requests/r-bad/reply"
    reply = Reply.model_validate_json(item.payload)
    assert reply.project_id is None and reply.errors is not None
    assert {e.field for e in reply.errors} == {"sla.ml_model_flavor", "sla.training_configuration.training_rounds"}
    assert h.store.projects() == []


def test_each_learner_command_carries_its_own_data_token(h: EngineHarness) -> None:
    """The manager issues a fresh read token per learner; agents grant it on their data server for the
    project's tags and revoke it on stop_project."""
    h.fleet(2)
    pid = h.submit()
    h.drive(pid, L)
    tokens = [c.spec.get("data_token") for c in h.commands(pid, "run_learner")]
    assert len(tokens) == 2 and all(isinstance(t, str) and len(t) >= 24 for t in tokens)
    assert len(set(tokens)) == 2


def test_a_placement_report_is_news_in_any_stage_and_dropped_once_the_project_finished(h: EngineHarness) -> None:
    h.fleet(1)
    pid = h.submit(sla_body(learners=1))
    h.resolve(pid)
    cmd = h.command(pid, "build")
    where = {"actor": "builder1", "what": "running", "cluster": "edge1", "node": "edge1-node1"}

    news = h.report(cmd, "actor.placed", event_id="e-run", message="builder1 (build on a): running on node n", **where)

    assert news.verdict == "accept" and h.state(pid).stage is B
    [event] = [e for e in h.events(pid) if e.message == "builder1 (build on a): running on node n"]
    assert event.kind == "report.accepted" and event.data == {k: v for k, v in where.items() if k != "what"}
    h.cancel(pid)
    late = h.report(cmd, "actor.placed", event_id="e-late", message="builder1: scheduled on cluster edge1", **where)
    assert late.verdict == "ignore" and not [e for e in h.events(pid) if e.kind == "rejected"]
