"""The handled command ids an agent or the Oakestra adapter keeps on disk: bounded, compacted, and still known
after a restart (a redelivered command stays ignored)."""

from __future__ import annotations

from pathlib import Path

from flops.handled import HandledCommands


def test_the_handled_command_ids_are_bounded_compacted_and_outlive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "commands.jsonl"
    path.write_text("".join(f"c-{i}\n" for i in range(25)))

    handled = HandledCommands(path, keep=10)
    assert path.read_text().split() == [f"c-{i}" for i in range(15, 25)]  # compacted at start-up
    assert "c-24" in handled and "c-14" not in handled
    assert not list(tmp_path.glob("*.tmp"))

    for i in range(25, 60):
        handled.add(f"c-{i}")
        assert len(path.read_text().split()) <= 20  # compacted once it holds twice the bound
    assert [f"c-{i}" in handled for i in (49, 50, 59)] == [False, True, True]
    # After a restart the newest ids are still known.
    again = HandledCommands(path, keep=10)
    assert all(f"c-{i}" in again for i in range(50, 60)) and "c-49" not in again
