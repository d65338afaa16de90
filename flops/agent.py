"""The node agent: announces the node (retained birth, last will), serves its data, runs commands.

One agent per node. It owns a data directory (``<data-dir>/data`` served over Arrow Flight), a work
directory for project children (learners, aggregators, model servers, each with its own log file) and a
builder cache. Commands are idempotent by ``command_id`` (the ids handled are kept on disk); every outcome,
including a child that crashes, becomes a report on the project's reports topic.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from flops import topics
from flops.agent_link import ReportChannel, ReportOutbox
from flops.builder import containerfile as cf
from flops.bus import Bus, BusOptions, Will
from flops.containers import REPORT_FD, Podman, PodmanSettings, container_name
from flops.errors import ConfigError, PublishFailed
from flops.handled import HandledCommands
from flops.messages import AgentStatus, Command, CommandReceipt, decode_report
from flops.runtime.reports import FAILURE_KIND, TERMINAL
from flops.settings import BrokerAddress
from flops.supervisor import STOP_GRACE_S, Child, Supervisor, kill_group, still_ours
from flops.tracking.project import child_env as tracking_env

log = structlog.get_logger(__name__)

ROLES = ("learner", "builder", "aggregator", "serve")
# Put on the agent's own queue after every (re)connect: re-send every report not acknowledged yet.
_RESEND_ALL = object()
BUILD_WORKER = "flops.builder.worker"
MODEL_IMAGE_WORKER = "flops.builder.model_image"


class _Stopped(Exception):
    """The project was told to stop while this command was starting: nothing to report."""


@dataclass
class AgentConfig:
    agent_id: str
    data_dir: Path
    roles: tuple[str, ...] = ROLES
    cluster: str | None = None
    host: str = "127.0.0.1"  # the address others reach this node's services at
    bind_host: str = "127.0.0.1"
    data_port: int = 0
    builder_workers: int = 1
    extra_env: dict[str, str] = field(default_factory=dict)
    # The data server needs no other node: learners read it on this node. Open it only with TLS.
    data_bind_host: str = "127.0.0.1"
    data_max_upload_mb: int = 512
    # The fleet CA and this node's certificate (FLOPS_TLS_*): when set, the data server speaks TLS, Flower runs
    # TLS + SuperNode auth, and learners check their peers with the CA.
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # Images: builds the manager asks for as images push to this registry; image artifacts run with podman.
    registry: str = "127.0.0.1:5000"
    registry_tls: bool = False
    base_image: str | None = None
    podman: PodmanSettings = field(default_factory=PodmanSettings)


class Agent:
    # Command ids remembered for idempotency (a redelivery comes long before 10,000 newer commands).
    KEEP_HANDLED = 10_000

    def __init__(
        self,
        config: AgentConfig,
        address: BrokerAddress,
        *,
        ca_file: str | None = None,
        client_cert: str | None = None,
        client_key: str | None = None,
    ) -> None:
        self.config = config
        self.id = config.agent_id
        self.dirs = {name: config.data_dir / name for name in ("data", "work", "builds", "state")}
        for d in self.dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        self._running_path = self.dirs["state"] / "running.json"
        self._handled = HandledCommands(self.dirs["state"] / "commands.jsonl", self.KEEP_HANDLED)
        self._log = log.bind(agent_id=self.id)
        self.outbox = ReportOutbox(self.dirs["state"] / "reports.sqlite3")
        self.reports = ReportChannel(self.outbox, lambda topic, payload: self.bus.publish(topic, payload), self._log)
        self.data_server = None
        if "learner" in config.roles:
            self.data_server = self._new_data_server()
        self.supervisor = Supervisor(self._child_report, self._child_exit)
        self.podman = Podman(config.podman, self.id)
        self._builds = ThreadPoolExecutor(max_workers=config.builder_workers, thread_name_prefix="build")
        # Starting a child may first need a local build (the environment was built on another host): off the
        # command loop, so stop_project and other projects' commands are never stuck behind it.
        self._starts = ThreadPoolExecutor(max_workers=4, thread_name_prefix="start")
        # Projects told to stop, with what they keep: a start still in flight for them must not spawn.
        self._stopped: dict[str, set[str]] = {}
        self._spawn_lock = threading.Lock()
        self._stop = threading.Event()
        self._running_lock = threading.Lock()
        self.bus = Bus(
            address,
            BusOptions(
                client_id=f"flops-agent-{self.id}",
                subscriptions=[topics.agent_commands(self.id), topics.agent_acks(self.id)],
                clean_start=False,
                session_expiry_s=3600,
                manual_ack=True,
                will=Will(topics.agent_status(self.id), self._status(online=False).to_bytes()),
                birth=lambda: (topics.agent_status(self.id), self._status(online=True).to_bytes()),
                # After every reconnect: re-send what the manager has not acknowledged yet.
                on_ready=lambda _present: self.bus.inbox.put(_RESEND_ALL),  # type: ignore[arg-type]
                ca_file=ca_file,
                client_cert=client_cert,
                client_key=client_key,
            ),
        )

    def _new_data_server(self) -> Any:
        """The node's data server; its admin token is kept in ``state/data-admin.token`` for the node's CLI."""
        from flops.data.server import DataServer, TlsFiles, load_or_create_admin_token

        config = self.config
        if bool(config.tls_cert_file) != bool(config.tls_key_file):
            raise ConfigError("FLOPS_TLS_CERT_FILE and FLOPS_TLS_KEY_FILE must be set together")
        tls = (
            TlsFiles(config.tls_cert_file, config.tls_key_file)
            if config.tls_cert_file and config.tls_key_file
            else None
        )
        wildcard = config.data_bind_host in ("0.0.0.0", "::", "")
        return DataServer(
            self.dirs["data"],
            config.data_bind_host,
            config.data_port,
            advertise_host=config.host if wildcard else None,
            admin_token=load_or_create_admin_token(self.dirs["state"]),
            max_upload_bytes=config.data_max_upload_mb * 1024 * 1024,
            tls=tls,
        )

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> Agent:
        if self.data_server is not None:
            self.data_server.on_change = lambda inventory: self._announce()
            self.data_server.start()
            # Which agent and server the admin token in this directory is for (read by `flops data`).
            info = {"agent_id": self.id, "location": self.data_server.location}
            (self.dirs["state"] / "data-server.json").write_text(json.dumps(info))
        self.bus.connect()
        self._reconcile()
        threading.Thread(target=self._run, daemon=True, name="agent").start()
        self._log.info("agent ready", roles=self.config.roles, data_server=self._data_location())
        return self

    def stop(self) -> None:
        self._stop.set()
        self._builds.shutdown(wait=False, cancel_futures=True)
        self._starts.shutdown(wait=False, cancel_futures=True)
        self._remove_containers(self.supervisor.stop_all())  # SIGTERM, STOP_GRACE_S, SIGKILL: builds included
        if self.bus.connected:
            try:
                self.bus.publish_wait(
                    topics.agent_status(self.id), self._status(online=False).to_bytes(), retain=True, timeout=3.0
                )
            except PublishFailed:
                self._log.warning("could not publish the offline status; the broker sends the last will")
        self.bus.close()
        if self.data_server is not None:
            self.data_server.stop()

    def wait(self) -> None:
        self._stop.wait()

    # --- status ----------------------------------------------------------------------------------

    def _data_location(self) -> str | None:
        return self.data_server.location if self.data_server is not None else None

    def _status(self, online: bool) -> AgentStatus:
        from flops.data.server import inventory

        memory_mb = None
        with contextlib.suppress(ValueError, OSError):
            memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
        return AgentStatus(
            agent_id=self.id,
            online=online,
            roles=list(self.config.roles),  # type: ignore[arg-type]
            data_tags=inventory(self.dirs["data"]) if "learner" in self.config.roles else {},
            cluster=self.config.cluster,
            platform="linux/arm64" if platform.machine() in {"aarch64", "arm64"} else "linux/amd64",
            host=self.config.host,
            data_server=self._data_location() if online else None,
            cpus=os.cpu_count(),
            memory_mb=memory_mb,
        )

    def _announce(self) -> None:
        """Re-publish the retained status (data arrived or left)."""
        self.bus.publish(topics.agent_status(self.id), self._status(online=True).to_bytes(), retain=True)

    # --- commands --------------------------------------------------------------------------------

    def _run(self) -> None:
        next_resend = time.monotonic() + self.outbox.resend_s
        while not self._stop.is_set():
            if time.monotonic() >= next_resend:
                self.reports.resend()
                next_resend = time.monotonic() + self.outbox.resend_s
            try:
                message = self.bus.inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            if message is _RESEND_ALL:
                self.reports.resend(everything=True)
                continue
            if topics.parse(message.topic).kind == "agent_acks":
                self.reports.on_ack(message.payload)
                self.bus.ack(message)
                continue
            try:
                command = Command.model_validate_json(message.payload)
            except ValueError as exc:
                self._log.warning("unreadable command", error=str(exc)[:300])
                self.bus.ack(message)
                continue
            bound = self._log.bind(project_id=command.project_id, command_id=command.command_id, kind=command.kind)
            if command.command_id in self._handled:
                bound.info("duplicate command ignored")
                self._receipt(command.command_id)
                self.bus.ack(message)
                continue
            self._record(command)
            self._receipt(command.command_id)
            self.bus.ack(message)
            try:
                self._execute(command)
                bound.info("command accepted")
            except Exception as exc:
                bound.exception("command failed")
                self._report(command, "command.failed", reason=f"{type(exc).__name__}: {exc}")

    def _execute(self, cmd: Command) -> None:
        if cmd.kind == "build":
            self._builds.submit(self._build, cmd)
        elif cmd.kind == "run_learner":
            self._starts.submit(self._start, cmd, self._run_learner)
        elif cmd.kind == "run_aggregator":
            self._starts.submit(self._start, cmd, self._run_aggregator)
        elif cmd.kind == "build_model_image":
            self._builds.submit(self._build_model_image, cmd)
        elif cmd.kind == "serve_model":
            self._starts.submit(self._start, cmd, self._serve_model)
        elif cmd.kind == "stop_project":
            keep = set(cmd.spec.get("keep", []))
            with self._spawn_lock:
                self._stopped[cmd.project_id] = keep
            stopped = self.supervisor.stop_project(cmd.project_id, keep)
            self._remove_containers(stopped)
            if self.data_server is not None and "run_learner" not in keep:
                self.data_server.revoke(cmd.project_id)  # its learners' data token stops working
            self._forget_running({c.command_id for c in stopped})
            self._log.info("project stopped", project_id=cmd.project_id, children=len(stopped))

    def _build_argv(self, spec: dict[str, Any]) -> list[str]:
        argv = [BUILD_WORKER, "--spec", json.dumps(spec), "--workdir", str(self.dirs["builds"])]
        if spec.get("backend") == "image":
            argv += ["--backend", "image", "--registry", self.config.registry]
            argv += ["--storage-driver", self.config.podman.storage_driver]
            argv += ["--registry-tls"] if self.config.registry_tls else []
            argv += ["--base-image", self.config.base_image] if self.config.base_image else []
        return argv

    def _build(self, cmd: Command) -> None:
        """A build runs as a child (``flops.builder.worker``): stop_project and the agent's stop kill it."""
        child = self._spawn(cmd, self._build_argv(cmd.spec), {"python": sys.executable})
        if child is None:
            self._forget_running({cmd.command_id})
        else:
            child.done.wait()  # one build per builder worker thread at a time

    def _image(self, cmd: Command, role: str) -> str | None:
        """The registry image of ``role`` when the project's artifact is images (None: an environment)."""
        details = cmd.spec.get("artifact", {}).get("details", {})
        if details.get("kind") != "image":
            return None
        if not self.podman.available():
            raise RuntimeError(f"agent {self.id} cannot run image artifacts: {self.config.podman.podman} not found")
        return str(details["images"][role])

    def _remove_containers(self, children: list[Child]) -> None:
        self.podman.remove([c.container for c in children if c.container])

    def _artifact(self, cmd: Command) -> dict[str, Any]:
        """The built environment; built here when it is not on this node (another host built it)."""
        details = dict(cmd.spec.get("artifact", {}).get("details", {}))
        if details.get("python") and Path(details["python"]).exists() and Path(details["repo_dir"]).exists():
            return details
        spec = {k: details.get(k) for k in ("repo_url", "commit", "flavor", "platforms") if details.get(k)}
        outcome: dict[str, dict[str, Any]] = {}
        child = self._spawn(
            cmd,
            self._build_argv(spec),
            {"python": sys.executable},
            kind="local_build",
            on_report=lambda _child, kind, payload: outcome.__setitem__(kind, payload),
            on_exit=lambda _child, _code: None,
        )
        if child is None:
            raise _Stopped
        child.done.wait()
        if child.stopped:
            raise _Stopped
        if "build.succeeded" in outcome:
            return dict(outcome["build.succeeded"]["artifact"]["details"])
        reason = outcome.get("build.failed", {}).get("reason") or f"exit status {child.proc.returncode}"
        raise RuntimeError(f"local build failed: {reason}")

    def _workdir(self, cmd: Command) -> Path:
        path = self.dirs["work"] / cmd.project_id / cmd.command_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _start(self, cmd: Command, start: Any) -> None:
        try:
            if start(cmd) is None:  # not started: the project was stopped meanwhile
                self._forget_running({cmd.command_id})
        except _Stopped:
            self._forget_running({cmd.command_id})
        except Exception as exc:
            self._log.exception("command failed", project_id=cmd.project_id, command_id=cmd.command_id)
            self._forget_running({cmd.command_id})
            self._report(cmd, "command.failed", reason=f"{type(exc).__name__}: {exc}")

    def _spawn(
        self,
        cmd: Command,
        argv: list[str],
        artifact: dict[str, Any],
        *,
        kind: str | None = None,
        restart: int = 0,
        env: dict[str, str] | None = None,
        image: str | None = None,
        **callbacks: Any,
    ) -> Child | None:
        """Start a child for ``cmd`` unless its project was stopped. A child of another ``kind`` (a local
        build before the command's own child) and children with their own callbacks are not recorded.
        ``env`` is added to the child's environment (secrets go there, never on its command line).
        With ``image`` the child is ``python -m argv…`` in a podman container of that image."""
        work = self._workdir(cmd)
        secrets_env = env or {}
        env = {**os.environ, **self.config.extra_env, **secrets_env, "PYTHONUNBUFFERED": "1"}
        kind = kind or cmd.kind
        container = None
        run: dict[str, Any] = {}
        if image is not None:
            container = container_name(f"{cmd.command_id}.g{restart}")
            # Only the TLS files the child is given (a learner gets the CA, never this node's key).
            mounts = [work, *(f for f in self._tls_files() if f is not None and str(f) in argv)]
            argv = self.podman.run_argv(
                name=container,
                image=image,
                args=["-m", *argv],
                project_id=cmd.project_id,
                command_id=cmd.command_id,
                env_names=[*self.config.extra_env, *secrets_env],
                mounts=mounts,
                entrypoint="python",
            )
            run = {"report_fd": REPORT_FD, "container": container}
        else:
            argv = [artifact["python"], "-m", *argv]
        with self._spawn_lock:
            keep = self._stopped.get(cmd.project_id)
            if keep is not None and cmd.kind not in keep:
                self._log.info("project already stopped; not starting", project_id=cmd.project_id, kind=cmd.kind)
                return None
            child = self.supervisor.spawn(
                cmd.project_id,
                cmd.command_id,
                kind,
                argv,
                log_path=work / f"{kind}.log",
                env=env,
                cwd=work,
                restart=restart,
                **run,
                **callbacks,
            )
            if kind == cmd.kind:
                self._remember_running(child)
        return child

    def _run_learner(self, cmd: Command) -> Child | None:
        from flops.data.client import DATA_TOKEN_ENV, TLS_CA_ENV

        if self.data_server is None:
            raise RuntimeError("this agent has no learner role")
        image = self._image(cmd, "learner")
        artifact = {} if image else self._artifact(cmd)
        repo_dir = cf.REPO_DIR if image else artifact["repo_dir"]
        tags = ",".join(cmd.spec.get("data_tags", []))
        # The manager issues one token per project and learner; a command recorded before tokens existed
        # carries none, and a token only this agent and its learner know serves as well.
        token = str(cmd.spec.get("data_token") or secrets.token_urlsafe(24))
        self.data_server.grant(cmd.project_id, token, cmd.spec.get("data_tags", []))
        env = {DATA_TOKEN_ENV: token}
        if self.config.tls_ca_file:
            env[TLS_CA_ENV] = str(self.config.tls_ca_file)
        child = self._spawn(
            cmd,
            [
                "flops.runtime.learner",
                "--repo",
                repo_dir,
                "--aggregator",
                cmd.spec["aggregator_address"],
                "--data-server",
                self.data_server.location,
                "--data-tags",
                tags,
                *self._tls_args("--tls-ca-file"),
                "--work-dir",
                str(self._workdir(cmd)),
            ],
            artifact,
            env=env,
            image=image,
        )
        if child is None:  # the project was stopped meanwhile
            self.data_server.revoke(cmd.project_id)
        return child

    def _tls_files(self) -> tuple[Path | None, ...]:
        return (self.config.tls_ca_file, self.config.tls_cert_file, self.config.tls_key_file)

    def _tls_args(self, *flags: str) -> list[str]:
        """``--tls-ca-file F --tls-cert-file F --tls-key-file F`` for the configured files among ``flags``."""
        files = {
            "--tls-ca-file": self.config.tls_ca_file,
            "--tls-cert-file": self.config.tls_cert_file,
            "--tls-key-file": self.config.tls_key_file,
        }
        return [arg for flag in flags if (path := files[flag]) is not None for arg in (flag, str(path))]

    def _run_aggregator(self, cmd: Command) -> Child | None:
        image = self._image(cmd, "aggregator")
        artifact = {} if image else self._artifact(cmd)
        spec = cmd.spec
        work = self._workdir(cmd)
        keys = work / "supernode_keys.txt"
        keys.write_text("".join(f"{key}\n" for key in spec.get("supernode_keys", [])), encoding="utf-8")
        return self._spawn(
            cmd,
            [
                "flops.runtime.aggregator",
                "--repo",
                cf.REPO_DIR if image else artifact["repo_dir"],
                "--rounds",
                str(spec["rounds"]),
                "--min-available-clients",
                str(spec["min_available_clients"]),
                "--min-fit-clients",
                str(spec["min_fit_clients"]),
                "--min-evaluate-clients",
                str(spec["min_evaluate_clients"]),
                "--strategy",
                spec.get("strategy", "fedavg"),
                "--strategy-params",
                json.dumps(spec.get("strategy_params", {})),
                *_timeout_args(spec),
                *(["--cluster", spec["cluster"], "--root-address", spec["root_address"]] if "cluster" in spec else []),
                "--address",
                f"{self.config.bind_host}:{spec['port']}",
                "--model-out",
                str(work / "model"),
                *self._tls_args("--tls-ca-file", "--tls-cert-file", "--tls-key-file"),
                "--supernode-keys",
                str(keys),
                "--work-dir",
                str(work / "flower"),
            ],
            artifact,
            image=image,
            env=tracking_env(spec),
        )

    def _build_model_image(self, cmd: Command) -> None:
        from flops.builder import package_model
        from flops.builder.model_package import DEFAULT_ENTRY_MODULE, MLFLOW_ENTRY_MODULE, MLFLOW_MODEL_DIR

        if cmd.spec.get("artifact", {}).get("details", {}).get("kind") == "image":
            # A supervised child like a build: stop_project stops it; it reports model.built / model.failed.
            argv = [MODEL_IMAGE_WORKER, "--spec", json.dumps(cmd.spec), "--workdir", str(self.dirs["builds"])]
            argv += ["--registry", self.config.registry, "--storage-driver", self.config.podman.storage_driver]
            argv += ["--registry-tls"] if self.config.registry_tls else []
            child = self._spawn(cmd, argv, {"python": sys.executable})
            if child is None:
                self._forget_running({cmd.command_id})
            return
        try:
            artifact = self._artifact(cmd)
            model_ref = Path(cmd.spec["model"]["model_ref"])
            out = self._workdir(cmd) / "package"
            if out.exists():
                shutil.rmtree(out)
            tracking = cmd.spec.get("tracking") or {}
            tracked = bool(tracking.get("model_uri") and tracking.get("url"))
            package = package_model(
                model_ref.parent if model_ref.is_file() else model_ref,
                artifact,
                Path(artifact["repo_dir"]),
                out,
                entry_module=MLFLOW_ENTRY_MODULE if tracked else DEFAULT_ENTRY_MODULE,
            )
            if tracked:  # served by MLflow's scoring server, as the model the aggregator logged
                self._mlflow_model(artifact, model_ref, tracking, package.path / MLFLOW_MODEL_DIR)
            self._report(cmd, "model.built", image_ref=f"dir://{package.path}")
        except _Stopped:
            pass
        except Exception as exc:
            self._report(cmd, "model.failed", reason=f"packaging failed: {type(exc).__name__}: {exc}")
        finally:
            self._forget_running({cmd.command_id})

    def _mlflow_model(self, artifact: dict[str, Any], model_ref: Path, tracking: dict[str, Any], out: Path) -> None:
        """The logged MLflow model (or, when it cannot be fetched, the saved parameters in MLflow's format) at
        ``out``, made by the project environment's own Python (which has MLflow and the repo's packages)."""
        argv = [artifact["python"], "-m", "flops.runtime.mlflow_model", "--repo", artifact["repo_dir"]]
        argv += ["--params", str(model_ref if model_ref.is_file() else model_ref / "model.npz")]
        argv += ["--flavor", str(artifact.get("flavor") or "sklearn"), "--out", str(out)]
        argv += ["--model-uri", str(tracking["model_uri"]), "--tracking-uri", str(tracking["url"])]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"the MLflow model could not be made: {done.stderr.strip()[-1500:]}")

    def _serve_model(self, cmd: Command, *, port: int = 0, restart: int = 0) -> Child | None:
        if cmd.spec["image_ref"].startswith("image://"):
            return self._serve_model_image(cmd, port=port, restart=restart)
        package = cmd.spec["image_ref"].removeprefix("dir://")
        manifest = json.loads((Path(package) / "manifest.json").read_text())
        python = manifest.get("python") or sys.executable
        argv = [
            manifest.get("entry_module", "flops.runtime.serve"),
            "--package",
            package,
            "--host",
            self.config.bind_host,
            "--port",
            str(port),
            "--advertise-host",
            self.config.host,
        ]
        if cmd.spec.get("token"):
            argv += ["--token-file", str(self._token_file(cmd, str(cmd.spec["token"])))]
        return self._spawn(cmd, argv, {"python": python}, restart=restart)

    def _serve_model_image(self, cmd: Command, *, port: int, restart: int) -> Child | None:
        """The trained-model image (MLflow's scoring server behind the token) as a container."""
        image = cmd.spec["image_ref"].removeprefix("image://")
        if not self.podman.available():
            raise RuntimeError(f"agent {self.id} cannot run the trained-model image: podman not found")
        argv = ["flops.runtime.mlflow_serve", "--model", cf.MODEL_DIR, "--host", self.config.bind_host]
        argv += ["--port", str(port), "--advertise-host", self.config.host]
        if cmd.spec.get("token"):
            argv += ["--token-file", str(self._token_file(cmd, str(cmd.spec["token"])))]
        return self._spawn(cmd, argv, {}, restart=restart, image=image)

    def _token_file(self, cmd: Command, token: str) -> Path:
        """The model server's bearer token in a file only this user can read (never on a command line)."""
        path = self._workdir(cmd) / "model-token"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            os.fchmod(out.fileno(), 0o600)  # an older file may have had wider permissions
            out.write(token + "\n")
        return path

    # --- child reports -> MQTT -------------------------------------------------------------------

    def _child_report(self, child: Child, kind: str, payload: dict[str, Any]) -> None:
        if child.stopped and kind in FAILURE_KIND.values():
            # We stopped it (stop_project, or our own shutdown): its "I was stopped" is no failure of the
            # project. After a shutdown the restarted agent reports what it lost, naming itself.
            return
        if kind in TERMINAL:
            child.terminal_reported = True
        if kind == "model.served" and child.kind == "serve_model":
            # Where it listens: an agent restarted later serves the model again at this URL.
            self._remember(child.command_id, child.project_id, child.kind, url=payload.get("url"))
        fields = dict(payload)
        if kind.startswith("learner."):
            fields["agent_id"] = self.id
            fields.pop("node_id", None)
            fields.pop("aggregator", None)
        # Deterministic ids: a report re-sent after a restart is recognised by the manager; a model server
        # the agent restarted counts its reports anew.
        run = f".g{child.restart}" if child.restart else ""
        self._send(child.project_id, child.command_id, kind, fields, event_id=f"{child.command_id}{run}.r{child.lines}")

    def _child_exit(self, child: Child, code: int) -> None:
        if child.shutdown:
            return  # the agent stops: the command stays recorded, the next start reports it (or serves again)
        self._forget_running({child.command_id})
        if child.stopped or child.terminal_reported:
            return
        kind = FAILURE_KIND.get(child.kind, "command.failed")
        fields: dict[str, Any] = {
            "reason": f"{child.kind} exited with code {code} before reporting an outcome",
            "log_tail": child.log_tail(),
        }
        if kind == "learner.failed":
            fields["agent_id"] = self.id
        run = f".g{child.restart}" if child.restart else ""
        self._send(child.project_id, child.command_id, kind, fields, event_id=f"{child.command_id}{run}.exit")

    def _report(self, cmd: Command, kind: str, **fields: Any) -> None:
        self._send(cmd.project_id, cmd.command_id, kind, fields, event_id=f"{cmd.command_id}.{kind}")

    def _send(self, project_id: str, command_id: str, kind: str, fields: dict[str, Any], *, event_id: str) -> None:
        body = {
            "event_id": event_id,
            "project_id": project_id,
            "source": f"agent/{self.id}",
            "command_id": command_id,
            "kind": kind,
            **fields,
        }
        try:
            report = decode_report(json.dumps(body).encode())
        except ValueError as exc:
            self._log.warning("dropping malformed child report", kind=kind, error=str(exc)[:300])
            return
        self.reports.send(topics.agent_reports(self.id), report.event_id, report.to_bytes())

    def _receipt(self, command_id: str) -> None:
        """Tell the manager the command is recorded here, so it stops re-sending it."""
        with contextlib.suppress(PublishFailed):
            self.bus.publish(topics.agent_receipts(self.id), CommandReceipt(command_ids=[command_id]).to_bytes())

    # --- idempotency and restart bookkeeping -----------------------------------------------------

    def _read_running(self) -> dict[str, dict[str, Any]]:
        try:
            return json.loads(self._running_path.read_text())
        except (OSError, ValueError):
            return {}

    def _write_running(self, running: dict[str, dict[str, Any]]) -> None:
        tmp = self._running_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(running))
        tmp.replace(self._running_path)

    def _record(self, command: Command) -> None:
        """Before the command is acknowledged: handled (never acted on twice) and, when it starts something,
        recorded as running with no pid yet, so a crash before it runs is reported after the restart."""
        if command.kind in FAILURE_KIND:
            self._remember(
                command.command_id, command.project_id, command.kind, pid=None, command=command.model_dump(mode="json")
            )
        self._handled.add(command.command_id)

    def _remember_running(self, child: Child) -> None:
        self._remember(
            child.command_id, child.project_id, child.kind, pid=child.pid, started=child.started, restart=child.restart
        )

    def _remember(self, command_id: str, project_id: str, kind: str, **fields: Any) -> None:
        """Add or update the running.json entry of ``command_id`` (pid, its start time, the command, the URL)."""
        with self._running_lock:
            running = self._read_running()
            entry = running.setdefault(command_id, {"project_id": project_id, "kind": kind, "pid": None})
            entry.update(fields)
            self._write_running(running)

    def _forget_running(self, command_ids: set[str]) -> None:
        with self._running_lock:
            running = self._read_running()
            for command_id in command_ids:
                running.pop(command_id, None)
            self._write_running(running)

    def _reconcile(self) -> None:
        """After a restart: what the previous run recorded is gone for us. Stop leftovers that are still ours
        (same pid *and* start time) and containers labelled with this agent, serve finished projects' models
        again at their URL, report the rest."""
        previous = self._read_running()
        if self.podman.available():
            self.podman.remove(self.podman.leftovers())
        leftovers = [
            int(entry["pid"])
            for entry in previous.values()
            if entry.get("pid") and still_ours(int(entry["pid"]), entry.get("started"))
        ]
        self._stop_leftovers(leftovers)
        for command_id, entry in previous.items():
            if entry["kind"] == "serve_model" and entry.get("url") and entry.get("command"):
                self._starts.submit(self._serve_again, command_id, entry)
                continue
            kind = FAILURE_KIND.get(entry["kind"], "command.failed")
            fields: dict[str, Any] = {"reason": f"agent {self.id} restarted; its {entry['kind']} no longer runs"}
            if kind == "learner.failed":
                fields["agent_id"] = self.id
            self._send(entry["project_id"], command_id, kind, fields, event_id=f"{command_id}.lost")
            self._forget_running({command_id})

    def _stop_leftovers(self, pids: list[int]) -> None:
        for pid in pids:
            kill_group(pid, signal.SIGTERM)
        import psutil

        procs = []
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                procs.append(psutil.Process(pid))
        _, alive = psutil.wait_procs(procs, timeout=STOP_GRACE_S)
        for proc in alive:
            kill_group(proc.pid, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=2.0)

    def _serve_again(self, command_id: str, entry: dict[str, Any]) -> None:
        """A finished project's model server, started again on the host:port its URL advertises."""
        from urllib.parse import urlsplit

        cmd = Command.model_validate(entry["command"])
        restart = int(entry.get("restart") or 0) + 1
        try:
            port = urlsplit(entry["url"]).port or 0
            if self._serve_model(cmd, port=port, restart=restart) is None:
                self._forget_running({command_id})
        except Exception as exc:
            what = f"{type(exc).__name__}: {exc}"
            self._log.exception("model server not restarted", project_id=cmd.project_id, command_id=command_id)
            self._forget_running({command_id})
            self._send(
                cmd.project_id,
                command_id,
                "model.failed",
                {"reason": f"agent {self.id} restarted; cannot serve {entry['url']} again: {what}"},
                event_id=f"{command_id}.g{restart}.failed",
            )


def _timeout_args(spec: dict[str, Any]) -> list[str]:
    """The aggregator's deadline, round timeout and client wait the manager derived from the SLA (a command
    recorded before they were derived has none: the aggregator's defaults apply)."""
    flags = {"deadline_s": "--deadline", "round_timeout_s": "--round-timeout", "client_wait_s": "--client-wait-timeout"}
    return [arg for key, flag in flags.items() if key in spec for arg in (flag, str(float(spec[key])))]
