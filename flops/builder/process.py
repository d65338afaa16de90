"""Run one external command for the builder: bounded in time, output captured, failures typed.

Every call the builder makes to `git`, `uv`, `pip` or a project's Python goes through `run`, so each
has a timeout, kills its whole process group when the timeout fires (uv and pip spawn helpers that
would otherwise outlive it), dies with the process that runs the build, and reports a failure as
`StepFailed` carrying the output tail that the `build.failed` report shows the user.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import sh

from flops.supervisor import die_with_parent

TAIL_LINES = 40
TAIL_CHARS = 4000


class StepFailed(Exception):
    """A build step failed for a reason the user can act on (not a bug in the builder)."""

    def __init__(self, step: str, reason: str, log_tail: str = "") -> None:
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.reason = reason
        self.log_tail = log_tail


@dataclass(frozen=True)
class CommandFailed(Exception):
    """A command exited non-zero or timed out; `output` is its merged stdout+stderr."""

    argv: tuple[str, ...]
    exit_code: int | None
    output: str
    timed_out: bool

    def __str__(self) -> str:
        what = "timed out" if self.timed_out else f"exited {self.exit_code}"
        return f"{' '.join(self.argv)} {what}"


def tail(text: str, lines: int = TAIL_LINES, chars: int = TAIL_CHARS) -> str:
    """The last `lines` lines of `text`, at most `chars` characters (what a report can carry)."""
    kept = "\n".join(text.rstrip().splitlines()[-lines:])
    return kept[-chars:]


def run(
    program: str | Path,
    args: Sequence[str | Path],
    *,
    timeout_s: float,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> str:
    """Run `program args…`, return its merged output, or raise `CommandFailed`.

    `env` is added to the current environment rather than replacing it, so PATH, proxies and the
    user's index configuration still reach git/uv/pip.
    """
    argv = (str(program), *(str(a) for a in args))
    full_env = {**os.environ, **(env or {})}
    command = sh.Command(str(program))
    running = command(
        *argv[1:],
        _bg=True,  # so the pid is known for killing its process group on timeout
        _bg_exc=False,
        _timeout=timeout_s,
        _new_session=True,  # its own process group: uv/pip helpers die with it
        _preexec_fn=die_with_parent(),  # and it dies with us: a build worker killed mid-install stops uv too
        _err_to_out=True,
        _tty_out=False,  # no progress bars or colour codes in the captured output
        _cwd=str(cwd) if cwd else None,
        _env=full_env,
    )
    try:
        # A plain wait(): sh's wait(timeout=...) can return before the output is fully read.
        running.wait()
    except sh.TimeoutException as exc:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(running.pid, signal.SIGKILL)
        raise CommandFailed(argv, None, _decode(running.process.stdout), timed_out=True) from exc
    except sh.ErrorReturnCode as exc:
        raise CommandFailed(argv, exc.exit_code, _decode(exc.stdout), timed_out=False) from exc
    return _decode(running.stdout)


def _decode(data: bytes | str | None) -> str:
    if data is None:
        return ""
    if isinstance(data, bytes):
        return data.decode("utf-8", errors="replace")
    return data
