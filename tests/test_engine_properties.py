"""Property: however MQTT delivers a project's worker events (repeated, causally independent ones
reordered, stale ones mixed in), the project ends exactly as with a clean delivery.

A clean run plays the workers of one project in causal order. A perturbed run replays the same events
(same event ids) with every event repeated 0 to 3 times at later positions, the learners' ready reports in
any order, and stale reports injected anywhere: a build result for another command, reports for an
unknown project and for a finished one, a ready report from a learner agent that was not picked.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flops.lifecycle_stages import Stage
from tests.engine_support import COMMIT, EngineHarness, sla_body

STEPS = {
    "none": (),
    "build": ("build_image_for_trained_model",),
    "deploy": ("build_image_for_trained_model", "deploy_trained_model_image"),
}
STALE_KINDS = ("stale_build", "unknown_project", "finished_project", "unpicked_learner", "stale_training")


@dataclass(frozen=True)
class Scenario:
    learners: int
    rounds: int
    steps: str


@dataclass(frozen=True)
class Event:
    """A worker report, named by the command it answers (kind, agent) rather than by its id."""

    event_id: str
    command_kind: str
    report_kind: str
    agent: str | None = None
    fields: tuple[tuple[str, Any], ...] = ()


def clean_events(s: Scenario) -> list[Event]:
    events = [
        Event("e-build-started", "build", "build.started"),
        Event("e-build-ok", "build", "build.succeeded", fields=(("artifact", {"ref": "env://a", "commit": COMMIT}),)),
    ]
    for i in range(s.learners):
        agent = f"learner-{i}"
        events.append(
            Event(f"e-ready-{i}", "run_learner", "learner.ready", agent, (("agent_id", agent), ("examples", 10 + i)))
        )
    events.append(Event("e-agg-started", "run_aggregator", "aggregator.started", fields=(("address", "h:1"),)))
    for k in range(1, s.rounds + 1):
        metrics = (("round", k), ("loss", 1.0 / k), ("accuracy", 0.5 + k / 10), ("examples", 100))
        events.append(Event(f"e-round-{k}", "run_aggregator", "round.completed", fields=metrics))
    events.append(
        Event(
            "e-trained",
            "run_aggregator",
            "training.succeeded",
            fields=(("best_round", s.rounds), ("loss", 0.1), ("accuracy", 0.9), ("model_ref", "/m")),
        )
    )
    if s.steps in ("build", "deploy"):
        events.append(Event("e-model-built", "build_model_image", "model.built", fields=(("image_ref", "dir:///m"),)))
    if s.steps == "deploy":
        events.append(Event("e-served", "serve_model", "model.served", fields=(("url", "http://m:9/"),)))
    return events


class Run:
    """One engine with the fleet, a finished bystander project, and the project under test."""

    def __init__(self, tmp: Path, s: Scenario) -> None:
        self.h = EngineHarness(tmp)
        self.h.fleet(s.learners)
        self.h.announce("extra", ("learner",), {"digits": 1})  # holds least data: never picked
        self.done = self.h.submit(sla_body(learners=s.learners, commit=COMMIT))
        self.h.cancel(self.done)
        body = sla_body(learners=s.learners, rounds=s.rounds, steps=STEPS[s.steps], commit=COMMIT)
        self.pid = self.h.submit(body)
        self.stale = 0

    def deliver(self, event: Event) -> None:
        cmds = self.h.commands(self.pid, event.command_kind)
        if event.agent is not None:
            cmds = [c for c in cmds if c.agent_id == event.agent]
        assert len(cmds) == 1, f"{event} delivered before its command"
        self.h.report(cmds[0], event.report_kind, event_id=event.event_id, **dict(event.fields))

    def inject(self, kind: str) -> None:
        self.stale += 1
        eid = f"e-stale-{self.stale}"
        base = {"event_id": eid, "source": "stale-worker", "ts": 0.0}
        if kind == "stale_build":
            body = {**base, "project_id": self.pid, "command_id": f"{self.pid}.99.build", "kind": "build.succeeded"}
            self.h.report_raw("stale-worker", {**body, "artifact": {"ref": "env://stale"}})
        elif kind == "stale_training":
            body = {**base, "project_id": self.pid, "command_id": f"{self.pid}.98.run_aggregator"}
            self.h.report_raw(
                "stale-worker", {**body, "kind": "training.succeeded", "best_round": 1, "model_ref": "/x"}
            )
        elif kind == "unknown_project":
            body = {**base, "project_id": "p-ghost", "command_id": "p-ghost.1.build", "kind": "build.started"}
            self.h.report_raw("stale-worker", body)
        elif kind == "finished_project":
            body = {**base, "project_id": self.done, "command_id": f"{self.done}.2.run_learner"}
            self.h.report_raw("stale-worker", {**body, "kind": "learner.ready", "agent_id": "learner-0"})
        elif kind == "unpicked_learner":
            body = {**base, "project_id": self.pid, "command_id": f"{self.pid}.97.run_learner"}
            self.h.report_raw("stale-worker", {**body, "kind": "learner.ready", "agent_id": "extra"})
        else:  # pragma: no cover
            raise AssertionError(kind)

    def outcome(self) -> dict[str, Any]:
        record = self.h.store.get(self.pid)
        assert record is not None

        # The aggregator port is derived from the (random) project id: name it, like the ids.
        port = str(record.ctx.get("aggregator", {}).get("port", "no-port"))

        def norm(value: Any) -> Any:
            text = json.dumps(value).replace(self.pid, "P").replace(self.done, "D")
            # Command ids end in a random token (unguessable): name it too.
            text = re.sub(r"(\.[a-z_]+)\.[0-9a-f]{12}", r"\1.T", text)
            # So do the tokens the manager hands out (data read tokens, the model server's).
            text = re.sub(r'"(data_token|token|model_token)": "[^"]*"', r'"\1": "T"', text)
            return json.loads(text.replace(f":{port}", ":PORT").replace(f": {port}", ": 0"))

        commands = sorted(
            json.dumps(norm([c.command_id, c.kind, c.agent_id, c.spec]), sort_keys=True)
            for c in self.h.commands(self.pid)
        )
        return {
            "stage": record.stage,
            "outcome": record.outcome,
            "reason": record.reason,
            "failed_stage": record.failed_stage,
            "timestamps": record.timestamps,
            "progress": record.ctx.get("progress"),
            "ctx": norm(record.ctx),
            "commands": commands,
            "transitions": [(t.source, t.dest, t.trigger) for t in self.h.store.transitions(self.pid)],
            "done": self.h.store.get(self.done).outcome,  # type: ignore[union-attr]
        }


scenarios = st.builds(Scenario, st.integers(1, 3), st.integers(1, 4), st.sampled_from(sorted(STEPS)))


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[Scenario, list[tuple[str, Any]]]:
    s = draw(scenarios)
    events = clean_events(s)
    # Learners report ready independently of each other: any order.
    first = next(i for i, e in enumerate(events) if e.report_kind == "learner.ready")
    order = draw(st.permutations(range(s.learners)))
    events[first : first + s.learners] = [events[first + i] for i in order]
    # Sort keys: originals at (i, 0); a repeat of event i at (j >= i, 1, tiebreak); stale ones anywhere.
    keyed: list[tuple[tuple[int, int, int], tuple[str, Any]]] = [
        ((i, 0, 0), ("event", e)) for i, e in enumerate(events)
    ]
    for i, e in enumerate(events):
        for _ in range(draw(st.integers(0, 3))):
            at = draw(st.integers(i, len(events)))
            keyed.append(((at, 1, draw(st.integers(0, 1000))), ("event", e)))
    for kind in draw(st.lists(st.sampled_from(STALE_KINDS), max_size=6)):
        at = draw(st.integers(-1, len(events)))
        keyed.append(((at, 1, draw(st.integers(0, 1000))), ("stale", kind)))
    keyed.sort(key=lambda k: k[0])
    return s, [item for _, item in keyed]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engine-properties")


_CLEAN: dict[Scenario, dict[str, Any]] = {}


def clean_outcome(tmp: Path, s: Scenario) -> dict[str, Any]:
    if s not in _CLEAN:
        run = Run(tmp, s)
        for event in clean_events(s):
            run.deliver(event)
        _CLEAN[s] = run.outcome()
    return _CLEAN[s]


@pytest.mark.parametrize("steps", sorted(STEPS))
def test_clean_run_completes(tmp: Path, steps: str) -> None:
    out = clean_outcome(tmp, Scenario(2, 3, steps))
    assert out["stage"] is Stage.FINISHED and out["outcome"] == "completed"
    assert out["progress"] == {"round": 3, "rounds": 3, "loss": 1.0 / 3, "accuracy": 0.8}
    assert [t[1] for t in out["transitions"]] == list(Stage)
    kinds = [json.loads(c)[1] for c in out["commands"]]
    assert kinds.count("run_learner") == 2 and kinds.count("stop_project") == 4


@settings(max_examples=50, deadline=None)
@given(deliveries())
def test_perturbed_delivery_ends_like_the_clean_one(
    tmp: Path, delivery: tuple[Scenario, list[tuple[str, Any]]]
) -> None:
    s, items = delivery
    expected = clean_outcome(tmp, s)
    run = Run(tmp, s)
    for what, item in items:
        if what == "event":
            run.deliver(item)
        else:
            run.inject(item)
    got = run.outcome()
    assert got == expected
    dests = [t[1] for t in got["transitions"]]
    assert len(dests) == len(set(dests)), f"a stage was entered twice: {dests}"
    # Every event on the project's stream has its own place in it.
    seqs = [e.seq for e in run.h.events(run.pid)]
    assert seqs == list(range(1, len(seqs) + 1))
