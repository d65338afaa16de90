"""Child processes, for the agent and for the runtime processes it starts: one way to start, watch and stop them.

Every child leads its own process group (stopping it signals the whole subtree: a learner's SuperNode, an
aggregator's SuperLink, a build's ``uv``) and gets ``PR_SET_PDEATHSIG`` on Linux, so it dies with us even
when we are SIGKILLed. The kernel fires that signal when the *thread* that forked the child exits, so every
child is forked from one long-lived thread (:func:`popen`), never from a pool thread that may go away.
Processes Flower starts in other sessions (the ServerApp) watch ``FLOPS_OWNER_PID`` instead
(:func:`exit_with_owner`).

Two users, one mechanism:

- :class:`Supervisor` (the agent): children per project and command, each with a log file and a report
  pipe (``--report-fd N``); a reader thread turns report lines into callbacks and reports the exit.
- :class:`ChildGroup` (a learner or aggregator process): Flower's processes, all stopped on exit, on
  exceptions and on SIGTERM (:func:`install_sigterm_exit` turns SIGTERM into ``SystemExit``).

Stopping is SIGTERM to the group, a short grace (:data:`STOP_GRACE_S`), then SIGKILL to the group.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

import structlog

log = structlog.get_logger(__name__)

STOP_GRACE_S = 3.0  # SIGTERM, this long, then SIGKILL: an agent told to stop is gone within ~5 s
OWNER_PID_ENV = "FLOPS_OWNER_PID"
_PR_SET_PDEATHSIG = 1


# --- starting: one forking thread, children die with us ------------------------------------------------------


class _Forker:
    """Runs every ``Popen`` of this process on one daemon thread that lives as long as the process."""

    def __init__(self) -> None:
        self._requests: queue.Queue[tuple[dict[str, Any], Future[subprocess.Popen[Any]]]] = queue.Queue()
        threading.Thread(target=self._serve, daemon=True, name="forker").start()

    def _serve(self) -> None:
        while True:
            kwargs, future = self._requests.get()
            try:
                future.set_result(subprocess.Popen(**kwargs, preexec_fn=die_with_parent()))
            except BaseException as exc:  # handed to the caller, raised in its thread
                future.set_exception(exc)

    def popen(self, **kwargs: Any) -> subprocess.Popen[Any]:
        future: Future[subprocess.Popen[Any]] = Future()
        self._requests.put((kwargs, future))
        return future.result()


def die_with_parent() -> Callable[[], None]:
    """A ``preexec_fn`` asking the kernel to SIGKILL the child when the forking thread of this process dies.

    Fork from a thread that lives as long as the process (the main thread of a short program, or
    :func:`popen`'s forking thread), else the child dies with the thread.
    """
    parent = os.getpid()
    libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None  # loaded before fork

    def preexec() -> None:
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the prctl took effect
            os._exit(1)

    return preexec


_forker: _Forker | None = None
_forker_lock = threading.Lock()


def popen(argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """``subprocess.Popen`` in a new session, SIGKILLed by the kernel when this process dies."""
    global _forker
    with _forker_lock:
        if _forker is None:
            _forker = _Forker()
    return _forker.popen(args=list(argv), start_new_session=True, **kwargs)


def at_descriptor(argv: Sequence[str], fd: int, target: int) -> list[str]:
    """``argv`` behind bash, which puts descriptor ``fd`` at ``target`` and exports its own pid as
    ``FLOPS_OWNER_PID`` before it execs ``argv``: the pid and the descriptor stay the exec'd program's."""
    script = f'{OWNER_PID_ENV}=$$; export {OWNER_PID_ENV}; exec "$@" {int(target)}>&{int(fd)}'
    return ["/bin/bash", "-c", script, "flops-child", *argv]  # dash cannot redirect descriptors above 9


def kill_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def stop_groups(procs: Iterable[subprocess.Popen[Any]], grace: float = STOP_GRACE_S) -> None:
    """SIGTERM each process group, wait up to ``grace`` seconds in all, then SIGKILL every group (the leader
    may have exited while its grandchildren still run)."""
    procs = list(procs)
    for proc in procs:
        kill_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    for proc in procs:
        kill_group(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=1.0)


def start_time(pid: int) -> float | None:
    """When process ``pid`` started (psutil's ``create_time``), or None when it does not exist."""
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def still_ours(pid: int, started: float | None) -> bool:
    """Whether ``pid`` is still the process that started at ``started`` (not a pid the kernel reused)."""
    if started is None:
        return False
    now = start_time(pid)
    return now is not None and abs(now - started) < 0.01


# --- runtime processes: helpers for what Flower starts ----------------------------------------------------------


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
    root = str(Path(__file__).resolve().parents[1])
    parts = [root, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]]
    return os.pathsep.join(parts)


class ChildGroup:
    """A runtime process's children (Flower's SuperLink / SuperNode ...); stops all of them on exit."""

    def __init__(self, *, stop_timeout: float = STOP_GRACE_S) -> None:
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
        try:
            proc = popen(
                argv,
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=subprocess.STDOUT,
                text=True,
            )
        finally:
            if log_handle is not None:
                log_handle.close()
        self._children.append((name, proc))
        self._log.info("child.started", child=name, pid=proc.pid, argv=list(argv))
        if on_line is not None and proc.stdout is not None:
            threading.Thread(target=_pump, args=(proc.stdout, on_line), name=f"pump-{name}", daemon=True).start()
        return proc

    def stop_all(self) -> None:
        """SIGTERM every child's process group, wait, then SIGKILL what is left."""
        stop_groups([proc for _, proc in reversed(self._children)], self._stop_timeout)
        self._children.clear()


def _pump(stream: IO[str], on_line: Callable[[str], None]) -> None:
    for line in stream:
        on_line(line.rstrip("\n"))


# --- the agent's children ------------------------------------------------------------------------------------

OnReport = Callable[["Child", str, dict[str, Any]], None]
OnExit = Callable[["Child", int], None]


@dataclass(eq=False)
class Child:
    project_id: str
    command_id: str
    kind: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    on_report: OnReport
    on_exit: OnExit
    started: float | None = None  # the process's create_time: its pid is only ours while this matches
    container: str | None = None  # the container the process runs (podman run), removed on stop
    restart: int = 0  # how often the agent started this command's process again after its own restart
    stopped: bool = False  # stopped by us (stop_project / stop_all), not a crash
    shutdown: bool = False  # stopped because the agent itself stops
    terminal_reported: bool = False
    lines: int = 0
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, n: int = 25) -> str:
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 16_384))
                text = fh.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(deque(text.splitlines(), maxlen=n))


class Supervisor:
    """The agent's children by project: started with a report pipe, stopped by project or all at once."""

    def __init__(self, on_report: OnReport, on_exit: OnExit) -> None:
        self._on_report = on_report
        self._on_exit = on_exit
        self._children: set[Child] = set()
        self._lock = threading.Lock()

    def spawn(
        self,
        project_id: str,
        command_id: str,
        kind: str,
        argv: list[str],
        *,
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        on_report: OnReport | None = None,
        on_exit: OnExit | None = None,
        restart: int = 0,
        report_fd: int | None = None,
        container: str | None = None,
    ) -> Child:
        """Start ``argv --report-fd N``; ``on_report`` / ``on_exit`` replace the supervisor's callbacks.

        With ``report_fd`` the child sees the pipe at that descriptor (and ``--report-fd`` names it) and knows
        its launcher's pid as ``FLOPS_OWNER_PID``: for a launcher (``podman run``) that hands both on to the
        real child. ``container`` names the container such a child runs in."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        read_fd, write_fd = os.pipe()
        if report_fd is None:
            full = [*argv, "--report-fd", str(write_fd)]
        else:
            full = at_descriptor([*argv, "--report-fd", str(report_fd)], write_fd, report_fd)
        try:
            with log_path.open("ab") as log_file:
                proc = popen(
                    full,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=cwd,
                    pass_fds=(write_fd,),
                )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        child = Child(
            project_id, command_id, kind, proc, log_path, on_report or self._on_report, on_exit or self._on_exit
        )
        child.restart = restart
        child.container = container
        with contextlib.suppress(Exception):  # psutil missing: the pid is never killed on reconcile
            child.started = start_time(proc.pid)
        with self._lock:
            self._children.add(child)
        threading.Thread(target=self._read, args=(child, read_fd), daemon=True, name=f"reports-{kind}").start()
        log.info("child started", project_id=project_id, command_id=command_id, kind=kind, pid=proc.pid)
        return child

    def _read(self, child: Child, read_fd: int) -> None:
        with os.fdopen(read_fd, "r", encoding="utf-8", errors="replace") as stream:
            for line in stream:
                line = line.strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                    kind, payload = obj["kind"], obj.get("payload", {})
                except (ValueError, KeyError, TypeError):
                    log.warning("unreadable report line", command_id=child.command_id, line=line[:200])
                    continue
                child.lines += 1
                child.on_report(child, kind, payload)
        # The pipe closes when the process (and every descendant holding it) is gone.
        code = child.proc.wait()
        with self._lock:
            self._children.discard(child)
        log.info("child exited", project_id=child.project_id, kind=child.kind, code=code, stopped=child.stopped)
        try:
            child.on_exit(child, code)
        finally:
            child.done.set()

    def running(self, project_id: str | None = None) -> list[Child]:
        with self._lock:
            return [c for c in self._children if project_id is None or c.project_id == project_id]

    def stop_project(self, project_id: str, keep: set[str] | None = None) -> list[Child]:
        victims = [c for c in self.running(project_id) if c.kind not in (keep or set())]
        self._stop(victims)
        return victims

    def stop_all(self) -> list[Child]:
        """The agent stops: every child, at once (their commands stay recorded as running)."""
        victims = self.running()
        for child in victims:
            child.shutdown = True
        self._stop(victims)
        return victims

    def _stop(self, victims: list[Child]) -> None:
        for child in victims:
            child.stopped = True
        stop_groups([c.proc for c in victims])
        for child in victims:
            child.done.wait(2.0)
