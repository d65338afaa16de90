"""The Oakestra deployer against the fake System Manager: actors placed one at a time, followed to an outcome,
given up on when Oakestra would loop or hang, cleaned up, and found again after a manager restart.

Time is virtual (:class:`VirtualClock`): the fake moves on per poll, the deployer's deadlines pass as it sleeps.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from flops.errors import TimedOut
from flops.oakestra.client import SystemManager, SystemManagerError
from flops.oakestra.deploy import ActorSpec, EventKind, Phase, Placement, Timing, application_name
from flops.oakestra.fake import FakeSystemManager
from flops.oakestra.watch import ActorEvent
from tests.oakestra.support import FakeControl, VirtualClock, paths

PROJECT = "p-1f3a5b7c9d0e2f4a"
BOUND = 900.0  # virtual seconds: a test whose deployer never gives up fails instead of hanging
TIMING = Timing(poll_interval=2.0, schedule_deadline=30, node_deadline=60, start_deadline=120, failure_grace=60)


def builder(**extra: Any) -> ActorSpec:
    return ActorSpec(
        PROJECT, "builder", "ghcr.io/x/builder:1", ["python3", "main.py"], {"A": "1"}, 2000, 1, True, **extra
    )


def learner(i: int, **extra: Any) -> ActorSpec:
    return ActorSpec(PROJECT, f"flearner{i}", "reg/learner:abc", ["flops-learner"], {"I": str(i)}, 500, 1, **extra)


@pytest.fixture
def placement(sm: SystemManager, clock: VirtualClock) -> Placement:
    return Placement(sm, PROJECT, timing=TIMING, clock=clock)


def kinds(events: list[ActorEvent], actor: str | None = None) -> list[str]:
    return [e.kind.value for e in events if actor is None or e.actor == actor]


def service_id_of(calls: list[dict[str, Any]], name: str) -> str:
    for call in calls:
        created = call["path"] == "/api/service/" and call["response"]["deployed_services"]
        if created and call["body"]["applications"][0]["microservices"][0]["microservice_name"] == name:
            return str(call["response"]["job_id"])
    raise AssertionError(f"no service {name} created")


def test_a_one_shot_builder_runs_to_completed_and_its_service_is_deleted(
    placement: Placement, control: FakeControl
) -> None:
    control.script("^builder", "oneshot_ok", polls_per_step=2)
    events = placement.deploy(builder(addon="image-builder")) + list(placement.follow(timeout=BOUND))

    assert kinds(events) == ["created", "scheduled", "placed", "running", "completed", "deleted"]
    assert events[1].cluster == "cluster1" and events[2].node == "cluster1-node1"
    assert placement.actors["builder"].phase is Phase.COMPLETED
    calls = control.calls()
    service_id = service_id_of(calls, "builder")
    sent = calls[paths(calls).index("POST /api/service/")]["body"]["applications"][0]["microservices"][0]
    assert sent["code"] == "ghcr.io/x/builder:1" and sent["cmd"] == ["python3", "main.py"]
    assert sent["environment"] == ["A=1"] and sent["one_shot"] is True and sent["memory"] == 2000
    assert sent["constraints"][0] == {"type": "direct", "cluster": "cluster1"}
    # Deleted right after the look that saw it COMPLETED, and never looked at again.
    looks = [c for c in calls if c["path"] == f"/api/service/{service_id}" and c["method"] == "GET"]
    assert looks[-1]["response"]["status"] == "COMPLETED"
    assert paths(calls)[-1] == f"DELETE /api/service/{service_id}"


def test_learners_are_deployed_one_at_a_time_each_awaited_on_a_cluster(
    placement: Placement, control: FakeControl
) -> None:
    control.script("^flearner", "ok", polls_per_step=3)
    events: list[ActorEvent] = []
    for i in range(3):
        events += placement.deploy(learner(i, addon="FLOps-learner"))
    events += placement.follow(timeout=BOUND)

    assert placement.pending() == [] and {a.phase for a in placement.actors.values()} == {Phase.RUNNING}
    assert kinds(events, "flearner2") == ["created", "scheduled", "placed", "running"]
    calls = control.calls()
    ids = [service_id_of(calls, f"flearner{i}") for i in range(3)]
    deploys = [n for n, c in enumerate(calls) if c["path"].endswith("/instance") and c["method"] == "POST"]
    assert [calls[n]["path"] for n in deploys] == [f"/api/service/{i}/instance" for i in ids]
    for previous, (start, nxt) in zip(ids, itertools.pairwise(deploys), strict=False):
        # Before the next learner's deploy, a look at the previous one showed its instance on a cluster.
        between = [c for c in calls[start:nxt] if c["path"] == f"/api/service/{previous}" and c["method"] == "GET"]
        assert between and len(between[-1]["response"]["instance_list"]) == 1
        assert all(len(c["response"]["instance_list"]) == 0 for c in between[:-1])


def test_instances_of_one_service_are_requested_one_at_a_time(placement: Placement, control: FakeControl) -> None:
    control.script("^flearner", "ok", polls_per_step=2)
    events = placement.deploy(learner(0, instances=3)) + list(placement.follow(timeout=BOUND))

    assert [e.instance for e in events if e.kind is EventKind.RUNNING] == [0, 1, 2]
    calls = control.calls()
    service_id = service_id_of(calls, "flearner0")
    counts = []  # instances seen by the last look before each deploy
    seen = 0
    for call in calls:
        if call["path"] == f"/api/service/{service_id}" and call["method"] == "GET":
            seen = len(call["response"]["instance_list"])
        elif call["path"] == f"/api/service/{service_id}/instance":
            counts.append(seen)
    assert counts == [0, 1, 2]


def test_no_cluster_with_capacity_fails_the_actor_with_the_reason_and_deletes_it(
    placement: Placement, control: FakeControl, clock: VirtualClock
) -> None:
    control.script("^flearner", "sched_fail")
    start = clock.now
    events = placement.deploy(learner(0)) + list(placement.follow(timeout=BOUND))

    failed = [e for e in events if e.kind is EventKind.FAILED]
    assert len(failed) == 1 and "NoActiveClusterWithCapacity" in (failed[0].reason or "")
    assert kinds(events)[-2:] == ["failed", "deleted"]
    assert clock.now - start <= TIMING.schedule_deadline
    assert paths(control.calls())[-1] == f"DELETE /api/service/{service_id_of(control.calls(), 'flearner0')}"


def test_stuck_in_cluster_scheduled_fails_within_the_deadline_and_is_deleted(
    placement: Placement, control: FakeControl, clock: VirtualClock
) -> None:
    control.script("^flearner", "stuck")
    start = clock.now
    events = placement.deploy(learner(0)) + list(placement.follow(timeout=BOUND))

    assert kinds(events) == ["created", "scheduled", "failed", "deleted"]
    assert events[2].reason == "flearner0 instance 0 still CLUSTER_SCHEDULED after 60 s"
    assert TIMING.node_deadline < clock.now - start <= TIMING.node_deadline + 2 * TIMING.poll_interval
    assert paths(control.calls())[-1].startswith("DELETE /api/service/")


def test_never_scheduled_fails_within_the_schedule_deadline(
    placement: Placement, control: FakeControl, clock: VirtualClock
) -> None:
    control.script("^flearner", steps=["REQUESTED"])
    start = clock.now
    events = placement.deploy(learner(0))

    assert kinds(events) == ["created", "failed", "deleted"]
    assert "not scheduled on any cluster within 30 s" in (events[1].reason or "")
    assert clock.now - start <= TIMING.schedule_deadline + TIMING.poll_interval


@pytest.mark.parametrize(
    ("script", "detail"), [("pull_fail", "failed to pull image reg/learner:abc"), ("crash", "task exited with code 1")]
)
def test_a_restart_loop_is_given_up_after_bounded_restarts_and_deleted(
    placement: Placement, control: FakeControl, script: str, detail: str
) -> None:
    control.script("^flearner", script)
    actor_done = lambda: placement.actors["flearner0"].done  # noqa: E731  (a running learner is watched on)
    events = placement.deploy(learner(0)) + list(placement.follow(until=actor_done, timeout=BOUND))

    assert kinds(events).count("restarted") == TIMING.max_restarts
    failed = [e for e in events if e.kind is EventKind.FAILED]
    assert len(failed) == 1 and detail in (failed[0].reason or "") and "3 failures, gave up" in (failed[0].reason or "")
    assert kinds(events)[-1] == "deleted"
    assert placement.actors["flearner0"].phase is Phase.FAILED
    assert paths(control.calls())[-1].startswith("DELETE /api/service/")


def test_a_one_shot_that_exits_non_zero_fails_at_once(placement: Placement, control: FakeControl) -> None:
    control.script("^builder", "oneshot_fail")
    events = placement.deploy(builder()) + list(placement.follow(timeout=BOUND))

    assert "restarted" not in kinds(events) and kinds(events)[-2:] == ["failed", "deleted"]
    assert "DEAD: task exited with code 1" in (events[-2].reason or "")


def test_a_failure_that_lasts_is_given_up_although_no_restart_was_seen(
    placement: Placement, control: FakeControl, clock: VirtualClock
) -> None:
    # The root sees 15-s snapshots: a fast restart loop can look like FAILED at every poll.
    control.script("^flearner", steps=["CLUSTER_SCHEDULED", "FAILED"])
    events = placement.deploy(learner(0)) + list(placement.follow(timeout=BOUND))

    assert kinds(events) == ["created", "scheduled", "restarted", "failed", "deleted"]
    assert "still FAILED after 60 s: failed to pull image" in (events[3].reason or "")


def test_the_cluster_is_chosen_by_the_addon_it_supports(placement: Placement, control: FakeControl) -> None:
    control.clusters(
        [
            {"cluster_name": "edge", "supported_addons": ["FLOps-learner", "FLOps-learner"]},
            {"cluster_name": "builders", "supported_addons": ["image-builder"]},
        ]
    )
    events = placement.deploy(builder(addon="image-builder")) + placement.deploy(learner(0, addon="FLOps-learner"))

    assert [(e.actor, e.cluster) for e in events if e.kind is EventKind.SCHEDULED] == [
        ("builder", "builders"),
        ("flearner0", "edge"),
    ]
    sent = [c["body"]["applications"][0]["microservices"][0] for c in control.calls() if c["path"] == "/api/service/"]
    assert [s["constraints"] for s in sent] == [
        [{"type": "direct", "cluster": "builders"}, {"type": "addons", "needs": ["image-builder"]}],
        [{"type": "direct", "cluster": "edge"}, {"type": "addons", "needs": ["FLOps-learner"]}],
    ]


def test_no_cluster_offering_the_addon_fails_without_creating_a_service(
    placement: Placement, control: FakeControl
) -> None:
    control.clusters([{"cluster_name": "edge", "supported_addons": ["FLOps-learner"]}])
    events = placement.deploy(builder(addon="image-builder"))

    assert kinds(events) == ["failed"]
    assert "no active Oakestra cluster offers image-builder" in (events[0].reason or "")
    assert "POST /api/service/" not in paths(control.calls())


def test_cancel_deletes_the_whole_application(placement: Placement, control: FakeControl, sm: SystemManager) -> None:
    control.script("^flearner", "ok")
    for i in range(2):
        placement.deploy(learner(i))
    app = placement.open()
    events = placement.close("cancelled")

    assert sorted((e.actor, e.kind.value) for e in events) == [("flearner0", "deleted"), ("flearner1", "deleted")]
    assert paths(control.calls())[-1] == f"DELETE /api/application/{app.id}"
    assert sm.find_application(application_name(PROJECT)) is None
    assert placement.poll() == []  # nothing left to look at


def test_a_restarted_manager_adopts_what_the_previous_one_created(
    fake: FakeSystemManager, control: FakeControl, clock: VirtualClock
) -> None:
    control.script("^flearner", "ok")
    control.script("^builder", "oneshot_ok")
    with SystemManager(fake.url) as before:
        first = Placement(before, PROJECT, timing=TIMING, clock=clock)
        first.deploy(builder())
        first.deploy(learner(0))
        app_id = first.open().id

    control.tick(5)  # the builder completes while no manager is watching
    with SystemManager(fake.url) as after:
        assert Placement.adopt(after, "p-0000000000000000", timing=TIMING, clock=clock) is None
        adopted = Placement.adopt(after, PROJECT, timing=TIMING, clock=clock)
        assert adopted is not None and adopted.open().id == app_id
        assert sorted(adopted.actors) == ["builder", "flearner0"]
        events = list(adopted.follow(timeout=BOUND))
        assert kinds(events, "builder")[-2:] == ["completed", "deleted"]
        assert adopted.actors["flearner0"].phase is Phase.RUNNING
        assert adopted.deploy(learner(0)) == []  # already there: not created twice
        adopted.close("finished")
    assert paths(control.calls())[-1] == f"DELETE /api/application/{app_id}"
    calls = paths(control.calls())  # the adopter created nothing: one application, the first manager's two services
    assert (calls.count("POST /api/application/"), calls.count("POST /api/service/")) == (1, 2)


def test_a_deploy_cut_short_by_an_error_is_resumed_by_calling_it_again(
    placement: Placement, control: FakeControl
) -> None:
    control.fault("GET", "/api/service/[0-9a-f]{24}", 503, {"code": 503, "status": "Service Unavailable"})
    with pytest.raises(SystemManagerError) as cut:
        placement.deploy(learner(0, instances=2))
    assert cut.value.status == 503

    events = placement.deploy(learner(0, instances=2))
    assert kinds(events)[0] == "created"  # the first call's event is not lost
    assert [e.instance for e in events if e.kind is EventKind.SCHEDULED] == [0, 1]
    calls = paths(control.calls())
    assert calls.count("POST /api/service/") == 1
    assert sum(c.endswith("/instance") for c in calls) == 2


def test_follow_is_bounded_by_its_timeout_when_an_actor_keeps_restarting(
    sm: SystemManager, control: FakeControl, clock: VirtualClock
) -> None:
    control.script("^flearner", "crash")
    patient = Placement(sm, PROJECT, timing=Timing(poll_interval=2.0, max_restarts=1000), clock=clock)
    patient.deploy(learner(0))
    start = clock.now
    with pytest.raises(TimedOut):
        list(patient.follow(until=lambda: patient.actors["flearner0"].done, timeout=60))
    assert 60 <= clock.now - start <= 62


def test_a_service_deleted_behind_the_deployers_back_fails_the_actor(
    placement: Placement, control: FakeControl, fake: FakeSystemManager
) -> None:
    control.script("^flearner", "ok")
    placement.deploy(learner(0))
    service_id = placement.actors["flearner0"].service_id
    with SystemManager(fake.url) as operator:
        assert service_id is not None and operator.delete_service(service_id)
    events = placement.poll()

    assert kinds(events) == ["failed"]
    assert events[0].reason == f"flearner0: its Oakestra service {service_id} no longer exists"
    assert placement.poll() == []
