"""The ``flops`` command line: broker, manager, agent, projects, data and the demo."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from flops import logs
from flops.errors import FlopsError
from flops.lifecycle_stages import Outcome, Stage
from flops.messages import ProjectEvent, ProjectRequest, ProjectState, describe, new_id, too_deep
from flops.settings import Settings
from flops.sla import ProjectSLA

if TYPE_CHECKING:
    from flops.client import Client

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Federated-learning operations over MQTT.")
project_app = typer.Typer(no_args_is_help=True, help="Submit and follow projects.")
app.add_typer(project_app, name="project")
data_app = typer.Typer(no_args_is_help=True, help="Node-local data: push mock partitions, see who holds what.")
app.add_typer(data_app, name="data")
setup_app = typer.Typer(no_args_is_help=True, help="Provision a deployment: certificates, credentials, broker.")
app.add_typer(setup_app, name="setup")

EXIT_BY_OUTCOME = {Outcome.COMPLETED: 0, Outcome.FAILED: 1, Outcome.CANCELLED: 2}


def _settings(ctx: typer.Context) -> Settings:
    return ctx.obj  # type: ignore[no-any-return]


@app.callback()
def _main(
    ctx: typer.Context,
    broker_url: Annotated[str | None, typer.Option(help="mqtt://host:port or mqtts://… [env FLOPS_BROKER_URL]")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Where state is kept [env FLOPS_DATA_DIR]")] = None,
    log_format: Annotated[str | None, typer.Option(help="auto|console|json [env FLOPS_LOG_FORMAT]")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug|info|warning|error")] = None,
) -> None:
    overrides: dict[str, Any] = {
        k: v
        for k, v in {
            "broker_url": broker_url,
            "data_dir": data_dir,
            "log_format": log_format,
            "log_level": log_level,
        }.items()
        if v is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        Console(stderr=True).print(f"[red]bad setting:[/] {describe(exc)}")
        raise typer.Exit(78) from None
    logs.configure(settings.log_format, settings.log_level)
    ctx.obj = settings


# --- servers ---------------------------------------------------------------------------------------


@app.command()
def broker(
    ctx: typer.Context,
    port: Annotated[int, typer.Option(help="Port to listen on (loopback)")] = 1883,
) -> None:
    """Start the embedded development broker (Mosquitto from PATH) and keep it running."""
    import threading

    from flops.broker import start_embedded

    settings = _settings(ctx)
    with _errors():
        running = start_embedded("127.0.0.1", port, data_dir=settings.data_dir / "broker")
    Console(stderr=True).print(f"broker listening on {running.address.url} (Ctrl-C stops it)")
    _wait_for_signal(getattr(running, "wait", threading.Event().wait), running.stop)


@app.command()
def registry(
    ctx: typer.Context,
    port: Annotated[int | None, typer.Option(help="Port to listen on [default: FLOPS_REGISTRY's]")] = None,
    host: Annotated[
        str, typer.Option(help="Address to listen on; open it beyond loopback only with TLS (see deploy/README.md)")
    ] = "127.0.0.1",
) -> None:
    """Start the FLOps image registry (Debian's docker-registry) with its storage under DATA_DIR/registry.

    Plain HTTP for development; HTTPS when FLOPS_TLS_CERT_FILE and FLOPS_TLS_KEY_FILE are set.
    """
    from flops.registry import registry_port, start_registry

    settings = _settings(ctx)
    with _errors():
        running = start_registry(
            settings.data_dir / "registry",
            host=host,
            port=port or registry_port(settings.registry),
            cert_file=settings.tls_cert_file,
            key_file=settings.tls_key_file,
        )
    _wait_for_signal(running.wait, running.stop, ready=f"registry listening on {running.url} (Ctrl-C stops it)")


@app.command()
def manager(
    ctx: typer.Context,
    store: Annotated[
        str | None, typer.Option(help="SQLite file, or memory:// (default: DATA_DIR/manager.sqlite3)")
    ] = None,
    deployer: Annotated[
        str | None, typer.Option(help="Where actors run: agents (MQTT) or oakestra [env FLOPS_DEPLOYER]")
    ] = None,
    oakestra_url: Annotated[
        str | None, typer.Option(help="Oakestra System Manager, e.g. http://root:10000 [env FLOPS_OAKESTRA_URL]")
    ] = None,
) -> None:
    """Run the manager: owns every project's state machine; resumes unfinished projects at start."""
    from flops.broker import embedded_or_external
    from flops.manager import Manager
    from flops.store import open_store
    from flops.store_sqlite import SQLiteStore

    settings = _settings(ctx)
    flags = {k: v for k, v in {"deployer": deployer, "oakestra_url": oakestra_url}.items() if v is not None}
    if flags:
        try:  # validated together with what the environment set (--deployer oakestra needs a URL from either)
            settings = Settings(**{**settings.model_dump(exclude_unset=True), **flags})
        except ValidationError as exc:
            Console(stderr=True).print(f"[red]bad setting:[/] {describe(exc)}")
            raise typer.Exit(78) from None
    adapter = None
    with _errors():
        address = settings.broker()
        running = embedded_or_external(settings.broker_url, address, settings.data_dir / "broker")
        chosen = store or str(settings.store_path)
        db = open_store(chosen) if chosen == "memory://" else SQLiteStore(chosen, settings.sqlite_synchronous)
        service = Manager(settings, db, running.address)
        service.start()
        if settings.deployer == "oakestra":
            # The Oakestra adapter stands in for agents (one per Oakestra cluster) on the same broker.
            from flops.oakestra.adapter import from_settings

            adapter = from_settings(settings, running.address).start()
    where = f", actors on Oakestra at {settings.oakestra_url}" if adapter else ""
    Console(stderr=True).print(f"manager running on {running.address.url}, store {chosen}{where}")

    def stop() -> None:
        if adapter is not None:
            adapter.stop()
        service.stop()
        running.stop()

    _wait_for_signal(service.wait, stop)


@app.command()
def agent(
    ctx: typer.Context,
    agent_id: Annotated[str, typer.Option("--id", help="Unique id of this node's agent")],
    data_dir: Annotated[Path, typer.Option(help="This agent's directory (data/, work/, builds/, state/)")],
    roles: Annotated[
        str, typer.Option(help="Comma-separated: learner,builder,aggregator,serve")
    ] = "learner,builder,aggregator,serve",
    cluster: Annotated[str | None, typer.Option(help="Cluster label (hierarchical mode)")] = None,
    host: Annotated[str, typer.Option(help="Address other nodes reach this node at")] = "127.0.0.1",
    bind_host: Annotated[
        str, typer.Option(help="Address this node's aggregator and model servers listen on")
    ] = "127.0.0.1",
    data_port: Annotated[int, typer.Option(help="Arrow Flight data server port (0: any free port)")] = 0,
    data_bind_host: Annotated[
        str, typer.Option(help="Address the data server listens on; open it only with TLS (see deploy/README.md)")
    ] = "127.0.0.1",
    data_max_upload_mb: Annotated[
        int | None, typer.Option(min=1, help="Largest upload the data server accepts [env FLOPS_DATA_MAX_UPLOAD_MB]")
    ] = None,
) -> None:
    """Run a node agent: announces the node, serves its data, runs learners/aggregators/builds for projects."""
    from flops.agent import ROLES, Agent, AgentConfig
    from flops.containers import PodmanSettings, cert_dir

    chosen = tuple(r.strip() for r in roles.split(",") if r.strip())
    unknown = sorted(set(chosen) - set(ROLES))
    if unknown:
        Console(stderr=True).print(f"[red]unknown roles:[/] {', '.join(unknown)} (choose from {', '.join(ROLES)})")
        raise typer.Exit(2)
    import importlib.util

    missing = [m for m in ("pyarrow", "uv") if importlib.util.find_spec(m) is None]
    if missing:
        Console(stderr=True).print(f"[red]the agent needs {', '.join(missing)}:[/] pip install 'flops-mqtt\\[agent]'")
        raise typer.Exit(78)
    settings = _settings(ctx)
    config = AgentConfig(
        agent_id,
        data_dir,
        chosen,
        cluster,
        host,
        bind_host,
        data_port,
        data_bind_host=data_bind_host,
        data_max_upload_mb=data_max_upload_mb or settings.data_max_upload_mb,
        tls_cert_file=settings.tls_cert_file,
        tls_key_file=settings.tls_key_file,
        tls_ca_file=settings.tls_ca_file,
        registry=settings.registry,
        registry_tls=settings.registry_tls,
        base_image=settings.base_image,
        podman=PodmanSettings(
            root=settings.container_storage,
            storage_driver=settings.container_storage_driver,
            registry_tls=settings.registry_tls,
            registry_ca_dir=cert_dir(settings.tls_ca_file, data_dir) if settings.registry_tls else None,
        ),
    )
    with _errors():
        running = Agent(config, settings.broker(), **settings.broker_tls_files()).start()
    Console(stderr=True).print(f"agent {agent_id} running (roles {','.join(chosen)})")
    _wait_for_signal(running.wait, running.stop)


@app.command()
def demo(
    ctx: typer.Context,
    work_dir: Annotated[
        Path | None, typer.Option(help="Where the demo keeps its files (default DATA_DIR/demo)")
    ] = None,
    agents: Annotated[int, typer.Option(min=2, max=8, help="How many agents (learners) to start")] = 3,
    timeout: Annotated[
        float | None, typer.Option(help="Give up after this many seconds [default: 600, with --images 1800]")
    ] = None,
    images: Annotated[
        bool,
        typer.Option("--images", help="Artifacts as container images: registry, buildah builds, podman containers"),
    ] = False,
    web: Annotated[bool, typer.Option("--ui", help="Serve the web view while the demo runs; prints its URLs")] = False,
    ui_port: Annotated[int, typer.Option(help="Port of the web view (--ui)")] = 8770,
    hierarchical: Annotated[
        bool, typer.Option(help="Clustered hierarchical FL: a root agent and two clusters of two learner agents")
    ] = False,
    oakestra: Annotated[
        bool,
        typer.Option(
            help="Build, learners and aggregators as services of a fake Oakestra (podman; implies --images); "
            "with --hierarchical on two fake clusters"
        ),
    ] = False,
) -> None:
    """The base case on one machine: broker, manager, agents, mock data, a project, an inference server."""
    from flops.demo import print_result, run_demo
    from flops.demo_hierarchical import run_hierarchical_demo

    settings = _settings(ctx)
    # The demo's own screen is the progress view; the in-process manager only speaks up for problems.
    if settings.log_level == "info":
        logs.configure(settings.log_format, "warning")
    console = Console()
    if oakestra and web:
        # Not silently ignored: the Oakestra demo runs without the web view.
        Console(stderr=True).print("[red]--oakestra runs without the web view: drop --ui[/]")
        raise typer.Exit(2)
    with _errors():
        if oakestra:
            from flops.demo_oakestra import run_oakestra_demo

            result = run_oakestra_demo(
                settings,
                work_dir or settings.data_dir / ("demo-oakestra-hierarchical" if hierarchical else "demo-oakestra"),
                console,
                agents=agents,
                hierarchical=hierarchical,
                timeout=timeout if timeout is not None else 1800.0,
            )
        elif hierarchical:
            work = work_dir or settings.data_dir / "demo-hierarchical"
            result = run_hierarchical_demo(
                settings, work, console, timeout=max(timeout or 900.0, 1800.0 if images else 900.0), images=images
            )
        else:
            result = run_demo(
                settings,
                work_dir or settings.data_dir / "demo",
                console,
                agents=agents,
                timeout=timeout if timeout is not None else (1800.0 if images else 600.0),
                images=images,
                ui_port=ui_port if web else None,
            )
    raise typer.Exit(print_result(result, console))


@app.command()
def tracking(
    ctx: typer.Context,
    port: Annotated[int, typer.Option(help="Port to listen on (loopback)")] = 5005,
) -> None:
    """Start an MLflow tracking server (SQLite store and artifacts under DATA_DIR/tracking); needs the extra.

    Point the manager at it with FLOPS_TRACKING_URI (printed here)."""
    from flops.tracking.server import start_tracking

    settings = _settings(ctx)
    with _errors():
        running = start_tracking(settings.data_dir / "tracking", port=port)
    _wait_for_signal(
        running.wait, running.stop, ready=f"MLflow tracking on {running.url}: FLOPS_TRACKING_URI={running.url}"
    )


@app.command()
def ui(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on")] = 8770,
) -> None:
    """Serve the read-only web view of every project (an MQTT subscriber; login per FLOPS_UI_LOGIN)."""
    from flops.ui.serve import build

    with _errors():
        running = build(_settings(ctx), host, port)
    Console(stderr=True).print(f"web view on {running.url} (Ctrl-C stops it)")
    running.server.run()


@app.command()
def api(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (the oak CLI calls 5072)")] = 5072,
) -> None:
    """Serve the HTTP API the oak CLI speaks (oak addon flops project|mock-data|tracking|reset-database),
    as each customer of FLOPS_API_TOKENS_FILE on the broker."""
    from flops.api.serve import build

    with _errors():
        running = build(_settings(ctx), host, port)
    Console(stderr=True).print(f"FLOps API on {running.url} (Ctrl-C stops it)")
    running.server.run()


# --- projects --------------------------------------------------------------------------------------


@project_app.command("submit")
def project_submit(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="Project SLA (JSON), e.g. examples/projects/digits.json")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the reply as JSON")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the manager's reply")] = 15.0,
) -> None:
    """Submit a project request; prints the new project id (or the field errors, exit 1)."""
    settings = _settings(ctx)
    out = Console()
    try:
        data = file.read_bytes()
        # Measured before parsing: a deeply nested file would exhaust json's recursion.
        deep = too_deep(data)
        raw = None if deep else json.loads(data)
    except (OSError, ValueError) as exc:
        Console(stderr=True).print(f"[red]cannot read {file}:[/] {exc}")
        raise typer.Exit(1) from None
    if deep is not None:
        _print_errors([(deep.field, deep.message)], as_json)
        raise typer.Exit(1)
    sla_data = raw.get("sla", raw) if isinstance(raw, dict) else raw
    try:
        sla = ProjectSLA.model_validate(sla_data)
    except ValidationError as exc:
        _print_errors([(".".join(str(p) for p in e["loc"]), e["msg"]) for e in exc.errors()], as_json)
        raise typer.Exit(1) from None
    request = ProjectRequest(request_id=new_id("r"), sla=sla)
    size = len(request.to_bytes())
    if size > settings.max_payload_bytes:
        # The manager would refuse it too; say so without a round trip.
        _print_errors([("payload", f"request of {size} bytes exceeds {settings.max_payload_bytes}")], as_json)
        raise typer.Exit(1)
    with _errors(), _client(settings) as client:
        reply = client.send(request, timeout=timeout)
    if reply.errors:
        _print_errors([(e.field, e.message) for e in reply.errors], as_json)
        raise typer.Exit(1)
    if as_json:
        out.print_json(reply.model_dump_json(exclude_none=True))
    else:
        out.print(reply.project_id)


@project_app.command("status")
def project_status(
    ctx: typer.Context,
    project_id: str,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the retained state")] = 5.0,
) -> None:
    """Show a project's current stage, outcome and progress."""
    with _errors(), _client(_settings(ctx)) as client:
        state = client.state(project_id, timeout=timeout)
    if as_json:
        Console().print_json(state.model_dump_json())
        return
    _print_state(Console(), state)


@project_app.command("list")
def project_list(ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List every project the broker holds a state for."""
    with _errors(), _client(_settings(ctx)) as client:
        states = client.states()
    if as_json:
        Console().print_json(json.dumps([json.loads(s.model_dump_json()) for s in states]))
        return
    table = Table("project", "stage", "outcome", "round", "reason")
    for s in states:
        rounds = f"{s.progress.round}/{s.progress.rounds}" if s.progress.rounds else ""
        table.add_row(s.project_id, s.stage.value, s.outcome.value if s.outcome else "", rounds, s.reason or "")
    Console().print(table)


@project_app.command("watch")
def project_watch(
    ctx: typer.Context,
    project_id: str,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line")] = False,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds")] = 3600.0,
) -> None:
    """Follow a project live until it is finished; exit 0 completed, 1 failed, 2 cancelled."""
    out = Console()
    last: ProjectState | None = None
    with _errors(), _client(_settings(ctx)) as client:
        for item in client.follow(project_id, timeout=timeout):
            if as_json:
                kind = "event" if isinstance(item, ProjectEvent) else "state"
                print(json.dumps({"type": kind, **json.loads(item.model_dump_json())}), flush=True)
            elif isinstance(item, ProjectEvent):
                style = {"rejected": "red", "warning": "yellow", "stage.changed": "bold"}.get(item.kind)
                # Messages carry user and worker text (tracebacks, paths): never rich markup.
                out.print(f"{item.stage or '':<13} {item.kind:<16} {item.message}", style=style, markup=False)
            if isinstance(item, ProjectState):
                last = item
    if last is None or last.stage is not Stage.FINISHED:
        raise typer.Exit(1)
    if not as_json:
        _print_state(out, last)
    raise typer.Exit(EXIT_BY_OUTCOME[last.outcome or Outcome.FAILED])


@project_app.command("cancel")
def project_cancel(
    ctx: typer.Context,
    project_id: str,
    reason: Annotated[str, typer.Option(help="Why (shown to everyone watching)")] = "cancelled by user",
) -> None:
    """Cancel a project in any stage; whatever it runs is stopped. On a completed project, stop its inference
    server."""
    with _errors(), _client(_settings(ctx)) as client:
        reply = client.cancel(project_id, reason)
    if reply.errors:
        _print_errors([(e.field, e.message) for e in reply.errors], False)
        raise typer.Exit(1)
    Console().print(f"cancel accepted for {project_id}")


@project_app.command("prune")
def project_prune(
    ctx: typer.Context,
    older_than: Annotated[
        float | None,
        typer.Option(min=0, metavar="DAYS", help="Finished more than DAYS ago [default: FLOPS_RETENTION_DAYS]"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Forget finished projects (and cached artifacts unused as long): delete them from the manager's store
    and clear their retained states on the broker. Running projects, and served models, are kept."""
    import time

    from flops.retention import DAY_S, prune
    from flops.store_sqlite import SQLiteStore

    settings = _settings(ctx)
    path = settings.store_path
    if not path.exists():
        Console(stderr=True).print(f"[red]no manager store at {path}[/] (--data-dir or FLOPS_DATA_DIR)", markup=False)
        raise typer.Exit(1)
    days = settings.retention_days if older_than is None else older_than
    before = time.time() - days * DAY_S
    projects: list[str] = []
    artifacts: list[str] = []
    limit = 1000
    # Connected first: when the broker is out of reach nothing is pruned.
    with _errors(), _client(settings) as client:
        store = SQLiteStore(path, settings.sqlite_synchronous)
        try:
            while True:
                # Committed with the outbox items that clear the retained states: if a publish fails, the
                # manager publishes what is left at its next start.
                pruned = prune(store, before, limit=limit)
                for item in pruned.outbox:
                    client.bus.publish_wait(item.topic, item.payload, retain=item.retain)
                store.sent(pruned.outbox)
                projects += pruned.projects
                artifacts += pruned.artifacts
                if len(pruned.projects) < limit and len(pruned.artifacts) < limit:
                    break
        finally:
            store.close()
    if as_json:
        print(json.dumps({"older_than_days": days, "projects": projects, "artifacts": artifacts}))
        return
    out = Console()
    out.print(f"pruned {len(projects)} projects and {len(artifacts)} cached artifacts older than {days:g} days")
    for project_id in projects:
        out.print(f"  {project_id}", markup=False)


@app.command()
def diagram() -> None:
    """Print the project stage diagram (Mermaid), rendered from the machine's stage table."""
    from flops.lifecycle import mermaid

    print(mermaid())


# --- agents and data -------------------------------------------------------------------------------


@app.command("agents")
def agents_list(ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List the agents the broker knows (retained status): roles, data tags, online or not."""
    with _errors(), _client(_settings(ctx)) as client:
        found = client.agents()
    if as_json:
        Console().print_json(json.dumps([json.loads(a.model_dump_json()) for a in found]))
        return
    table = Table("agent", "online", "roles", "data tags (rows)", "cluster", "data server")
    for a in found:
        tags = ", ".join(f"{t} ({n})" for t, n in sorted(a.data_tags.items()))
        table.add_row(
            a.agent_id, "yes" if a.online else "no", ",".join(a.roles), tags, a.cluster or "", a.data_server or ""
        )
    Console().print(table)


def _data_servers(ctx: typer.Context, to: list[str] | None) -> dict[str, str]:
    with _errors(), _client(_settings(ctx)) as client:
        found = {a.agent_id: a for a in client.agents() if a.online and a.data_server}
    if to:
        missing = sorted(set(to) - set(found))
        if missing:
            Console(stderr=True).print(f"[red]not online or without a data server:[/] {', '.join(missing)}")
            raise typer.Exit(1)
        found = {k: found[k] for k in to}
    if not found:
        Console(stderr=True).print("[red]no online agent serves data[/] (start one with `flops agent`)")
        raise typer.Exit(1)
    return {k: v.data_server for k, v in sorted(found.items()) if v.data_server}


TokenOption = Annotated[
    str | None, typer.Option("--token", help="The target nodes' data admin token (default: read from --agent-dir)")
]
AgentDirOption = Annotated[
    list[Path] | None,
    typer.Option(
        "--agent-dir",
        help="An agent's directory (its --data-dir), to read its data admin token from (repeat); "
        "default: FLOPS_DATA_DIR and its subdirectories",
    ),
]


def _data_tokens(ctx: typer.Context, agents: list[str], token: str | None, dirs: list[Path] | None) -> dict[str, str]:
    """Admin tokens of `agents`' data servers: `--token` for all, else each agent's `state/data-admin.token`."""
    from flops.data.server import ADMIN_TOKEN_FILE

    if token:
        return dict.fromkeys(agents, token)
    home = _settings(ctx).data_dir
    candidates = dirs or [home, *sorted(p for p in home.glob("*") if p.is_dir())]
    found: dict[str, str] = {}
    for directory in candidates:
        state = directory / "state"
        try:
            agent_id = str(json.loads((state / "data-server.json").read_text())["agent_id"])
            found[agent_id] = (state / ADMIN_TOKEN_FILE).read_text().strip()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if dirs:  # named explicitly: say why it does not help
                Console(stderr=True).print(f"[red]no agent data token in {directory}:[/] {exc}", markup=False)
                raise typer.Exit(1) from None
    return {a: found[a] for a in agents if a in found}


@data_app.command("mock")
def data_mock(
    ctx: typer.Context,
    dataset: Annotated[
        str, typer.Option(help="Bundled name (digits) or a local .parquet/.csv/.npz/.npy file")
    ] = "digits",
    partitions: Annotated[int | None, typer.Option(help="How many IID partitions (default: one per target)")] = None,
    tag: Annotated[str, typer.Option(help="Data tag the partitions are stored under")] = "digits",
    to: Annotated[
        list[str] | None, typer.Option("--to", help="Target agent (repeat); default every online agent")
    ] = None,
    seed: Annotated[int, typer.Option(help="Shuffle seed")] = 0,
    sla: Annotated[
        Path | None, typer.Option(help="An original FLOps mock-data SLA (mock_data_configuration) instead of flags")
    ] = None,
    token: TokenOption = None,
    agent_dir: AgentDirOption = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Split a dataset into IID partitions and push one to each target agent's data server (with each node's
    data admin token)."""
    from flops.data.client import DataError
    from flops.data.ops import mock

    if sla is not None:
        dataset, partitions, tag = _mock_sla(sla)
    servers = _data_servers(ctx, to)
    if sla is not None and not to and partitions:
        # Like the original's mock data provider: one partition per learner node, as many as it asks for.
        servers = dict(list(servers.items())[:partitions])
    count = partitions or len(servers)
    if count != len(servers):
        Console(stderr=True).print(f"[red]--partitions {count} but {len(servers)} target agents[/]")
        raise typer.Exit(2)
    tokens = _data_tokens(ctx, list(servers), token, agent_dir)
    missing = sorted(set(servers) - set(tokens))
    if missing:
        Console(stderr=True).print(
            f"[red]no data admin token for {', '.join(missing)}:[/] pass --token, or --agent-dir with their directories"
        )
        raise typer.Exit(1)
    try:
        pushed = mock(
            dataset,
            count,
            tag,
            list(servers.values()),
            seed,
            tokens=[tokens[a] for a in servers],
            ca_file=_settings(ctx).tls_ca_file,
        )
    except (ValueError, OSError, DataError) as exc:
        Console(stderr=True).print(f"[red]cannot push {dataset}:[/] {exc}")
        raise typer.Exit(1) from None
    by_location = {v: k for k, v in servers.items()}
    rows = [{"agent_id": by_location.get(p["location"]), **p} for p in pushed]
    if as_json:
        print(json.dumps(rows))
        return
    for row in rows:
        Console().print(f"{row['agent_id']}: {row['rows']} rows tagged {row['tag']} ({row['file']})")


def _mock_sla(path: Path) -> tuple[str, int | None, str]:
    """(dataset, partitions, tag) from an original FLOps mock-data SLA file."""
    try:
        config = json.loads(path.read_text())["mock_data_configuration"]
        dataset = str(config.get("dataset_name", "mnist"))
        partitions = int(config.get("number_of_partitions", 1))
        tag = str(config.get("data_tag") or dataset)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        Console(stderr=True).print(f"[red]not a mock-data SLA ({path}):[/] {exc!r}")
        raise typer.Exit(2) from None
    return dataset, partitions, tag


@data_app.command("ls")
def data_ls(
    ctx: typer.Context,
    token: TokenOption = None,
    agent_dir: AgentDirOption = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Which agent holds which data tags, with row counts (asked from each agent's data server)."""
    from flops.data.ops import inventory

    servers = _data_servers(ctx, None)
    tokens = _data_tokens(ctx, list(servers), token, agent_dir)
    rows = inventory(servers, tokens=tokens, ca_file=_settings(ctx).tls_ca_file)
    if as_json:
        print(json.dumps(rows))
        return
    table = Table("agent", "tag", "rows", "files", "error")
    for r in rows:
        table.add_row(r["agent_id"], r["tag"] or "", str(r["rows"] or ""), str(r["files"] or ""), r["error"] or "")
    Console().print(table)


# --- setup -----------------------------------------------------------------------------------------


@setup_app.command("production")
def setup_production(
    directory: Annotated[Path, typer.Option("--dir", help="Where the files go (created)")],
    agents: Annotated[str, typer.Option(help="Comma-separated agent ids (MQTT usernames), e.g. node-1,node-2")] = "",
    customers: Annotated[str, typer.Option(help="Comma-separated customers, e.g. alice,bob")] = "",
    operators: Annotated[str, typer.Option(help="Comma-separated operators (read everything, cancel)")] = "",
    host: Annotated[
        str | None, typer.Option(help="Broker host name or IP: its certificate's SAN and the URL [127.0.0.1]")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Broker TLS port [8883]")] = None,
    agent_host: Annotated[
        list[str] | None,
        typer.Option(metavar="NAME=ADDR", help="Address an agent's servers are reached at (its node certificate)"),
    ] = None,
    agent_roles: Annotated[
        list[str] | None, typer.Option(metavar="NAME=ROLES", help="An agent's roles, e.g. node-1=learner,serve")
    ] = None,
    add_agent: Annotated[list[str] | None, typer.Option(metavar="NAME", help="Add an agent to DIR's setup")] = None,
    add_customer: Annotated[list[str] | None, typer.Option(metavar="NAME", help="Add a customer")] = None,
    add_operator: Annotated[list[str] | None, typer.Option(metavar="NAME", help="Add an operator")] = None,
) -> None:
    """Write a CA, the broker's certificate, a TLS-only Mosquitto config with passwords and ACL, agents.json
    and one env file per identity (env/<name>.env); with --add-*, extend an existing DIR (the CA and existing
    passwords stay)."""
    from flops import setup

    adding = bool(add_agent or add_customer or add_operator)
    fixed = {"agents": agents, "customers": customers, "operators": operators, "host": host, "port": port}
    errors = [(flag, "fixed by the existing setup; use --add-*") for flag, value in fixed.items() if adding and value]
    specs, bad = setup.agent_specs(
        list(add_agent or []) if adding else _names(agents), agent_host or [], agent_roles or []
    )
    errors += bad
    try:
        if errors:
            raise setup.SetupRefused(errors)
        if adding:
            files = setup.extend(directory, agents=specs, customers=add_customer or [], operators=add_operator or [])
        else:
            layout = setup.Layout(
                host or setup.DEFAULT_HOST,
                port or setup.DEFAULT_PORT,
                specs,
                tuple(_names(customers)),
                tuple(_names(operators)),
            )
            files = setup.production(directory, layout)
    except setup.SetupRefused as exc:
        err = Console(stderr=True)
        err.print("[red]setup refused[/] (nothing written):")
        for field, message in exc.errors:
            err.print(f"  {field}: {message}", markup=False)
        raise typer.Exit(2) from None
    with _errors():
        setup.write(directory, files)
    out = Console()
    out.print(f"wrote {len(files)} files to {directory}", markup=False, soft_wrap=True)
    for rel in sorted(f for f in files if f.startswith("env/")):
        out.print(f"  {directory / rel}", markup=False, soft_wrap=True)
    hint = (
        "reload the broker (kill -HUP)" if adding else f"start the broker: mosquitto -c {directory / 'mosquitto.conf'}"
    )
    out.print(f"next: {hint}; see deploy/README.md", markup=False, soft_wrap=True)


def _names(value: str) -> list[str]:
    return [n.strip() for n in value.split(",") if n.strip()]


# --- helpers ---------------------------------------------------------------------------------------


def _print_state(out: Console, s: ProjectState) -> None:
    out.print(f"[bold]{s.project_id}[/]  stage [cyan]{s.stage.value}[/]", end="")
    if s.outcome:
        color = {"completed": "green", "failed": "red", "cancelled": "yellow"}[s.outcome.value]
        out.print(f"  outcome [{color}]{s.outcome.value}[/]", end="")
    out.print()
    if s.reason:
        out.print(f"  reason: {s.reason}", markup=False)
    if s.progress.cycles:
        p = s.progress
        out.print(f"  cycle {p.cycle}/{p.cycles}  loss {p.loss}  accuracy {p.accuracy}")
        for name, c in sorted(p.clusters.items()):
            out.print(
                f"    cluster {name}: cycle {c.cycle} round {c.round}/{c.rounds}  loss {c.loss}  accuracy {c.accuracy}",
                markup=False,
            )
    elif s.progress.rounds:
        out.print(
            f"  round {s.progress.round}/{s.progress.rounds}  loss {s.progress.loss}  accuracy {s.progress.accuracy}"
        )
    if s.tracking:
        t = s.tracking
        out.print(f"  tracking: {t.get('experiment', '')} at {t.get('url')}", markup=False)
        if t.get("run_ids"):
            runs = ", ".join(f"round {k}: {v}" for k, v in sorted(t["run_ids"].items(), key=lambda kv: int(kv[0])))
            out.print(f"  MLflow runs: {runs}", markup=False)
        if t.get("model_uri"):
            version = (
                f" ({t.get('registered_model')} version {t.get('model_version')})" if t.get("model_version") else ""
            )
            out.print(f"  best model: {t['model_uri']}{version}  {t.get('run_url') or ''}", markup=False)
        for warning in t.get("warnings", []):
            out.print(f"  tracking warning: {warning}", markup=False)
    if s.model_url:
        out.print(f"  model served at {s.model_url}", markup=False)
        if s.model_token:
            out.print(f"  model token (Authorization: Bearer …) {s.model_token}", markup=False)


def _print_errors(errors: list[tuple[str, str]], as_json: bool) -> None:
    if as_json:
        print(json.dumps({"errors": [{"field": f, "message": m} for f, m in errors]}))
        return
    err = Console(stderr=True)
    err.print("[red]request rejected:[/]")
    for field, message in errors:
        err.print(f"  {field}: {message}", markup=False)


def _client(settings: Settings) -> Client:
    """A client for the configured broker, with its CA and client certificate."""
    from flops.client import Client

    return Client(settings.broker(), **settings.broker_tls_files())


class _errors:
    """Map FLOps errors to a message and an exit code at the edge."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> bool:
        if isinstance(exc, FlopsError):
            Console(stderr=True).print(f"[red]error:[/] {exc}")
            raise typer.Exit(exc.exit_code)
        return False


def _wait_for_signal(wait: Any, stop: Any, ready: str | None = None) -> None:
    """Stop cleanly on SIGTERM/SIGINT; ``ready`` is printed once the handlers are in place (whoever waits for
    it may signal right away)."""

    def handler(signum: int, frame: object) -> None:
        stop()
        sys.exit(0)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    if ready:
        Console(stderr=True).print(ready)
    try:
        wait()
    finally:
        stop()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
