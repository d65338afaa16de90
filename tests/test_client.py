"""The client side of the protocol against a real broker: following a project's stream."""

from __future__ import annotations

from flops import topics
from flops.bus import Bus, BusOptions
from flops.client import Client
from flops.lifecycle_stages import Outcome, Stage
from flops.messages import ProjectEvent, ProjectState, new_id
from flops.settings import BrokerAddress


def test_follow_skips_an_event_repeated_with_the_same_seq(broker: BrokerAddress) -> None:
    # After a kill -9 the manager re-publishes its outbox, so an event can arrive twice (same seq).
    project_id = new_id("p")
    publisher = Bus(broker, BusOptions(client_id=new_id("test-pub"))).connect()
    state_topic, events_topic = topics.project_state("tests", project_id), topics.project_events("tests", project_id)
    try:
        running = ProjectState(project_id=project_id, stage=Stage.AGGREGATION, seq=1)
        publisher.publish_wait(state_topic, running.to_bytes(), retain=True)
        with Client(broker) as client:
            followed = client.follow(project_id, timeout=10)
            assert next(followed) == running
            first = ProjectEvent(project_id=project_id, seq=2, kind="round.completed", message="round 1")
            second = ProjectEvent(project_id=project_id, seq=3, kind="round.completed", message="round 2")
            for event in (first, first, second, first):
                publisher.publish_wait(events_topic, event.to_bytes())
            done = ProjectState(project_id=project_id, stage=Stage.FINISHED, outcome=Outcome.COMPLETED, seq=4)
            publisher.publish_wait(state_topic, done.to_bytes(), retain=True)
            rest = list(followed)
        assert [i.seq for i in rest if isinstance(i, ProjectEvent)] == [2, 3]
        assert rest[-1] == done
    finally:
        publisher.publish_wait(state_topic, b"", retain=True)
        publisher.close()
