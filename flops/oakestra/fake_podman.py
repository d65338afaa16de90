"""Real containers behind the fake System Manager (``--run-podman``): an instance that its script brings to
RUNNING is started as ``podman run --rm --network host`` of the service's image, command and environment, and
from then on reports what the container really does: RUNNING while it runs, COMPLETED when a one-shot exits 0,
DEAD when it exits otherwise, FAILED when podman could not start it (image pull, missing command).

Unlike Oakestra, a container that ended is not restarted: the deployer's give-up logic is what gets exercised.
A service's round-robin IP (``RR_ip``, e.g. the aggregator's 10.30.x.y that learners were told) is mapped onto
this machine: it is added to the loopback interface (``ip addr add IP/32 dev lo``, as root) while the service's
container runs, so containers on the host network reach the service there as they would through Oakestra's
NetManager; without the right to add it the container still runs, and the address is logged as unreachable.
Podman flags as ``flops.containers`` uses them on these hosts (runc, ulimits within the hard limits).

A service that needs the ``image-builder`` add-on (the builder image, :mod:`flops.builder.builder_image`) runs
buildah inside its container. It is started like any other: with ``vfs`` storage and ``chroot`` isolation buildah
pulls, unpacks, runs ``RUN`` steps (bind mounts too) and pushes in a container with podman's default capabilities,
as on an Oakestra node, whose NodeEngine adds only ``/dev/fuse`` to a ``privileged`` service. Measured here: adding
``CAP_SYS_ADMIN`` alone *breaks* it (buildah then unpacks layers as a privileged root would, and creating their
device nodes fails: "ApplyLayer: operation not permitted"); ``--privileged`` works but is not needed.
"""

from __future__ import annotations

import contextlib
import resource
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from flops.oakestra import statuses as st

log = structlog.get_logger(__name__)

PODMAN_ERRORS = {125, 126, 127}  # podman itself failed, or the command could not be run: no container ran


@dataclass(frozen=True)
class PodmanOptions:
    podman: str = "podman"
    runtime: str | None = "/usr/sbin/runc"  # crun fails on these hosts' rlimits
    storage_driver: str | None = "overlay"  # as flops.containers; None: podman's configured default
    nofile: int = 20_000
    nproc: int = 4_096
    tls_verify: bool = True  # False: pull over plain HTTP (the demo's loopback registry)

    def global_args(self) -> list[str]:
        args = [self.podman]
        if self.storage_driver:
            args += ["--storage-driver", self.storage_driver]
        if self.runtime and Path(self.runtime).exists():
            args += ["--runtime", self.runtime]
        return args


def _limit(which: int, wanted: int) -> int:
    _, hard = resource.getrlimit(which)  # podman refuses to raise a limit past the host's hard one
    return wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)


class Container:
    """One ``podman run`` in the foreground: its exit status is the container's, its output a log file."""

    def __init__(
        self,
        argv: list[str],
        name: str,
        one_shot: bool,
        log_path: Path,
        options: PodmanOptions,
        service_ip: str | None = None,
    ) -> None:
        self.name, self.one_shot, self.log_path, self.options = name, one_shot, log_path, options
        self.service_ip = service_ip if service_ip and _loopback(service_ip, add=True) else None
        with log_path.open("wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def status(self) -> str:
        code = self.proc.poll()
        if code is None:
            return st.RUNNING
        if code == 0 and self.one_shot:
            return st.COMPLETED
        return st.FAILED if code in PODMAN_ERRORS else st.DEAD

    def detail(self) -> str:
        code = self.proc.poll()
        last = self.logs().strip().splitlines()[-1:] or [""]
        return "No extra information" if code is None else f"exit code {code}: {last[0][-300:]}"

    def logs(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-4000:]
        return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            # podman rm stops the container; `podman run` then returns with it.
            subprocess.run(
                [*self.options.global_args(), "rm", "--force", "--ignore", "--time", "2", self.name],
                capture_output=True,
                timeout=60,
                check=False,
            )
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.service_ip:
            _loopback(self.service_ip, add=False)
            self.service_ip = None


def stop_containers(containers: Iterable[Container]) -> None:
    """Stop ``containers`` side by side: each may take its grace period and more on a loaded host, and deleting an
    application of several must answer within the client's timeout (Oakestra undeploys asynchronously)."""
    chosen = list(containers)
    if len(chosen) < 2:
        for container in chosen:
            container.stop()
        return
    with ThreadPoolExecutor(max_workers=len(chosen), thread_name_prefix="fakeoak-stop") as pool:
        list(pool.map(lambda container: container.stop(), chosen))


def _loopback(ip: str, *, add: bool) -> bool:
    """Add (or remove) ``ip``/32 on the loopback interface; whether it is (was) there."""
    argv = ["ip", "addr", "add" if add else "del", f"{ip}/32", "dev", "lo"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("service IP not mapped onto loopback", ip=ip, error=str(exc)[:200])
        return False
    if done.returncode != 0 and not (add and "File exists" in done.stderr):
        log.warning("service IP not mapped onto loopback", ip=ip, add=add, error=done.stderr.strip()[:200])
        return False
    return True


class PodmanRunner:
    """Starts and stops the containers of the fake's instances; their logs in ``log_dir`` (by default a
    temporary directory, removed by :meth:`stop_all`)."""

    def __init__(self, options: PodmanOptions | None = None, log_dir: Path | None = None) -> None:
        self.options = options or PodmanOptions()
        if shutil.which(self.options.podman) is None:
            raise FileNotFoundError(f"{self.options.podman} not found")
        self._own_dir = log_dir is None
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="fake-oakestra-"))
        self.containers: list[Container] = []

    def start(self, doc: dict[str, Any], number: int) -> Container:
        o = self.options
        name = f"fakeoak-{doc['microserviceID']}-{number}"
        nofile, nproc = _limit(resource.RLIMIT_NOFILE, o.nofile), _limit(resource.RLIMIT_NPROC, o.nproc)
        argv = [*o.global_args(), "run", "--rm", "--name", name, "--network", "host", "--pull", "missing"]
        argv += ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]
        argv += [] if o.tls_verify else ["--tls-verify=false"]
        for pair in [f"HOSTNAME=instance-{number}", *(doc.get("environment") or [])]:
            argv += ["--env", pair]
        cmd = list(doc.get("cmd") or [])
        if cmd:  # Oakestra's cmd is the whole argv, the image's entrypoint overridden
            argv += ["--entrypoint", cmd[0]]
        argv += [str(doc.get("code")), *cmd[1:]]
        log.info("fake oakestra starts a container", name=name, image=doc.get("code"), cmd=cmd)
        rr_ip = doc.get("RR_ip") or (doc.get("addresses") or {}).get("rr_ip")
        container = Container(argv, name, bool(doc.get("one_shot")), self.log_dir / f"{name}.log", o, rr_ip)
        self.containers.append(container)
        return container

    def stop_all(self) -> None:
        stop_containers(self.containers)
        self.containers.clear()
        if self._own_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)
