"""Run the image tools (``buildah``, ``debootstrap``, ``pip download``) through ``sh``, streaming their output.

Every line a tool prints goes to a callback as it arrives (the build log and the build's progress events)
and the last lines are kept for the failure reason. Unlike :func:`flops.builder.process.run`, the tool stays
in our process group (``_new_session=False``): the build worker is its own group's leader, so the agent
stopping a build (SIGTERM/SIGKILL to that group) reaches buildah and everything buildah started (its
chroot runners, the emulated RUN steps); ``PR_SET_PDEATHSIG`` covers the worker dying alone.
"""

from __future__ import annotations

import contextlib
import re
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import sh

from flops.builder.process import TAIL_CHARS, TAIL_LINES, StepFailed
from flops.supervisor import die_with_parent

_WRAPPER = re.compile(r"^(error: building at step|subprocess exited with status|exit status \d)", re.IGNORECASE)
LineSink = Callable[[str, str], None]  # (step, line)


def stream(
    program: str,
    args: Sequence[str | Path],
    *,
    step: str,
    what: str,
    on_line: LineSink,
    timeout_s: float,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> list[str]:
    """Run ``program args…``, handing each output line to ``on_line(step, line)``; returns the last lines.

    A non-zero exit or the timeout raises :class:`StepFailed` for ``step`` whose reason says ``what`` failed
    and quotes the tool's last error line, with the output tail as its log tail.
    """
    tail: deque[str] = deque(maxlen=TAIL_LINES * 5)

    def out(line: str) -> None:
        line = line.rstrip("\r\n")
        tail.append(line)
        on_line(step, line)

    try:
        command = sh.Command(program)
    except sh.CommandNotFound as exc:
        raise StepFailed(step, f"{what} needs {program}, which is not installed on this builder") from exc
    running = command(
        *(str(a) for a in args),
        _bg=True,
        _bg_exc=False,
        _out=out,
        _err_to_out=True,
        _new_session=False,  # stays in the build worker's process group: stopping the build stops the tool
        _preexec_fn=die_with_parent(),
        _tty_out=False,
        _timeout=timeout_s,
        _env=dict(env) if env is not None else None,
        _cwd=str(cwd) if cwd else None,
    )
    try:
        running.wait()
    except sh.TimeoutException as exc:
        _kill_tree(running.pid)
        raise StepFailed(step, f"{what} timed out after {timeout_s:.0f} s", _tail(tail)) from exc
    except sh.ErrorReturnCode as exc:
        said = error_line(tail)
        reason = f"{what} failed (exit {exc.exit_code})" + (f": {said}" if said else "")
        raise StepFailed(step, reason, _tail(tail)) from exc
    return list(tail)


def error_line(lines: Sequence[str] | deque[str], limit: int = 400) -> str:
    """The tool's own words for a failure: its last ``Error:``/``error:`` line, else its last non-empty one."""
    # buildah's closing "Error: building at STEP …: exit status 1" says only that a RUN step failed: the
    # line that says why (pip's error, a traceback's last line) comes before it.
    text = [ln.strip() for ln in lines if ln.strip() and not _WRAPPER.match(ln.strip())]
    keys = ("error", "fatal", "failed", "no such", "not found", "denied", "unknown")
    said = next((ln for ln in reversed(text) if any(k in ln.lower() for k in keys)), text[-1] if text else "")
    return said if len(said) <= limit else said[: limit - 3] + "..."


def _tail(lines: deque[str]) -> str:
    return "\n".join(list(lines)[-TAIL_LINES:])[-TAIL_CHARS:]


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and its descendants (it shares our process group, so no killpg)."""
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        proc = psutil.Process(pid)
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        proc.kill()


def succeeds(program: str, args: Sequence[str | Path], timeout_s: float = 60.0) -> bool:
    """Whether ``program args…`` exits 0 (a quiet probe: ``buildah inspect``, ``mountpoint``)."""
    try:
        sh.Command(program)(*(str(a) for a in args), _timeout=timeout_s, _new_session=False, _err_to_out=True)
    except (sh.ErrorReturnCode, sh.TimeoutException, sh.CommandNotFound):
        return False
    return True


def output(program: str, args: Sequence[str | Path], timeout_s: float = 60.0) -> str:
    """The stdout of a short command, or "" when it fails."""
    try:
        return str(sh.Command(program)(*(str(a) for a in args), _timeout=timeout_s, _new_session=False))
    except (sh.ErrorReturnCode, sh.TimeoutException, sh.CommandNotFound):
        return ""
