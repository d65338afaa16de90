"""A cluster aggregator's link up to the root: a SuperNode of the root's SuperLink whose ClientApp (one warm
``flops.runtime.clientapp_worker``) hands the root's messages to the cluster over ``flops.runtime.bridge``.

Plaintext only for now (``--insecure``): the root's SuperLink runs without SuperNode authentication in
hierarchical mode (README, Known limits).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from flops.runtime.fast_supernode import DEFAULT_POLL, POLL_ENV
from flops.runtime.flower_env import clientapp_worker_argv, free_port
from flops.supervisor import ChildGroup


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def spawn_root_link(
    children: ChildGroup,
    *,
    root_address: str,
    bridge_dir: Path,
    bridge_timeout: float,
    connect_timeout: float,
    env: dict[str, str],
    work_dir: Path,
) -> tuple[subprocess.Popen[str], subprocess.Popen[str]]:
    """Start the SuperNode and its worker; both returned, to be watched: the SuperNode exits when the root is
    gone for ``connect_timeout``, and without the worker the root's messages would go unanswered."""
    runtime_port = free_port()
    node_env = dict(env, **{POLL_ENV: str(DEFAULT_POLL)})
    node_config = f"bridge={_quoted(str(bridge_dir))} bridge-timeout={float(bridge_timeout)}"
    supernode = children.spawn(
        "root-supernode",
        [
            sys.executable,
            "-m",
            "flops.runtime.fast_supernode",
            "--insecure",
            "--superlink",
            root_address,
            "--node-config",
            node_config,
            "--isolation",
            "process",
            "--port",
            str(runtime_port),
            "--max-wait-time",
            str(connect_timeout),
        ],
        env=node_env,
        cwd=work_dir,
        log_file=work_dir / "root-supernode.log",
    )
    worker = children.spawn(
        "root-clientapp-worker",
        clientapp_worker_argv(runtime_port),
        env=node_env,
        cwd=work_dir,
        log_file=work_dir / "root-clientapp-worker.log",
    )
    return supernode, worker
