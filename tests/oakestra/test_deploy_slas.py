"""deploy/oakestra/: the control plane's SLA files obey SLA v2.0 (oakestra-api.md §3), render from a real
``flops setup production`` directory, deploy through the fake System Manager to RUNNING in the README's order,
carry every file their commands name, and name only commands, options and settings that exist."""

from __future__ import annotations

import base64
import importlib.util
import io
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType
from typing import Any

import click
import pytest
import typer

from flops import cli
from flops.oakestra import dynsec_files
from flops.oakestra import statuses as st
from flops.oakestra.client import SystemManager
from flops.oakestra.fake import FakeSystemManager
from flops.registry import REGISTRY_BINARY
from flops.settings import Settings
from tests.oakestra.support import FakeControl

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "oakestra"
NAME = re.compile(r"^[a-zA-Z0-9]{1,30}$")
PLACEHOLDER = re.compile(r"\$\{[A-Z0-9_]+\}")
ENTRYPOINT = "/usr/local/bin/flops-entrypoint"
INTEGERS = ("memory", "vcpus", "vgpus", "vtpus", "storage", "bandwidth_in", "bandwidth_out")
VIRTUALIZATIONS = {"container", "unikernel", "crosvm"}
CLUSTER, NODE, NODE_AGENT, BROKER_IP = "cluster1", "worker1", "node-1", "10.30.70.1"
IMAGE = "registry.example:5000/flops-control:test"
OAKESTRA_ENV = "FLOPS_DEPLOYER=oakestra\nFLOPS_OAKESTRA_URL=http://192.168.1.2:10000\nFLOPS_OAKESTRA_PASSWORD=oak-pw\n"
POLLS = 10  # the fake's "ok" script reaches RUNNING on the 3rd poll after the instance is asked for


# --- the SLA v2.0 rules ---------------------------------------------------------------------------------------


def sla_errors(doc: Any, *, rendered: bool) -> list[str]:
    """What the System Manager's schema (§3) would refuse, plus FLOps' own rules: unique service names (a
    duplicate is a silent upsert), round-robin IPs in 10.30/16 and unique, and (``rendered``) nothing left to
    fill in."""
    errors: list[str] = []

    def need(ok: bool, what: str) -> None:
        if not ok:
            errors.append(what)

    if not isinstance(doc, dict):
        return ["document: not an object"]
    need(doc.get("sla_version") == "v2.0", "sla_version: not v2.0")
    need(isinstance(doc.get("customerID"), str), "customerID: not a string")
    apps = doc.get("applications")
    if not isinstance(apps, list) or not apps:
        return [*errors, "applications: not a non-empty list"]
    for a, app in enumerate(apps):
        where = f"applications[{a}]"
        if not isinstance(app, dict):
            errors.append(f"{where}: not an object")
            continue
        need(isinstance(app.get("applicationID"), str), f"{where}.applicationID: not a string")
        for key in ("application_name", "application_namespace"):
            need(isinstance(app.get(key), str) and bool(NAME.fullmatch(app[key])), f"{where}.{key}: bad name")
        need(isinstance(app.get("application_desc", ""), str), f"{where}.application_desc: not a string")
        services = app.get("microservices")
        if not isinstance(services, list):
            errors.append(f"{where}.microservices: not a list")
            continue
        names = [s.get("microservice_name") for s in services if isinstance(s, dict)]
        need(len(names) == len(set(names)), f"{where}.microservices: duplicate names {names}")
        for m, ms in enumerate(services):
            errors += service_errors(ms, f"{where}.microservices[{m}]", rendered=rendered)
        ips = [s.get("addresses", {}).get("rr_ip") for s in services if isinstance(s, dict)]
        ips = [ip for ip in ips if ip]
        need(len(ips) == len(set(ips)), f"{where}: round-robin IPs used twice {ips}")
    if rendered:
        left = sorted(set(PLACEHOLDER.findall(json.dumps(doc))))
        need(not left, f"placeholders left: {left}")
    return errors


def service_errors(ms: Any, where: str, *, rendered: bool) -> list[str]:
    if not isinstance(ms, dict):
        return [f"{where}: not an object"]
    errors: list[str] = []

    def need(ok: bool, what: str) -> None:
        if not ok:
            errors.append(f"{where}.{what}")

    need(ms.get("microserviceID") == "", "microserviceID: must be an empty string")
    for key in ("microservice_name", "microservice_namespace"):
        need(isinstance(ms.get(key), str) and bool(NAME.fullmatch(ms[key])), f"{key}: bad name")
    need(ms.get("virtualization") in VIRTUALIZATIONS, "virtualization: unknown")
    need(isinstance(ms.get("code"), str) and bool(ms["code"]), "code: not a non-empty string")
    cmd, env = ms.get("cmd", []), ms.get("environment", [])
    need(isinstance(cmd, list) and all(isinstance(c, str) for c in cmd), "cmd: not a list of strings")
    need(
        isinstance(env, list)
        and all(isinstance(e, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", e) for e in env),
        "environment: not a list of K=V",
    )
    for key in INTEGERS:
        value = ms.get(key, 0)
        need(isinstance(value, int) and not isinstance(value, bool) and value >= 0, f"{key}: not an integer >= 0")
    sized = all(isinstance(ms.get(k), int) and ms[k] > 0 for k in ("memory", "vcpus"))
    need(sized, "memory/vcpus: the scheduler needs both")
    need(isinstance(ms.get("port", ""), str), "port: not a string")
    port = ms.get("port", "")
    need(
        not port or all(re.fullmatch(r"(\d+:)?\d+(/(tcp|udp))?", p) for p in port.split(";")),
        "port: not host:container[/proto];…",
    )
    for key in ("one_shot", "privileged"):
        need(isinstance(ms.get(key, False), bool), f"{key}: not a boolean")
    addresses = ms.get("addresses", {})
    need(isinstance(addresses, dict) and all(isinstance(v, str) for v in addresses.values()), "addresses: bad")
    rr_ip = addresses.get("rr_ip") if isinstance(addresses, dict) else None
    if rendered and rr_ip:
        try:
            inside = ipaddress.IPv4Address(rr_ip) in ipaddress.IPv4Network("10.30.0.0/16")
        except ValueError:
            inside = False
        need(inside, f"addresses.rr_ip: {rr_ip} not in 10.30.0.0/16 (the net plugin refuses it)")
    constraints = ms.get("constraints", [])
    if not isinstance(constraints, list) or not all(isinstance(c, dict) for c in constraints):
        return [*errors, f"{where}.constraints: not a list of objects"]
    for c, constraint in enumerate(constraints):
        need(isinstance(constraint.get("type"), str), f"constraints[{c}].type: missing")
        if constraint.get("type") == "direct":
            need(isinstance(constraint.get("cluster"), str), f"constraints[{c}].cluster: not a string")
            need(isinstance(constraint.get("node", ""), str), f"constraints[{c}].node: not a string")
    return errors


def sla_files() -> list[Path]:
    return sorted(DEPLOY.glob("*.json"))


def test_the_rules_refuse_what_oakestra_refuses() -> None:
    good = json.loads((DEPLOY / "flops-control.sla.json").read_text())
    assert sla_errors(good, rendered=False) == []
    bad_cases = {
        "applications[0].application_name: bad name": ("application_name", "flops-control"),
        "microserviceID: must be an empty string": ("microserviceID", "abc"),
        "memory: not an integer >= 0": ("memory", "512"),
        "one_shot: not a boolean": ("one_shot", "false"),
        "microservice_name: bad name": ("microservice_name", "a" * 31),
        "cmd: not a list of strings": ("cmd", "flops manager"),
    }
    for expected, (key, value) in bad_cases.items():
        doc = json.loads(json.dumps(good))
        app = doc["applications"][0]
        (app if key.startswith("application_") else app["microservices"][1])[key] = value
        errors = sla_errors(doc, rendered=False)
        assert any(e.endswith(expected) for e in errors), (key, errors)
    doc = json.loads(json.dumps(good))
    doc["applications"][0]["microservices"][1]["microservice_name"] = "broker"
    assert any("duplicate names" in e for e in sla_errors(doc, rendered=False))
    assert any("placeholders left" in e for e in sla_errors(good, rendered=True))


def test_every_sla_file_of_deploy_oakestra_obeys_sla_v2() -> None:
    files = sla_files()
    assert files, "no SLA file in deploy/oakestra/"
    for path in files:
        assert sla_errors(json.loads(path.read_text()), rendered=False) == [], path.name


# --- rendering from a real setup ------------------------------------------------------------------------------


def load_render() -> ModuleType:
    spec = importlib.util.spec_from_file_location("flops_oakestra_render", DEPLOY / "render.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def production_setup(directory: Path) -> Path:
    """``flops setup production`` as the README says, the broker's --host being its round-robin IP."""
    if shutil.which("mosquitto_passwd") is None and not Path("/usr/bin/mosquitto_passwd").exists():
        pytest.skip("mosquitto_passwd (Mosquitto) is needed by flops setup production")
    args = ["setup", "production", "--dir", str(directory), "--host", BROKER_IP, "--agents", "node-1,node-2"]
    args += ["--customers", "alice", "--operators", "ops", "--agent-host", f"{NODE_AGENT}=192.168.1.11"]
    done = subprocess.run(
        [sys.executable, "-m", "flops.cli", *args], capture_output=True, text=True, timeout=120, env=os.environ
    )
    assert done.returncode == 0, done.stderr
    tokens = {
        "customers": {
            "alice": {"token": "a" * 24, "password": "alice-pw", "env_file": "env/alice.env"},
            "ops": {"token": "o" * 24, "admin": True, "env_file": "env/ops.env"},
        }
    }
    (directory / "tokens.json").write_text(json.dumps(tokens))
    return directory


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return production_setup(tmp_path_factory.mktemp("oak") / "flops")


@pytest.fixture(scope="module")
def oakestra_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A setup whose manager places actors on Oakestra (README, "FL actors on Oakestra"): env/oakestra.env, and the
    dynamic-security plugin's files and config lines for per-project actor logins."""
    directory = production_setup(tmp_path_factory.mktemp("oak-deployer") / "flops")
    (directory / "env" / "oakestra.env").write_text(OAKESTRA_ENV)
    assert dynsec_files.main([str(directory)]) == 0
    plugin = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"  # the control image's (amd64)
    conf = directory / "mosquitto.conf"
    conf.write_text(conf.read_text() + dynsec_files.config_lines(directory / "dynamic-security.json", plugin))
    return directory


def render_all(directory: Path, *, oakestra: bool = False) -> list[dict[str, Any]]:
    render = load_render()
    given = render.values(directory, IMAGE, CLUSTER, NODE, NODE_AGENT, oakestra=oakestra)
    return [json.loads(render.render(path.read_text(), given)) for path in sla_files()]


@pytest.fixture(scope="module")
def rendered(setup_dir: Path) -> list[dict[str, Any]]:
    """Every SLA file rendered by render.py with the test's deployment values."""
    return render_all(setup_dir)


@pytest.fixture(params=["agents", "oakestra"])
def deployment(request: pytest.FixtureRequest) -> tuple[list[dict[str, Any]], Path]:
    """(rendered SLAs, setup directory) for a manager whose actors run on agents, and one placing them on
    Oakestra (``render.py --oakestra``)."""
    if request.param == "agents":
        return request.getfixturevalue("rendered"), request.getfixturevalue("setup_dir")
    directory = request.getfixturevalue("oakestra_dir")
    return render_all(directory, oakestra=True), directory


def services(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return list(doc["applications"][0]["microservices"])


def test_rendered_slas_obey_sla_v2_and_put_the_broker_on_its_certificate_address(
    rendered: list[dict[str, Any]], setup_dir: Path
) -> None:
    for doc in rendered:
        assert sla_errors(doc, rendered=True) == []
    broker = next(s for doc in rendered for s in services(doc) if s["microservice_name"] == "broker")
    assert broker["addresses"]["rr_ip"] == BROKER_IP
    manager_env = (setup_dir / "env" / "manager.env").read_text()
    assert f"FLOPS_BROKER_URL=mqtts://{BROKER_IP}:8883" in manager_env  # manager and api reach it there


def test_render_refuses_a_broker_host_oakestra_cannot_route(setup_dir: Path, tmp_path: Path) -> None:
    render = load_render()
    other = tmp_path / "flops"
    shutil.copytree(setup_dir, other)
    setup = json.loads((other / "setup.json").read_text())
    setup["host"] = "broker.example"
    (other / "setup.json").write_text(json.dumps(setup))
    with pytest.raises(SystemExit, match="round-robin IP"):
        render.values(other, "img", CLUSTER, NODE, NODE_AGENT)
    with pytest.raises(SystemExit, match="no value for FLOPS_X"):
        render.render('{"a": "${FLOPS_X}"}', {})


# --- deploying through the fake System Manager ----------------------------------------------------------------


def readme_deploy_order() -> list[str]:
    """The services in the order deploy/oakestra/README.md deploys them (``oak service deploy <name>``)."""
    return re.findall(r"^oak service deploy (\w+)", (DEPLOY / "README.md").read_text(), flags=re.MULTILINE)


def test_the_readme_deploys_every_service_once_broker_first_and_api_after_the_manager(
    rendered: list[dict[str, Any]],
) -> None:
    order = readme_deploy_order()
    names = [s["microservice_name"] for doc in rendered for s in services(doc)]
    assert sorted(order) == sorted(names)
    assert order[0] == "broker"
    assert order.index("manager") < order.index("api") and order.index("manager") < order.index("apilogin")


def test_each_sla_deploys_end_to_end_to_running_in_the_readme_order(
    rendered: list[dict[str, Any]], fake: FakeSystemManager, control: FakeControl, sm: SystemManager
) -> None:
    control.clusters([{"cluster_name": CLUSTER, "vcpus": 8, "memory": 16000}])
    order = readme_deploy_order()
    for doc in rendered:
        app = doc["applications"][0]
        # oak application create: the application (A1); the fake creates bundled services only through S1.
        status, apps = sm.call("POST", "/api/application/", {**doc, "applications": [{**app, "microservices": []}]})
        assert status == 200
        created = next(a for a in apps if a["application_name"] == app["application_name"])
        by_name = {s["microservice_name"]: s for s in app["microservices"]}
        ids: dict[str, str] = {}
        for name in [n for n in order if n in by_name]:
            ms = by_name[name]
            body = {**doc, "applications": [{**app, "applicationID": created["applicationID"], "microservices": [ms]}]}
            status, answer = sm.call("POST", "/api/service/", body)
            assert status == 200 and answer["failed_services"] == [], answer
            assert answer["deployed_services"] == [{"service_name": name, "status": 200}]
            ids[name] = answer["job_id"]
            sm.deploy_instance(ids[name])  # oak service deploy <name>
            seen = []
            for _ in range(POLLS):  # the fake moves one scripted step per GET: no time passes
                service = sm.service(ids[name])
                assert service is not None
                seen.append(service.status)
                if service.instances and service.instances[0].status == st.RUNNING:
                    break
            assert seen[0] == st.REQUESTED and seen[-1] == st.RUNNING, (name, seen)
            assert [i.number for i in service.instances] == [0]
            assert service.instances[0].cluster_id == fake.state.clusters[0]["_id"]
            assert (service.cmd, service.environment, service.memory) == (ms["cmd"], ms["environment"], ms["memory"])
            if "rr_ip" in ms.get("addresses", {}):
                assert service.rr_ip == ms["addresses"]["rr_ip"]
        every = sm.services(created["applicationID"])
        assert {s.name for s in every} == set(by_name)
        assert all([i.status for i in s.instances] == [st.RUNNING] for s in every)
        assert sm.delete_application(created["applicationID"])
    refused = [c for c in control.calls() if c["status"] >= 400]
    assert refused == []


def test_a_service_pinned_to_an_unknown_cluster_is_not_placed(
    rendered: list[dict[str, Any]], control: FakeControl, sm: SystemManager
) -> None:
    """The direct constraint is what places them: the same SLA without that cluster is never scheduled."""
    control.clusters([{"cluster_name": "elsewhere"}])
    doc = rendered[0]
    app = sm.create_application(doc["applications"][0]["application_name"], "control")
    ms = services(doc)[0]
    body = {**doc, "applications": [{**doc["applications"][0], "applicationID": app.id, "microservices": [ms]}]}
    status, answer = sm.call("POST", "/api/service/", body)
    assert status == 200 and answer["failed_services"] == []
    sm.deploy_instance(answer["job_id"])
    statuses = []
    for _ in range(3):
        service = sm.service(answer["job_id"])
        assert service is not None
        statuses.append(service.status)
    assert statuses[-1] == "NoActiveClusterWithCapacity" and service.instances == []


# --- every file a service names is in its bundle --------------------------------------------------------------


def bundle_files(ms: dict[str, Any]) -> dict[str, bytes]:
    value = next(e.split("=", 1)[1] for e in ms["environment"] if e.startswith("FLOPS_BUNDLE="))
    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(value)), mode="r:gz") as tar:
        out = {}
        for member in tar.getmembers():
            handle = tar.extractfile(member)
            assert handle is not None
            out["/" + member.name] = handle.read()
            assert member.mode & 0o077 == 0 or member.name.endswith(".crt")  # only certificates are public
    return out


def named_paths(text: str, directory: Path) -> set[str]:
    return {p for p in re.findall(r"(/[^\s\"'=]+)", text) if p.startswith(str(directory) + "/")}


def test_each_bundle_holds_exactly_what_its_service_reads_and_never_the_ca_key(
    deployment: tuple[list[dict[str, Any]], Path],
) -> None:
    rendered, setup_dir = deployment
    for doc in rendered:
        for ms in services(doc):
            files = bundle_files(ms)
            assert str(setup_dir / "ca.key") not in files
            wanted = named_paths(" ".join(ms["cmd"] + ms["environment"]), setup_dir)
            wanted -= {str(setup_dir / "broker-data")}  # created by the entry point
            queue = list(wanted)
            while queue:  # files named by files: env files, mosquitto.conf, the tokens file's env files
                path = queue.pop()
                assert path in files, (ms["microservice_name"], path)
                text = files[path].decode(errors="replace")
                more = named_paths(text, setup_dir) - {str(setup_dir / "broker-data") + "/"}
                if path.endswith("tokens.json"):
                    more |= {str(setup_dir / e["env_file"]) for e in json.loads(text)["customers"].values()}
                queue += sorted(more - wanted)
                wanted |= more
            assert set(files) == wanted, (ms["microservice_name"], set(files) ^ wanted)


def test_the_entry_point_unpacks_the_bundle_loads_the_env_file_and_forgets_the_bundle(
    deployment: tuple[list[dict[str, Any]], Path], tmp_path: Path
) -> None:
    rendered, setup_dir = deployment
    manager = next(s for doc in rendered for s in services(doc) if s["microservice_name"] == "manager")
    env = {"PATH": os.environ["PATH"], "FLOPS_BUNDLE_ROOT": str(tmp_path)}
    env.update(e.split("=", 1) for e in manager["environment"])
    assert manager["cmd"][0] == ENTRYPOINT
    done = subprocess.run(
        ["sh", str(DEPLOY / "entrypoint.sh"), "env"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    seen = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    assert "FLOPS_BUNDLE" not in seen
    assert seen["FLOPS_BROKER_URL"] == f"mqtts://{BROKER_IP}:8883" and seen["FLOPS_BROKER_USERNAME"] == "manager"
    key = tmp_path / str(setup_dir / "certs" / "manager.key").lstrip("/")
    assert key.read_bytes() == (setup_dir / "certs" / "manager.key").read_bytes()
    assert key.stat().st_mode & 0o077 == 0
    if (setup_dir / "env" / "oakestra.env").exists():  # its actors on Oakestra, with per-project logins
        settings = Settings(**{k.removeprefix("FLOPS_").lower(): v for k, v in seen.items() if k.startswith("FLOPS_")})
        assert (settings.deployer, settings.oakestra_url) == ("oakestra", "http://192.168.1.2:10000")
        assert settings.oakestra_dynsec_username == "flops-dynsec" and settings.oakestra_dynsec_password


def test_the_broker_of_a_manager_on_oakestra_carries_the_plugins_state(oakestra_dir: Path) -> None:
    docs = render_all(oakestra_dir, oakestra=True)
    broker = next(s for doc in docs for s in services(doc) if s["microservice_name"] == "broker")
    files = bundle_files(broker)
    state = str(oakestra_dir / "dynamic-security.json")
    assert files[state] == (oakestra_dir / "dynamic-security.json").read_bytes()
    assert b"plugin_opt_config_file " + state.encode() in files[str(oakestra_dir / "mosquitto.conf")]


def test_render_for_oakestra_refuses_a_manager_its_actors_could_not_reach_or_log_in_to(
    oakestra_dir: Path, tmp_path: Path
) -> None:
    render = load_render()
    other = production_setup(tmp_path / "flops")
    with pytest.raises(SystemExit, match=r"env/oakestra\.env"):
        render.values(other, IMAGE, CLUSTER, NODE, NODE_AGENT, oakestra=True)
    (other / "env" / "oakestra.env").write_text("FLOPS_OAKESTRA_URL=http://192.168.1.2:10000\n")
    with pytest.raises(SystemExit, match="FLOPS_DEPLOYER=oakestra"):
        render.values(other, IMAGE, CLUSTER, NODE, NODE_AGENT, oakestra=True)
    (other / "env" / "oakestra.env").write_text(OAKESTRA_ENV)
    with pytest.raises(SystemExit, match="broker logins"):
        render.values(other, IMAGE, CLUSTER, NODE, NODE_AGENT, oakestra=True)
    assert dynsec_files.main([str(other)]) == 0  # the plugin's files, but its lines not added to mosquitto.conf
    with pytest.raises(SystemExit, match="does not load the dynamic-security plugin"):
        render.values(other, IMAGE, CLUSTER, NODE, NODE_AGENT, oakestra=True)


# --- what the files name exists -------------------------------------------------------------------------------


def flops_commands() -> dict[str, click.Command]:
    """``flops`` subcommands by their full name (``manager``, ``setup production``), from the real CLI."""
    group = typer.main.get_command(cli.app)
    assert isinstance(group, click.Group)
    found: dict[str, click.Command] = {}
    for name, command in group.commands.items():
        found[name] = command
        if isinstance(command, click.Group):
            found.update({f"{name} {sub}": c for sub, c in command.commands.items()})
    return found


def options(command: click.Command) -> set[str]:
    return {opt for param in command.params for opt in getattr(param, "opts", [])}


def settings_names() -> set[str]:
    return {f"FLOPS_{name.upper()}" for name in Settings.model_fields}


def entrypoint_names() -> set[str]:
    return set(re.findall(r"\$\{(FLOPS_[A-Z_]+)", (DEPLOY / "entrypoint.sh").read_text()))


def containerfile() -> str:
    return (DEPLOY / "Containerfile").read_text()


def test_the_slas_commands_and_settings_exist() -> None:
    commands, settings, ours = flops_commands(), settings_names(), entrypoint_names()
    assert {"FLOPS_BUNDLE", "FLOPS_ENV_FILE", "FLOPS_BROKER_DATA"} <= ours
    installed = re.search(r"apt-get install[^\n]*?((?:\s+[a-z][\w.-]+)+)", containerfile())
    assert installed is not None
    packages = set(installed[1].split())
    assert re.search(rf"COPY deploy/oakestra/entrypoint\.sh {re.escape(ENTRYPOINT)}\n", containerfile())
    for path in sla_files():
        for ms in services(json.loads(path.read_text())):
            cmd, name = ms["cmd"], ms["microservice_name"]
            assert cmd[0] == ENTRYPOINT, name  # Oakestra's cmd replaces the image's ENTRYPOINT
            if cmd[1] == "flops":
                sub = cmd[2]
                assert sub in commands, (name, sub)
                given = {arg for arg in cmd[3:] if arg.startswith("--")}
                assert given <= options(commands[sub]), (name, given - options(commands[sub]))
                if sub == "registry":
                    assert REGISTRY_BINARY in packages
            else:
                assert cmd[1] in packages and cmd[1] == "mosquitto", name
            for entry in ms["environment"]:
                key = entry.split("=", 1)[0]
                assert key in settings or key in ours, (name, key)


def test_the_containerfile_copies_what_exists_and_sets_only_real_settings() -> None:
    text = containerfile()
    for line in re.findall(r"^COPY (.+)$", text, flags=re.MULTILINE):
        for source in line.split()[:-1]:
            assert (ROOT / source).exists(), source
    for key in re.findall(r"\b(FLOPS_[A-Z_]+)=", text):
        assert key in settings_names(), key
    extras = re.search(r'pip install [^\n]*"\.\[([\w,]+)\]"', text)
    assert extras is not None
    pyproject = (ROOT / "pyproject.toml").read_text()
    for extra in extras[1].split(","):
        assert re.search(rf"^{extra} = \[", pyproject, flags=re.MULTILINE), extra


def shell_lines(markdown: str) -> list[str]:
    """The lines of the fenced code blocks, continuation lines (``\\``) joined."""
    lines: list[str] = []
    for block in re.findall(r"^```\w*\n(.*?)^```", markdown, flags=re.MULTILINE | re.DOTALL):
        lines += block.replace("\\\n", " ").splitlines()
    return lines


def long_options(text: str) -> set[str]:
    return set(re.findall(r"(?<!\S)(--[a-z][\w-]*)", text.split(" #", 1)[0]))


def test_the_readmes_commands_exist() -> None:
    readme = (DEPLOY / "README.md").read_text()
    commands = flops_commands()
    render_opts = {o for action in load_render().parser()._actions for o in action.option_strings}
    ran = 0
    for line in shell_lines(readme):
        for m in re.finditer(r"(?<![\w/.-])flops ((?:[a-z][\w-]*)(?: [a-z][\w-]*)?)", line.split(" #", 1)[0]):
            words = m[1].split()
            sub = " ".join(words) if " ".join(words) in commands else words[0]
            assert sub in commands, (sub, line)
            rest = line[m.end() :]
            assert long_options(rest) <= options(commands[sub]), (sub, long_options(rest) - options(commands[sub]))
            ran += 1
        if "render.py" in line:
            assert long_options(line) <= render_opts, long_options(line) - render_opts
    assert ran, "the README runs no flops command"
    placeholders = {n for path in sla_files() for n in re.findall(r"\$\{([A-Z0-9_]+)\}", path.read_text())}
    for setting in re.findall(r"\b(FLOPS_[A-Z_]+)\b", readme):
        assert setting in settings_names() | entrypoint_names() | placeholders, setting
    for ref in re.findall(r"\]\((?!http)([^)#]+)", readme):
        assert (DEPLOY / ref).exists(), ref
