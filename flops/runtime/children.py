"""Child processes of a runtime process: started in their own process group, always reaped.

Flower's SuperLink / SuperNode spawn further processes (SuperExec, ServerApp, ClientApp). Each
child we start leads a new process group, so stopping it signals the whole subtree; on Linux it
also gets ``PR_SET_PDEATHSIG`` so it dies with us even if we are SIGKILLed (Flower's own
grandchildren watch their parent pid). :class:`ChildGroup` stops every child it started, on
normal exit, on exceptions and on SIGTERM (``install_sigterm_exit`` turns SIGTERM into
``SystemExit``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO

import structlog

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL this (child) process when its parent dies; Linux only."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


OWNER_PID_ENV = "FLOPS_OWNER_PID"


def exit_with_owner(interval: float = 0.5) -> None:
    """In a process Flower starts for us (the ServerApp, via SuperLink → SuperExec, detached into their own
    session): exit at once when the runtime process named by ``FLOPS_OWNER_PID`` is gone.

    Flower's own ``--parent-pid`` monitor turns its parent's death into SIGINT, whose graceful exit then
    waits on HTTP retries against the SuperLink that is gone, forever: every stopped or crashed aggregator
    left a ``flwr-serverapp`` behind. Our group kills cannot reach it (another session), so it watches.
    """
    raw = os.environ.get(OWNER_PID_ENV, "")
    if not raw.isdigit():
        return
    owner = int(raw)

    def watch() -> None:
        while True:
            time.sleep(interval)
            try:
                os.kill(owner, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:
                pass  # alive, owned by someone else (cannot happen for our own children)

    threading.Thread(target=watch, daemon=True, name="owner-watch").start()


def install_sigterm_exit() -> None:
    """Turn SIGTERM / SIGHUP into ``SystemExit`` so ``finally`` blocks stop the children."""

    def _raise(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _raise)
    signal.signal(signal.SIGHUP, _raise)


def project_pythonpath(env: Mapping[str, str]) -> str:
    """PYTHONPATH that makes ``flops`` / ``flops_utils`` importable in Flower's own subprocesses."""
    root = str(Path(__file__).resolve().parents[2])
    parts = [root, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]]
    return os.pathsep.join(parts)


class ChildGroup:
    """Starts children in their own process groups and stops all of them on exit."""

    def __init__(self, *, stop_timeout: float = 5.0) -> None:
        self._children: list[tuple[str, subprocess.Popen[str]]] = []
        self._stop_timeout = stop_timeout
        self._log = structlog.get_logger(__name__)

    def __enter__(self) -> ChildGroup:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: Path | None = None,
        on_line: Callable[[str], None] | None = None,
        log_file: Path | None = None,
    ) -> subprocess.Popen[str]:
        """Start ``argv``; its stdout+stderr go to ``on_line`` (line by line), ``log_file`` or our stderr."""
        stdout: int | IO[str] | None
        log_handle: IO[str] | None = None
        if on_line is not None:
            stdout = subprocess.PIPE
        elif log_file is not None:
            log_handle = log_file.open("a", encoding="utf-8")
            stdout = log_handle
        else:
            stdout = sys.stderr
        proc = subprocess.Popen(
            list(argv),
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        if log_handle is not None:
            log_handle.close()
        self._children.append((name, proc))
        self._log.info("child.started", child=name, pid=proc.pid, argv=list(argv))
        if on_line is not None and proc.stdout is not None:
            threading.Thread(target=_pump, args=(proc.stdout, on_line), name=f"pump-{name}", daemon=True).start()
        return proc

    def stop_all(self) -> None:
        """SIGTERM every child's process group, wait, then SIGKILL what is left."""
        for name, proc in reversed(self._children):
            _signal_group(proc, signal.SIGTERM)
            self._log.debug("child.stopping", child=name, pid=proc.pid)
        deadline = time.monotonic() + self._stop_timeout
        for name, proc in reversed(self._children):
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._log.warning("child.killed", child=name, pid=proc.pid)
            # Kill the group even if the leader exited: its grandchildren may still run.
            _signal_group(proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1.0)
        self._children.clear()


def _signal_group(proc: subprocess.Popen[str], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _pump(stream: IO[str], on_line: Callable[[str], None]) -> None:
    for line in stream:
        on_line(line.rstrip("\n"))
