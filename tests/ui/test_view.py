"""The view's model: what a project page shows, folded from states and events (no broker, no browser)."""

from __future__ import annotations

from flops.lifecycle_stages import Outcome, Stage
from flops.messages import AgentStatus, Progress, ProjectEvent, ProjectState
from flops.ui.view import Observed, timeline


def _state(seq: int, stage: Stage, **fields: object) -> ProjectState:
    return ProjectState(project_id="p-1", stage=stage, seq=seq, customer="alice", **fields)  # type: ignore[arg-type]


def test_timeline_gives_each_stage_its_start_and_duration_and_the_current_one_so_far() -> None:
    state = _state(3, Stage.BUILDER, stage_timestamps={"preparation_at": 100.0, "start_at": 101.5, "builder_at": 102.0})
    rows = timeline(state, now=110.0)
    assert [(r["stage"], r["started_at"], r["seconds"], r["current"]) for r in rows] == [
        ("preparation", 100.0, 1.5, False),
        ("start", 101.5, 0.5, False),
        ("builder", 102.0, 8.0, True),
    ]
    done = _state(4, Stage.FINISHED, stage_timestamps={"preparation_at": 100.0, "finished_at": 130.0})
    assert [(r["stage"], r["seconds"], r["current"]) for r in timeline(done, now=999.0)] == [
        ("preparation", 30.0, False),
        ("finished", 0.0, False),
    ]


def test_rounds_agents_and_failure_come_from_events_and_state() -> None:
    seen = Observed(clock=lambda: 200.0)
    changes: list[int] = []
    seen.listen(lambda: changes.append(seen.version))
    seen.apply_state("alice", _state(1, Stage.AGGREGATION, stage_timestamps={"preparation_at": 150.0}))
    sent = {"command_id": "p-1.3.run_learner.ab", "command": "run_learner", "agent_id": "node-1"}
    seen.apply_event("alice", ProjectEvent(project_id="p-1", seq=1, kind="report.accepted", data=sent))
    ready = {"agent_id": "node-1", "examples": 450}
    seen.apply_event("alice", ProjectEvent(project_id="p-1", seq=2, kind="report.accepted", data=ready))
    for seq, rnd in ((3, 1), (4, 2), (4, 2)):  # a repeat (the manager re-published its outbox) counts once
        data = {"round": rnd, "loss": 1.0 / rnd, "accuracy": 0.5 + rnd / 10, "examples": 900}
        seen.apply_event("alice", ProjectEvent(project_id="p-1", seq=seq, kind="round.completed", data=data))
    seen.apply_agent(AgentStatus(agent_id="node-1", online=True, ts=190.0))
    failed = _state(
        9,
        Stage.FINISHED,
        outcome=Outcome.FAILED,
        failed_stage=Stage.AGGREGATION,
        reason="training failed: boom (in aggregation)\nTraceback …\nValueError: boom",
        stage_timestamps={"preparation_at": 150.0, "finished_at": 180.0},
        progress=Progress(round=2, rounds=3, accuracy=0.7),
        tracking={"url": "http://mlflow:5005", "run_ids": {"1": "r1"}},
    )
    seen.apply_state("alice", failed)
    seen.apply_state("alice", _state(5, Stage.AGGREGATION))  # stale: older than what we have
    detail = seen.detail("p-1")
    assert detail is not None
    assert [r["round"] for r in detail["rounds_seen"]] == [1, 2]
    assert detail["rounds_seen"][1]["accuracy"] == 0.7
    assert detail["agents"] == [
        {
            "agent_id": "node-1",
            "roles": ["learner"],
            "ready": True,
            "examples": 450,
            "online": True,
            "seen_s": 10.0,
            "host": "127.0.0.1",
        }
    ]
    assert detail["failure"] == {
        "reason": "training failed: boom (in aggregation)",
        "stage": "aggregation",
        "log_tail": "Traceback …\nValueError: boom",
    }
    assert detail["stage"] == "finished" and detail["customer"] == "alice"
    assert detail["tracking"] == {"url": "http://mlflow:5005", "run_ids": {"1": "r1"}}
    assert [s["project_id"] for s in seen.summaries()] == ["p-1"]
    assert len(changes) == 7  # the repeated event changed nothing; the stale state neither
    seen.forget_project("p-1")
    assert seen.detail("p-1") is None and seen.summaries() == []


def test_hierarchical_rounds_become_one_series_per_cluster_and_the_root_cycles() -> None:
    seen = Observed(clock=lambda: 200.0)
    progress = Progress(round=2, rounds=4, cycle=1, cycles=2, clusters={"east": {"rounds": 2}, "west": {"rounds": 2}})
    seen.apply_state("alice", _state(1, Stage.AGGREGATION, progress=progress))
    seq = 0
    for cycle in (1, 2):
        for cluster in ("west", "east"):
            for rnd in (1, 2):
                seq += 1
                data = {"cycle": cycle, "round": rnd, "cluster": cluster, "level": "cluster", "loss": 1.0 / seq}
                seen.apply_event("alice", ProjectEvent(project_id="p-1", seq=seq, kind="round.completed", data=data))
        seq += 1
        root = {"cycle": cycle, "level": "root", "loss": 0.2, "accuracy": 0.9, "examples": 400}
        seen.apply_event("alice", ProjectEvent(project_id="p-1", seq=seq, kind="round.completed", data=root))
    detail = seen.detail("p-1")
    assert detail is not None
    assert detail["rounds_seen"] == []  # no classic rounds: cluster rounds do not overwrite one another
    h = detail["hierarchical"]
    assert (h["cycles"], h["rounds_per_cycle"]) == (2, 2)
    assert sorted(h["clusters_seen"]) == ["east", "west"]
    for points in h["clusters_seen"].values():
        assert [(p["cycle"], p["round"], p["step"]) for p in points] == [(1, 1, 1), (1, 2, 2), (2, 1, 3), (2, 2, 4)]
    assert h["clusters_seen"]["east"][0]["loss"] == 1.0 / 3
    assert [(c["cycle"], c["accuracy"]) for c in h["cycles_seen"]] == [(1, 0.9), (2, 0.9)]
