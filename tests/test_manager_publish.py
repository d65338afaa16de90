"""What the manager publishes after a committed batch: every event, command and reply in order, only the
newest retained state per project, but never a reply whose state has not gone out before it."""

from __future__ import annotations

import pytest

from flops.manager import _latest_retained
from flops.store import OutboxItem


def state(project: str, version: str) -> OutboxItem:
    return OutboxItem(f"state:{project}", f"flops/v1/projects/{project}/state", version.encode(), retain=True)


def other(key: str) -> OutboxItem:
    return OutboxItem(key, "t", key.encode())


@pytest.mark.parametrize(
    ("items", "published"),
    [
        ([state("a", "1"), other("ev:a:1"), state("a", "2")], ["ev:a:1", "state:a=2"]),
        ([state("a", "1"), other("reply:r1"), state("a", "2")], ["state:a=1", "reply:r1", "state:a=2"]),
        ([state("a", "1"), state("b", "1"), state("a", "2")], ["state:b=1", "state:a=2"]),
        ([other("cmd:x"), other("ev:a:1"), other("reply:r")], ["cmd:x", "ev:a:1", "reply:r"]),
        ([state("a", "1"), state("a", "2"), other("reply:r"), state("a", "3")], ["state:a=2", "reply:r", "state:a=3"]),
    ],
)
def test_only_the_newest_state_goes_out_unless_a_reply_needs_it(items, published) -> None:
    out = _latest_retained(items)
    assert [f"{i.key}={i.payload.decode()}" if i.retain else i.key for i in out] == published
