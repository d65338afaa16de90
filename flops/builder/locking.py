"""An exclusive, bounded-wait file lock so concurrent builds of one key (threads or processes) never
interleave their writes to the same environment directory.

Uses `fcntl.flock`, which the kernel releases when the holder dies, so a crashed builder never leaves
a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import time
from collections.abc import Iterator
from pathlib import Path

from flops.builder.process import StepFailed


@contextlib.contextmanager
def file_lock(path: Path, *, timeout_s: float, poll_s: float = 0.2) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing); `StepFailed` if not acquired in time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    with path.open("a+") as handle:
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StepFailed("lock", f"another build held {path.name} for more than {timeout_s:.0f}s") from None
                time.sleep(poll_s)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
