"""The learner's watch over its SuperNode's output: which failures to connect are worth a restart."""

from __future__ import annotations

import pytest

from flops.runtime.learner import SupernodeWatch


@pytest.mark.parametrize(
    "line",
    [
        "ERROR :     Failed to activate SuperNode: public key not registered",
        "Client error '404 Not Found' for url 'http://10.30.1.2:19100/v1/fleet/register-node'",
        "ERROR:    [Errno 98] error while attempting to bind on address ('127.0.0.1', 40883): address already in use",
    ],
)
def test_a_superlink_not_ready_yet_or_a_taken_runtime_port_is_worth_another_try(line: str) -> None:
    watch = SupernodeWatch()
    watch.on_line(line)
    assert watch.refused and not watch.registered.is_set()


def test_other_failures_are_not_retried_and_the_node_id_marks_it_registered() -> None:
    watch = SupernodeWatch()
    watch.on_line("SuperLink address (nowhere) cannot be parsed.")
    assert not watch.refused
    watch.on_line("INFO :      SuperNode ID: 42")
    assert watch.registered.is_set() and watch.node_id == 42
