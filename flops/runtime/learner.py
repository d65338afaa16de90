"""Learner process of one project: checks the repo and data, then serves the ClientApp via a SuperNode.

``python -m flops.runtime.learner --repo DIR --aggregator HOST:PORT --data-server grpc://HOST:PORT
--data-tags a,b [--connect-timeout S] [--tls-ca-file F] [--work-dir DIR] [--report-fd FD]``; the project's
data token comes in the environment (``FLOPS_DATA_TOKEN``, set by the agent), never on the command line.

First it imports the repository's ``ModelManager`` and loads the node's data in-process
(``set_model_data``), so a broken repo or missing data is reported as ``learner.failed`` with the
traceback tail before anything is deployed. Then it starts ``flower-supernode`` against the
aggregator's SuperLink (retrying until ``--connect-timeout``). ``learner.ready`` is reported as soon
as the repo and data are loaded: the manager starts the aggregator only after every learner is
ready, so readiness cannot wait for the SuperLink. It then runs until the SuperNode exits (the SuperLink went
away for longer than the timeout) or it receives SIGTERM; the SuperNode and its ClientApp
processes are always stopped with it. A warm ClientApp worker that exits is reported as ``learner.failed``
at once: without it the SuperNode would accept messages that never get an answer.

With the fleet CA (``--tls-ca-file``) the SuperNode dials over TLS and authenticates with a key pair made
for this project; its public key goes out in ``learner.ready`` for the aggregator to register (see
``flops.runtime.flower_tls``). A SuperNode refused activation because its key is not registered yet is
started again until the connect timeout. Without a CA: ``--insecure``, no key.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

import structlog

from flops.runtime.fast_supernode import DEFAULT_POLL, POLL_ENV
from flops.runtime.flower_env import FAST_POLL_INTERVAL, clientapp_worker_argv, flower_bin, flower_env, free_port
from flops.runtime.flower_tls import new_supernode_key, supernode_args
from flops.runtime.repo import RepoLoadError, new_model_manager, traceback_tail
from flops.runtime.reports import LEARNER_FAILED, LEARNER_READY, ReportWriter
from flops.supervisor import ChildGroup, exit_with_owner, install_sigterm_exit, stop_groups
from flops_utils.ml_repo_building_blocks import DATA_SERVER_ENV, DATA_TAGS_ENV, parse_tags

_NODE_ID = re.compile(r"SuperNode ID: (\d+)")
# What Flower 1.42's SuperNode prints when the SuperLink does not know its public key (yet).
_NOT_REGISTERED = "Failed to activate SuperNode"
# What it prints when the SuperLink's HTTP server answers before its Fleet API routes serve (seen when a learner
# connects the moment its aggregator's SuperLink starts): not ready yet, so try again within the deadline.
_NOT_SERVING = "'404 Not Found' for url"
# Its runtime API port was taken between our pick and its bind (host network, busy host): another port, another try.
_PORT_TAKEN = "address already in use"
RESTART_PAUSE_S = 0.5
CHILD_POLL_S = 0.2  # a child's exit has no event to wait on besides wait(), which watches only one


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m flops.runtime.learner", description=__doc__.split("\n")[0])
    p.add_argument("--repo", type=Path, required=True, help="ML repository (model_manager.py at its root)")
    p.add_argument("--aggregator", required=True, help="HOST:PORT of the aggregator's SuperLink")
    p.add_argument("--data-server", required=True, help="Arrow Flight location, e.g. grpc://127.0.0.1:5005")
    p.add_argument("--data-tags", required=True, help="comma-separated data tags")
    p.add_argument("--connect-timeout", type=float, default=120.0, help="seconds to reach the SuperLink")
    p.add_argument(
        "--supernode-poll",
        type=float,
        default=DEFAULT_POLL,
        help="SuperNode idle poll in seconds (flops.runtime.fast_supernode); 0 = stock flower-supernode (3 s)",
    )
    p.add_argument(
        "--executor-poll",
        type=float,
        default=FAST_POLL_INTERVAL,
        help="SuperExec task poll in seconds; 0 = Flower's default (1 s)",
    )
    p.add_argument(
        "--isolation",
        choices=("warm", "subprocess"),
        default="warm",
        help="warm: one long-lived ClientApp worker (flops.runtime.clientapp_worker, SuperNode --isolation "
        "process); subprocess: Flower's default, one flwr-clientapp process per message",
    )
    p.add_argument("--tls-ca-file", type=Path, default=None, help="fleet CA: TLS + SuperNode auth when given")
    p.add_argument("--work-dir", type=Path, default=None, help="scratch directory (FLWR_HOME, SuperNode key)")
    p.add_argument("--report-fd", type=int, default=None, help="file descriptor for report lines (default stdout)")
    return p.parse_args(argv)


def node_config(args: argparse.Namespace) -> str:
    """The ``--node-config`` string the ClientApp reads (see ``flops.runtime.clientapp``)."""

    def quoted(value: str) -> str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

    return " ".join(
        [
            f"repo={quoted(str(args.repo.resolve()))}",
            f"data-server={quoted(args.data_server)}",
            f"data-tags={quoted(','.join(parse_tags(args.data_tags)))}",
        ]
    )


class OutputTail:
    """A child's output: passed on to our stderr (the learner's log), its last lines kept for error reports."""

    def __init__(self) -> None:
        self.tail: deque[str] = deque(maxlen=20)

    def on_line(self, line: str) -> None:
        print(line, file=sys.stderr, flush=True)
        self.tail.append(line)


class SupernodeWatch(OutputTail):
    """Follows SuperNode output: remembers the node id once registered and a tail for error reports."""

    def __init__(self) -> None:
        super().__init__()
        self.registered = threading.Event()
        self.node_id: int | None = None
        self.refused = False

    def on_line(self, line: str) -> None:
        super().on_line(line)
        if _NOT_REGISTERED in line or _NOT_SERVING in line or _PORT_TAKEN in line:
            self.refused = True
        if not self.registered.is_set() and (match := _NODE_ID.search(line)):
            self.node_id = int(match.group(1))
            self.registered.set()


def preflight(repo: Path) -> None:
    """Import the repo and load its data once, so failures surface before deployment."""
    manager = new_model_manager(repo)
    manager.set_model_data()


def local_rows(args: argparse.Namespace) -> int | None:
    """Rows this node holds for the project's tags (parquet metadata only): what this learner trains on."""
    from flops.data.client import DATA_TOKEN_ENV, TLS_CA_ENV, DataClient, DataError

    token, ca_file = os.environ.get(DATA_TOKEN_ENV), os.environ.get(TLS_CA_ENV) or None
    try:
        with DataClient(args.data_server, token=token, ca_file=ca_file, timeout=10.0) as client:
            return sum(info.rows for info in client.list(parse_tags(args.data_tags)))
    except DataError:
        return None


def run(args: argparse.Namespace, reports: ReportWriter) -> int:
    log = structlog.get_logger(__name__).bind(aggregator=args.aggregator, repo=str(args.repo))
    os.environ[DATA_SERVER_ENV] = args.data_server
    os.environ[DATA_TAGS_ENV] = ",".join(parse_tags(args.data_tags))
    try:
        preflight(args.repo)
    except RepoLoadError as exc:
        reports.emit(LEARNER_FAILED, reason=f"cannot load the ML repository: {exc.tail}")
        return 1
    except Exception as exc:
        reports.emit(LEARNER_FAILED, reason=f"cannot load the learner's data: {traceback_tail(exc)}")
        return 1
    private_key, public_key = None, None
    if args.tls_ca_file is not None:
        private_key, public_key = new_supernode_key(args.work_dir or Path(tempfile.mkdtemp(prefix="flops-learner-")))
    reports.emit(LEARNER_READY, aggregator=args.aggregator, examples=local_rows(args), public_key=public_key)
    env = flower_env(os.environ, poll_interval=args.executor_poll or None)
    if args.supernode_poll > 0:
        supernode_cmd = [sys.executable, "-m", "flops.runtime.fast_supernode"]
        env[POLL_ENV] = str(args.supernode_poll)
    else:
        supernode_cmd = [flower_bin("flower-supernode")]
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        env["FLWR_HOME"] = str(args.work_dir / "flwr-home")
    watch = SupernodeWatch()
    worker_output = OutputTail()
    isolation = ["--isolation", "process"] if args.isolation == "warm" else []

    def node_argvs() -> tuple[list[str], list[str]]:
        """The SuperNode's and its ClientApp worker's command lines around a runtime API port picked now: a
        restart picks another (on a host network, a port found free can be taken before the SuperNode binds it)."""
        runtime_port = free_port()
        supernode_argv = [
            *supernode_cmd,
            *supernode_args(args.tls_ca_file, private_key),
            "--superlink",
            args.aggregator,
            "--node-config",
            node_config(args),
            *isolation,
            "--port",
            str(runtime_port),
            "--max-wait-time",
            str(args.connect_timeout),
        ]
        return supernode_argv, clientapp_worker_argv(runtime_port, args.executor_poll or FAST_POLL_INTERVAL)

    with ChildGroup() as children:

        def start_node() -> tuple[subprocess.Popen[str], subprocess.Popen[str] | None]:
            supernode_argv, worker_argv = node_argvs()
            node = children.spawn("supernode", supernode_argv, env=env, cwd=args.work_dir, on_line=watch.on_line)
            worker = None
            if args.isolation == "warm":
                worker = children.spawn(
                    "clientapp-worker", worker_argv, env=env, cwd=args.work_dir, on_line=worker_output.on_line
                )
            return node, worker

        supernode, worker = start_node()
        deadline = time.monotonic() + args.connect_timeout
        while not watch.registered.wait(0.05):
            exited = supernode.poll() is not None
            if exited:
                time.sleep(0.2)  # let its last lines (the reason it stopped) reach the watch
            if exited and watch.refused and time.monotonic() + RESTART_PAUSE_S < deadline:
                # Our key may not be registered yet (the aggregator registers the keys right after its
                # SuperLink starts), the SuperLink not serving yet, or our runtime port taken: try again, on a
                # fresh port with a fresh worker (it backs off while its SuperNode is away).
                watch.refused = False
                stop_groups([worker] if worker is not None else [])
                time.sleep(RESTART_PAUSE_S)
                supernode, worker = start_node()
                continue
            if exited or time.monotonic() >= deadline:
                reason = (
                    f"SuperNode exited with status {supernode.returncode}"
                    if supernode.returncode is not None
                    else f"no connection to the aggregator {args.aggregator} within {args.connect_timeout:g} s"
                )
                reports.emit(LEARNER_FAILED, reason=reason + "\n" + "\n".join(watch.tail))
                return 1
        log.info("connected to the aggregator", node_id=watch.node_id)
        while supernode.poll() is None:
            if worker is not None and worker.poll() is not None:
                # The SuperNode would keep taking messages nobody runs: the round would wait its whole timeout.
                reason = f"its ClientApp worker exited with status {worker.returncode}"
                log.error("clientapp_worker.exited", status=worker.returncode)
                reports.emit(LEARNER_FAILED, reason=reason + "\n" + "\n".join(worker_output.tail))
                return 1
            time.sleep(CHILD_POLL_S)
        log.info("supernode.exited", status=supernode.returncode)
    return 0


def main(argv: list[str] | None = None) -> int:
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    args = parse_args(argv)
    install_sigterm_exit()
    exit_with_owner()  # in a container: gone with the `podman run` that started it
    return run(args, ReportWriter.open(args.report_fd))


if __name__ == "__main__":
    sys.exit(main())
