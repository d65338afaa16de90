"""Aggregator process of one project: SuperLink + ServerApp run, reported line by line.

``python -m flops.runtime.aggregator --repo DIR --rounds N --min-available-clients A
--min-fit-clients F --min-evaluate-clients E --strategy fedavg|fedprox|fedadam [--strategy-params JSON]
--address HOST:PORT --model-out DIR [--client-wait-timeout S] [--round-timeout S]
[--deadline S] [--tls-ca-file F --tls-cert-file F --tls-key-file F] [--supernode-keys FILE]
[--work-dir DIR] [--report-fd FD] [--cluster NAME --root-address HOST:PORT]``

Starts ``flower-superlink`` (Fleet, Control and Runtime APIs on ``--address``), submits one run of
the generated Flower App (``flops.runtime.serverapp`` / ``flops.runtime.clientapp``) with
``flwr run``, follows the ServerApp's report lines and forwards them: aggregator.started,
round.completed per round, then training.succeeded or training.failed. Exit status 0 only
on training.succeeded. Every child (SuperLink, its SuperExec and ServerApp) is stopped on exit,
on error and on SIGTERM.

With the node's certificate (``--tls-*``) the SuperLink serves TLS and admits only the SuperNodes whose
public keys are in ``--supernode-keys`` (registered before aggregator.started; see
``flops.runtime.flower_tls``); without it, ``--insecure``.

With ``--cluster`` and ``--root-address`` it is a cluster aggregator of clustered hierarchical FL: its run
serves the root's requests (``flops.runtime.cluster_training``) with ``--rounds`` rounds per cycle, and it
joins the root's SuperLink as one SuperNode (``flops.runtime.cluster_link``). It reports every cluster round
and runs until stopped, or fails (training.failed) when its learners, its run or the root are lost.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import structlog

from flops.runtime import tracking
from flops.runtime.cluster_link import spawn_root_link
from flops.runtime.flower_env import FAST_POLL_INTERVAL, dial_address, flower_bin, flower_env, split_address
from flops.runtime.flower_project import write_app, write_cli_config
from flops.runtime.flower_tls import ServerTls, client_context, superlink_args
from flops.runtime.reports import (
    AGGREGATOR_STARTED,
    TRAINING_FAILED,
    TRAINING_SUCCEEDED,
    ReportWriter,
    decode_report,
)
from flops.runtime.training import STRATEGIES, TrainingError, parse_strategy_params
from flops.supervisor import OWNER_PID_ENV, ChildGroup, exit_with_owner, install_sigterm_exit

CONNECTION = "flops"
TERMINAL_RUN_STATUSES = ("finished",)


class AggregatorError(RuntimeError):
    """The aggregator cannot run the training; the message is the training.failed reason."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m flops.runtime.aggregator", description=__doc__.split("\n")[0])
    p.add_argument("--repo", type=Path, required=True, help="ML repository (model_manager.py at its root)")
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--min-available-clients", type=int, required=True)
    p.add_argument("--min-fit-clients", type=int, required=True)
    p.add_argument("--min-evaluate-clients", type=int, required=True)
    p.add_argument("--strategy", choices=STRATEGIES, default="fedavg")
    p.add_argument(
        "--strategy-params",
        default="{}",
        help='the strategy\'s parameters as a JSON object, e.g. {"proximal_mu": 1.0} (SLA strategy_params)',
    )
    p.add_argument("--address", required=True, help="HOST:PORT the SuperLink listens on (learners connect here)")
    p.add_argument("--model-out", type=Path, required=True, help="directory for model.npz + metrics.json")
    p.add_argument("--client-wait-timeout", type=float, default=120.0, help="seconds to wait for learners")
    p.add_argument("--round-timeout", type=float, default=600.0, help="seconds to wait for one round's replies")
    p.add_argument("--deadline", type=float, default=3600.0, help="seconds for the whole training")
    p.add_argument(
        "--poll-interval",
        type=float,
        default=FAST_POLL_INTERVAL,
        help="reply / task polling in seconds (ServerApp grid and SuperExec); Flower's own: 3 s / 1 s",
    )
    p.add_argument(
        "--runtime-dependency-install",
        action="store_true",
        help="let the SuperLink `uv sync` the app's dependencies per run (Flower's default; off here)",
    )
    p.add_argument("--tls-ca-file", type=Path, default=None, help="fleet CA (TLS + SuperNode auth when given)")
    p.add_argument("--tls-cert-file", type=Path, default=None, help="this node's certificate, signed by the CA")
    p.add_argument("--tls-key-file", type=Path, default=None, help="the certificate's private key")
    p.add_argument(
        "--supernode-keys",
        type=Path,
        default=None,
        help="file of the learners' OpenSSH public keys, one per line, registered before aggregator.started",
    )
    p.add_argument("--work-dir", type=Path, default=None, help="scratch directory (default: a temp dir)")
    p.add_argument("--cluster", default=None, help="run as the aggregator of this cluster (hierarchical mode)")
    p.add_argument("--root-address", default=None, help="HOST:PORT of the root aggregator (with --cluster)")
    p.add_argument("--report-fd", type=int, default=None, help="file descriptor for report lines (default stdout)")
    return p.parse_args(argv)


def wait_healthy(
    address: str, *, timeout: float, superlink: subprocess.Popen[str], ca_file: Path | None = None
) -> None:
    """Wait until the SuperLink answers ``GET /health`` (over TLS verified with ``ca_file`` when given)."""
    host, port = split_address(address)
    url = f"{'https' if ca_file else 'http'}://{host}:{port}/health"
    context = client_context(ca_file)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if superlink.poll() is not None:
            raise AggregatorError(f"SuperLink exited with status {superlink.returncode} during start-up")
        try:
            with urllib.request.urlopen(url, timeout=1.0, context=context) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise AggregatorError(f"SuperLink did not become healthy at {address} within {timeout:g} s")


def _flwr_json(args: list[str], env: dict[str, str], timeout: float) -> tuple[Any, subprocess.CompletedProcess[str]]:
    """Run the ``flwr`` CLI with ``--format json``: the JSON object it printed (None if none), the process."""
    proc = subprocess.run(
        [flower_bin("flwr"), *args, "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    try:
        return json.loads(proc.stdout[proc.stdout.index("{") :]), proc
    except ValueError:
        return None, proc


def submit_run(app_dir: Path, env: dict[str, str]) -> int:
    """``flwr run`` the app against our SuperLink; return the run id."""
    payload, proc = _flwr_json(["run", str(app_dir), CONNECTION], env, timeout=120)
    try:
        return int(payload["run-id"])
    except (KeyError, TypeError, ValueError) as exc:
        tail = (proc.stdout + proc.stderr)[-2000:]
        raise AggregatorError(f"flwr run failed (exit {proc.returncode}): {tail}") from exc


def read_public_keys(path: Path | None) -> list[str]:
    """The learners' public keys: non-empty lines of ``path`` (none without a file)."""
    if path is None:
        return []
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def register_supernodes(keys: list[str], key_dir: Path, env: dict[str, str]) -> list[int]:
    """Register each public key with the SuperLink (``flwr supernode register``); return the node ids."""
    key_dir.mkdir(parents=True, exist_ok=True)
    node_ids = []
    for index, key in enumerate(keys):
        path = key_dir / f"learner-{index}.pub"
        path.write_text(key + "\n", encoding="utf-8")
        payload, proc = _flwr_json(["supernode", "register", str(path), CONNECTION], env, timeout=60)
        try:
            node_ids.append(int(payload["node-id"]))
        except (KeyError, TypeError, ValueError) as exc:
            tail = (proc.stdout + proc.stderr)[-2000:]
            raise AggregatorError(f"registering learner key {index} failed (exit {proc.returncode}): {tail}") from exc
    return node_ids


def run_status(run_id: int, env: dict[str, str]) -> dict[str, Any] | None:
    """The run's status as ``flwr ls`` reports it (None if it cannot be read)."""
    payload, _ = _flwr_json(["ls", CONNECTION, "--run-id", str(run_id)], env, timeout=60)
    runs = payload.get("runs", []) if isinstance(payload, dict) else []
    return runs[0] if runs else None


def follow_events(
    events_file: Path,
    reports: ReportWriter,
    *,
    run_id: int,
    env: dict[str, str],
    superlink: subprocess.Popen[str],
    deadline: float,
    status_every: float = 5.0,
    root_link: tuple[subprocess.Popen[str], subprocess.Popen[str]] | None = None,
    root_address: str | None = None,
) -> str:
    """Forward the ServerApp's report lines until a terminal one; return its kind."""
    log = structlog.get_logger(__name__).bind(run_id=run_id)
    position = 0
    next_status = time.monotonic() + status_every
    while True:
        if events_file.exists():
            with events_file.open("r", encoding="utf-8") as fh:
                fh.seek(position)
                while line := fh.readline():
                    if not line.endswith("\n"):
                        break
                    position += len(line.encode("utf-8"))
                    kind, payload = decode_report(line)
                    reports.emit(kind, **payload)
                    if kind in (TRAINING_SUCCEEDED, TRAINING_FAILED):
                        return kind
        now = time.monotonic()
        if superlink.poll() is not None:
            raise AggregatorError(f"SuperLink exited with status {superlink.returncode} during training")
        if root_link is not None:
            supernode, worker = root_link
            if supernode.poll() is not None:
                raise AggregatorError(f"lost the root aggregator at {root_address} (its SuperNode exited)")
            if worker.poll() is not None:
                status = worker.returncode
                raise AggregatorError(f"the ClientApp worker of its link to the root exited with status {status}")
        if now >= deadline:
            raise AggregatorError("training did not finish before the aggregator deadline")
        if now >= next_status:
            next_status = now + status_every
            status = run_status(run_id, env)
            log.debug("run.status", status=status)
            if status is not None and str(status.get("status", "")).startswith("finished"):
                # Give the ServerApp's last line a moment to land before declaring it lost.
                next_status = min(next_status, now + 1.0)
                if events_file.exists() and events_file.stat().st_size > position:
                    continue
                raise AggregatorError(f"Flower run {run_id} ended without a result: {status.get('status')}")
        time.sleep(0.05)


def run(args: argparse.Namespace, reports: ReportWriter) -> int:
    log = structlog.get_logger(__name__).bind(address=args.address, strategy=args.strategy)
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="flops-aggregator-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    events_file = work_dir / "events.jsonl"
    events_file.unlink(missing_ok=True)
    env = flower_env(os.environ, poll_interval=args.poll_interval)
    env["FLWR_HOME"] = str(work_dir / "flwr-home")
    env[OWNER_PID_ENV] = str(os.getpid())  # the ServerApp exits when we do (supervisor.exit_with_owner)
    try:
        tls = ServerTls(args.tls_ca_file, args.tls_cert_file, args.tls_key_file)
        keys = read_public_keys(args.supernode_keys)
        parse_strategy_params(args.strategy, args.strategy_params)
    except (OSError, ValueError, TrainingError) as exc:
        reports.emit(TRAINING_FAILED, reason=f"aggregator configuration: {exc}")
        return 1
    local = dial_address(args.address)
    write_cli_config(work_dir / "flwr-home", connection=CONNECTION, address=local, root_certificates=tls.ca_file)
    app_dir = write_app(
        work_dir / "app",
        {
            "repo": str(args.repo.resolve()),
            "rounds": args.rounds,
            "strategy": args.strategy,
            "strategy-params": args.strategy_params,
            "min-available-clients": args.min_available_clients,
            "min-fit-clients": args.min_fit_clients,
            "min-evaluate-clients": args.min_evaluate_clients,
            "client-wait-timeout": float(args.client_wait_timeout),
            "round-timeout": float(args.round_timeout),
            "model-out": str(args.model_out.resolve()),
            "events-file": str(events_file),
            "poll-interval": float(args.poll_interval),
            **(
                {"role": "cluster", "cluster": args.cluster, "bridge": str(work_dir / "bridge")} if args.cluster else {}
            ),
        },
    )
    deadline = time.monotonic() + args.deadline
    host, port = split_address(args.address)
    with ChildGroup() as children:
        try:
            superlink = children.spawn(
                "superlink",
                [
                    flower_bin("flower-superlink"),
                    *superlink_args(tls),
                    "--host",
                    host,
                    "--port",
                    str(port),
                    *([] if args.runtime_dependency_install else ["--disable-runtime-dependency-installation"]),
                ],
                env=env,
                cwd=work_dir,
                log_file=work_dir / "superlink.log",
            )
            wait_healthy(local, timeout=60.0, superlink=superlink, ca_file=tls.ca_file)
            if keys:
                node_ids = register_supernodes(keys, work_dir / "supernode-keys", env)
                log.info("supernodes.registered", node_ids=node_ids)
            reports.emit(AGGREGATOR_STARTED, address=args.address)
            run_id = submit_run(app_dir, env)
            log.info("run.submitted", run_id=run_id)
            root_link = None
            if args.cluster and args.root_address:
                root_link = spawn_root_link(
                    children,
                    root_address=args.root_address,
                    bridge_dir=work_dir / "bridge",
                    bridge_timeout=float(args.deadline),
                    connect_timeout=float(args.client_wait_timeout),
                    env=env,
                    work_dir=work_dir,
                )
            kind = follow_events(
                events_file,
                reports,
                run_id=run_id,
                env=env,
                superlink=superlink,
                deadline=deadline,
                root_link=root_link,
                root_address=args.root_address,
            )
        except AggregatorError as exc:
            log.error("training.failed", reason=str(exc))
            reports.emit(TRAINING_FAILED, reason=str(exc))
            return 1
    return 0 if kind == TRAINING_SUCCEEDED else 1


def main(argv: list[str] | None = None) -> int:
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    args = parse_args(argv)
    install_sigterm_exit()
    exit_with_owner()  # in a container: gone with the `podman run` that started it
    reports = tracking.wrap(ReportWriter.open(args.report_fd), os.environ, args)
    try:
        return run(args, reports)
    except SystemExit:
        reports.emit(TRAINING_FAILED, reason="aggregator stopped by signal")
        raise


if __name__ == "__main__":
    sys.exit(main())
