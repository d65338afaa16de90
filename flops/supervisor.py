"""Child processes an agent runs for projects: own process group, own log file, a report pipe.

Each child gets ``--report-fd N`` (the write end of a pipe); a reader thread turns every report line into a
callback, and a waiter thread reports the exit. Killing a project kills the whole process group of each of
its children (a learner's SuperNode, an aggregator's SuperLink go with it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

OnReport = Callable[["Child", str, dict[str, Any]], None]
OnExit = Callable[["Child", int], None]


@dataclass
class Child:
    project_id: str
    command_id: str
    kind: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    stopped: bool = False
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
    def __init__(self, on_report: OnReport, on_exit: OnExit) -> None:
        self._on_report = on_report
        self._on_exit = on_exit
        self._children: dict[str, Child] = {}
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
    ) -> Child:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        read_fd, write_fd = os.pipe()
        with log_path.open("ab") as log_file:
            try:
                proc = subprocess.Popen(
                    [*argv, "--report-fd", str(write_fd)],
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=cwd,
                    pass_fds=(write_fd,),
                    start_new_session=True,  # its own process group: stop kills everything below it
                )
            finally:
                os.close(write_fd)
        child = Child(project_id, command_id, kind, proc, log_path)
        with self._lock:
            self._children[command_id] = child
        threading.Thread(target=self._read, args=(child, read_fd), daemon=True, name=f"reports-{kind}").start()
        log.info("child started", project_id=project_id, command_id=command_id, kind=kind, pid=proc.pid)
        return child

    def _read(self, child: Child, read_fd: int) -> None:
        import json

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
                self._on_report(child, kind, payload)
        # The pipe closes when the process (and every descendant holding it) is gone.
        code = child.proc.wait()
        child.done.set()
        with self._lock:
            self._children.pop(child.command_id, None)
        log.info("child exited", project_id=child.project_id, kind=child.kind, code=code, stopped=child.stopped)
        self._on_exit(child, code)

    def running(self, project_id: str | None = None) -> list[Child]:
        with self._lock:
            return [c for c in self._children.values() if project_id is None or c.project_id == project_id]

    def stop_project(self, project_id: str, keep: set[str] | None = None, timeout: float = 10.0) -> list[Child]:
        victims = [c for c in self.running(project_id) if c.kind not in (keep or set())]
        for child in victims:
            child.stopped = True
            kill_group(child.pid, signal.SIGTERM)
        for child in victims:
            if not child.done.wait(timeout):
                kill_group(child.pid, signal.SIGKILL)
                child.done.wait(5)
        return victims

    def stop_all(self) -> None:
        for project_id in {c.project_id for c in self.running()}:
            self.stop_project(project_id)


def kill_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
