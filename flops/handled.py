"""Which commands were already acted on, kept on disk: a redelivered command has no second effect after a restart.

The manager re-sends a command until it is receipted, and the broker may deliver a QoS 1 message twice; whoever
acts on commands (an agent, the Oakestra adapter) remembers the last ``keep`` command ids in an append-only file,
one id per line, compacted when it holds twice that many. Each id is synced before the command is acted on.
"""

from __future__ import annotations

import os
from pathlib import Path


class HandledCommands:
    """The last ``keep`` command ids handled, oldest first, in ``path``."""

    def __init__(self, path: Path, keep: int = 10_000) -> None:
        self.path = path
        self.keep = keep
        lines: list[str] = []
        if path.exists():
            lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        self._ids = dict.fromkeys(lines[-keep:])
        self._lines = len(lines)
        if len(lines) > len(self._ids):
            self._rewrite()

    def __contains__(self, command_id: object) -> bool:
        return command_id in self._ids

    def add(self, command_id: str) -> None:
        self._ids[command_id] = None
        if len(self._ids) > self.keep:
            del self._ids[next(iter(self._ids))]
        if self._lines >= 2 * self.keep:
            self._rewrite()
            return
        self._lines += 1
        with self.path.open("a") as fh:
            fh.write(command_id + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def _rewrite(self) -> None:
        """Replace the file atomically: a crash leaves the old or the new one, never half of either."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w") as fh:
            fh.write("".join(f"{command_id}\n" for command_id in self._ids))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        self._lines = len(self._ids)
