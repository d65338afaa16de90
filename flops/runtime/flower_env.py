"""Environment and command lines for Flower's processes (SuperLink, SuperNode, ``flwr`` CLI).

Tuning chosen for loopback / LAN deployments (measured, see ``tests/runtime``):

- ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` (default 1 s) -> ``poll_interval``: how often the
  SuperExec next to SuperLink/SuperNode looks for a ServerApp/ClientApp task to launch;
- SuperLink ``--disable-runtime-dependency-installation``: by default every run does a
  ``uv sync`` of the app's dependencies before the ServerApp starts; our environments are
  pre-built by the builder, so that is pure overhead;
- telemetry and update checks off (no network calls at start-up);
- ``--insecure`` only when the node has no certificate (``flops.runtime.flower_tls``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from flops.ports import free_port
from flops.supervisor import project_pythonpath

__all__ = ["dial_address", "flower_bin", "flower_env", "free_port", "script_dirs", "split_address"]

FAST_POLL_INTERVAL = 0.05


def script_dirs() -> list[str]:
    """Where Flower's console scripts are: beside this interpreter, and (in a project environment layered on
    a shared runtime base) in the bin directory of the environment that holds ``flwr``."""
    dirs = [Path(sys.executable).parent]
    spec = importlib.util.find_spec("flwr")
    if spec is not None and spec.origin:
        # <env>/lib/pythonX.Y/site-packages/flwr/__init__.py -> <env>/bin
        dirs.append(Path(spec.origin).resolve().parents[4] / "bin")
    return [str(d) for d in dict.fromkeys(dirs) if d.is_dir()]


def flower_bin(name: str) -> str:
    """Path of a Flower console script of the environment that provides ``flwr``."""
    for directory in script_dirs():
        candidate = Path(directory) / name
        if candidate.exists():
            return str(candidate)
    return name


def flower_env(base: Mapping[str, str], *, poll_interval: float | None = FAST_POLL_INTERVAL) -> dict[str, str]:
    """Environment for Flower children: our packages importable, Flower's scripts on PATH, quiet."""
    env = dict(base)
    env["PATH"] = os.pathsep.join([*script_dirs(), env.get("PATH", "")])
    env["PYTHONPATH"] = project_pythonpath(env)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env.setdefault("PYTHONUNBUFFERED", "1")
    if poll_interval is not None:
        env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(poll_interval)
    return env


def clientapp_worker_argv(runtime_port: int, poll: float = FAST_POLL_INTERVAL) -> list[str]:
    """The warm ClientApp worker (:mod:`flops.runtime.clientapp_worker`) of a SuperNode whose Runtime API listens on
    ``runtime_port`` on loopback."""
    return [
        sys.executable,
        "-m",
        "flops.runtime.clientapp_worker",
        "--runtime-api-address",
        f"127.0.0.1:{runtime_port}",
        "--poll",
        str(poll),
    ]


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` -> (host, port); IPv6 hosts may be bracketed."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def dial_address(address: str) -> str:
    """The address a process on this host dials a server bound to ``address`` at (wildcards -> loopback)."""
    host, port = split_address(address)
    if host in ("", "0.0.0.0"):
        return f"127.0.0.1:{port}"
    if host == "::":
        return f"[::1]:{port}"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
