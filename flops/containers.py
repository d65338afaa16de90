"""Podman on an agent: learners, aggregators and model servers as containers pulled from the FLOps registry.

A container is an agent child like any other (:class:`flops.supervisor.Supervisor`): the child process is
``podman run`` in the foreground, its output is the child's log, its exit status the child's, and the report
pipe reaches the runtime inside as file descriptor 3 (``--preserve-fds 1``). What podman alone would leave
behind is covered three ways:

- stopping the child SIGTERMs ``podman run``, which forwards it (``--sig-proxy``); the agent then removes the
  container by name (``podman rm -f``) in case the grace ran out;
- the runtime inside watches the ``podman run`` process (``FLOPS_OWNER_PID``, visible with ``--pid host``) and
  exits when it is gone, e.g. when the kernel SIGKILLed it because the agent died;
- an agent that starts removes every container labelled with its id (left by a previous life).

Settings measured on these hosts (``../shared/MEASURED.md``): runc rather than crun, overlay storage, explicit
ulimits no higher than the host's hard limits, host network (learners reach the node's data server and the
aggregator by the addresses the manager hands out).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from flops.supervisor import OWNER_PID_ENV

log = structlog.get_logger(__name__)

REPORT_FD = 3  # the first descriptor podman's --preserve-fds hands on
LABEL_AGENT = "org.flops.agent"
LABEL_PROJECT = "org.flops.project"
LABEL_COMMAND = "org.flops.command"
RUNC = "/usr/sbin/runc"


def _limit(which: int, wanted: int) -> int:
    """``wanted``, but no more than this host's hard limit (podman refuses to raise it)."""
    _, hard = resource.getrlimit(which)
    return wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)


@dataclass(frozen=True)
class PodmanSettings:
    """How this agent runs podman; built from the agent's settings and passed in."""

    podman: str = "podman"
    runtime: str | None = RUNC  # None = podman's default (crun fails on these hosts' rlimits)
    storage_driver: str = "overlay"
    root: Path | None = None  # image storage; None = podman's default (shared by every agent of this host)
    registry_tls: bool = False
    registry_ca_dir: Path | None = None  # a directory of CA certificates for the registry (podman --cert-dir)
    nofile: int = 20_000
    nproc: int = 4_096


class Podman:
    """``podman`` for one agent: the ``run`` command line of a child, removal of its containers."""

    def __init__(self, settings: PodmanSettings, agent_id: str) -> None:
        self.settings = settings
        self.agent_id = agent_id

    def available(self) -> bool:
        return shutil.which(self.settings.podman) is not None

    def global_args(self) -> list[str]:
        s = self.settings
        args = [s.podman, "--storage-driver", s.storage_driver]
        if s.runtime and Path(s.runtime).exists():
            args += ["--runtime", s.runtime]
        if s.root is not None:
            args += ["--root", str(s.root / "storage"), "--runroot", str(runroot(s.root))]
        return args

    def tls_args(self) -> list[str]:
        s = self.settings
        if not s.registry_tls:
            return ["--tls-verify=false"]
        return ["--cert-dir", str(s.registry_ca_dir)] if s.registry_ca_dir else []

    def run_argv(
        self,
        *,
        name: str,
        image: str,
        args: Sequence[str],
        project_id: str,
        command_id: str,
        env_names: Iterable[str] = (),
        mounts: Iterable[Path] = (),
        entrypoint: str | None = None,
    ) -> list[str]:
        """``podman run`` of ``image`` with ``args`` (after the image's entrypoint), removed when it exits.

        ``env_names`` pass from the child's environment by name (secrets never appear on a command line);
        ``mounts`` are bind-mounted at the same path (the child's work directory, TLS files), so paths in
        its reports mean the same on the host."""
        s = self.settings
        argv = [*self.global_args(), "run", "--rm", "--name", name, "--pull", "missing", *self.tls_args()]
        argv += ["--network", "host", "--pid", "host", "--preserve-fds", "1", "--sig-proxy=true"]
        nofile, nproc = _limit(resource.RLIMIT_NOFILE, s.nofile), _limit(resource.RLIMIT_NPROC, s.nproc)
        argv += ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]
        labels = {LABEL_AGENT: self.agent_id, LABEL_PROJECT: project_id, LABEL_COMMAND: command_id}
        for key, value in labels.items():
            argv += ["--label", f"{key}={value}"]
        for env_name in (OWNER_PID_ENV, "PYTHONUNBUFFERED", *env_names):
            argv += ["--env", env_name]
        for path in dict.fromkeys(Path(m).resolve() for m in mounts):
            argv += ["--volume", f"{path}:{path}:{'rw' if path.is_dir() else 'ro'}"]
        if entrypoint:
            argv += ["--entrypoint", entrypoint]
        return [*argv, image, *args]

    def remove(self, names: Iterable[str]) -> None:
        """Remove these containers now (running or not); unknown names are fine."""
        names = list(names)
        if names:
            self._quiet(["rm", "--force", "--ignore", "--time", "2", *names])

    def leftovers(self) -> list[str]:
        """Names of containers this agent started in an earlier life (or that outlived their child)."""
        out = self._quiet(["ps", "--all", "--filter", f"label={LABEL_AGENT}={self.agent_id}", "--format", "json"])
        try:
            rows = json.loads(out or "[]")
        except ValueError:
            return []
        return [name for row in rows for name in (row.get("Names") or [])]

    def _quiet(self, args: list[str]) -> str | None:
        try:
            done = subprocess.run([*self.global_args(), *args], capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("podman failed", args=args[:2], error=str(exc))
            return None
        if done.returncode != 0:
            log.warning("podman failed", args=args[:2], stderr=done.stderr.strip()[-500:])
            return None
        return done.stdout


def runroot(root: Path) -> Path:
    """Podman's run directory for an image storage at ``root``: podman wants it under 50 characters."""
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    base = Path("/run") if os.access("/run", os.W_OK) else Path(tempfile.gettempdir())
    return base / "flops-podman" / digest


def container_name(command_id: str) -> str:
    """The container of a command: one per command id (a second ``run`` of the same name fails loudly)."""
    return "flops-" + "".join(c if c.isalnum() or c in "-_." else "-" for c in command_id)


def cert_dir(ca_file: Path | None, data_dir: Path) -> Path | None:
    """A directory holding ``ca_file`` as ``ca.crt``: how podman wants the registry's CA (``--cert-dir``)."""
    if ca_file is None:
        return None
    target = data_dir / "state" / "registry-ca"
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ca_file, target / "ca.crt")
    return target
