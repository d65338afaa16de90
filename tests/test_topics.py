"""Every topic FLOps uses, table-driven: what each builder returns, how :func:`topics.parse` reads it back,
and that ids which would change a topic's shape are refused."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from flops import topics

C = "flops/v1/customers/alice"
BUILDERS: list[tuple[Callable[..., str], tuple[str, ...], str, tuple[str, str | None, str | None]]] = [
    (topics.requests, ("alice",), f"{C}/requests", ("requests", None, "alice")),
    (topics.request_reply, ("alice", "r-1"), f"{C}/requests/r-1/reply", ("reply", "r-1", "alice")),
    (topics.project_state, ("alice", "p-1"), f"{C}/projects/p-1/state", ("state", "p-1", "alice")),
    (topics.project_events, ("alice", "p-1"), f"{C}/projects/p-1/events", ("events", "p-1", "alice")),
    (topics.project_cancel, ("alice", "p-1"), f"{C}/projects/p-1/cancel", ("cancel", "p-1", "alice")),
    (topics.agent_status, ("node-a",), "flops/v1/agents/node-a/status", ("agent_status", "node-a", None)),
    (topics.agent_commands, ("node-a",), "flops/v1/agents/node-a/commands", ("agent_commands", "node-a", None)),
    (topics.agent_reports, ("node-a",), "flops/v1/agents/node-a/reports", ("agent_reports", "node-a", None)),
    (topics.agent_receipts, ("node-a",), "flops/v1/agents/node-a/receipts", ("agent_receipts", "node-a", None)),
    (topics.agent_acks, ("node-a",), "flops/v1/agents/node-a/acks", ("agent_acks", "node-a", None)),
    (topics.manager_status, (), "flops/v1/manager/status", ("unknown", None, None)),
    (topics.errors, (), "flops/v1/errors", ("unknown", None, None)),
]

WITH_ID = [(b, args) for b, args, _, _ in BUILDERS if args]


@pytest.mark.parametrize(
    ("builder", "args", "expected", "_parsed"), BUILDERS, ids=lambda v: getattr(v, "__name__", None)
)
def test_builder_returns_the_documented_topic(builder, args, expected, _parsed) -> None:
    assert builder(*args) == expected


@pytest.mark.parametrize(
    ("builder", "args", "_expected", "parsed"), BUILDERS, ids=lambda v: getattr(v, "__name__", None)
)
def test_parse_reads_back_what_the_builder_built(builder, args, _expected, parsed) -> None:
    assert topics.parse(builder(*args)) == parsed


@pytest.mark.parametrize(
    ("wildcard", "expected"),
    [
        (topics.ALL_REQUESTS, "flops/v1/customers/+/requests"),
        (topics.ALL_CANCELS, "flops/v1/customers/+/projects/+/cancel"),
        (topics.ALL_AGENT_REPORTS, "flops/v1/agents/+/reports"),
        (topics.ALL_AGENT_RECEIPTS, "flops/v1/agents/+/receipts"),
        (topics.ALL_AGENT_STATUS, "flops/v1/agents/+/status"),
        (topics.ALL_PROJECT_STATES, "flops/v1/customers/+/projects/+/state"),
        (topics.ALL_PROJECT_EVENTS, "flops/v1/customers/+/projects/+/events"),
    ],
)
def test_subscription_wildcards(wildcard: str, expected: str) -> None:
    assert wildcard == expected


@pytest.mark.parametrize(
    ("builder", "concrete"),
    [
        (topics.ALL_REQUESTS, topics.requests("bob")),
        (topics.ALL_CANCELS, topics.project_cancel("bob", "p-9")),
        (topics.project_state_any("p-9"), topics.project_state("bob", "p-9")),
        (topics.project_events_any("p-9"), topics.project_events("bob", "p-9")),
        (topics.ALL_AGENT_REPORTS, topics.agent_reports("a-9")),
        (topics.ALL_AGENT_RECEIPTS, topics.agent_receipts("a-9")),
        (topics.ALL_AGENT_STATUS, topics.agent_status("a-9")),
        (topics.ALL_PROJECT_STATES, topics.project_state("bob", "p-9")),
        (topics.ALL_PROJECT_EVENTS, topics.project_events("bob", "p-9")),
    ],
)
def test_wildcards_match_their_concrete_topics(builder: str, concrete: str) -> None:
    pattern, actual = builder.split("/"), concrete.split("/")
    assert len(pattern) == len(actual)
    assert all(p in ("+", a) for p, a in zip(pattern, actual, strict=True))


@pytest.mark.parametrize("bad", ["a/b", "+", "#", "", "a+b", "a#", "x\x00y", "/"])
@pytest.mark.parametrize(("builder", "args"), WITH_ID, ids=lambda v: getattr(v, "__name__", None))
def test_ids_that_change_the_topic_shape_are_refused(builder, args, bad: str) -> None:
    for position in range(len(args)):
        with pytest.raises(ValueError, match="not a valid topic segment"):
            builder(*args[:position], bad, *args[position + 1 :])


@pytest.mark.parametrize("ok", ["p-1f3a", "agent.node_1", "r:42", "UPPER-case"])
def test_ordinary_ids_pass_unchanged(ok: str) -> None:
    assert topics.project_state(ok, ok) == f"flops/v1/customers/{ok}/projects/{ok}/state"
    assert topics.parse(topics.agent_commands(ok)) == ("agent_commands", ok, None)


@pytest.mark.parametrize(
    "topic",
    [
        "flops/v2/projects/p-1/state",  # another protocol version
        "other/v1/projects/p-1/state",
        "flops/v1/projects/p-1/unknown",
        "flops/v1/projects/p-1/state/extra",
        "flops/v1/projects/p-1/reports",  # reports moved to the sending agent's own topic
        "flops/v1/projects/p-1/state",  # project topics moved under their customer
        "flops/v1/projects/requests",
        "flops/v1/customers/alice/projects/p-1/unknown",
        "flops/v1/agents/a-1/reports/extra",
        "flops/v1/projects/requests/r-1/answer",
        "flops/v1/projects",
        "flops/v1",
        "",
    ],
)
def test_parse_refuses_foreign_topics(topic: str) -> None:
    assert topics.parse(topic) == ("unknown", None, None)
