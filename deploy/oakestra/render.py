"""Fill deploy/oakestra/flops-control.sla.json with a deployment's values and secrets; print the SLA to deploy.

Run on the machine that ran ``flops setup production`` (standard library only):

    python3 deploy/oakestra/render.py --dir /etc/flops --image REGISTRY/flops-control:TAG \\
        --cluster cluster1 --node worker-1 --node-agent node-1 [--oakestra] > /tmp/flops-control.json

With ``--oakestra`` the manager places the FL actors as Oakestra services (``--deployer oakestra``): it also
loads ``DIR/env/oakestra.env`` (the System Manager's URL and login, written by the operator) and, when present,
``DIR/env/oakestra-dynsec.env`` (the per-project actor logins' admin, ``python -m flops.oakestra.dynsec_files``).
The broker's bundle holds the dynamic-security plugin's state whenever its ``mosquitto.conf`` loads the plugin.

Each service gets ``FLOPS_BUNDLE``: base64 of a tar.gz of only the files of DIR it needs, at their absolute paths
(the env files name absolute paths into DIR); the image's entry point unpacks it. The output holds private keys
and passwords: write it where only you can read it, deploy it, delete it (see README.md, "Secrets").
"""

from __future__ import annotations

import argparse
import base64
import io
import ipaddress
import json
import re
import sys
import tarfile
from pathlib import Path

TEMPLATE = Path(__file__).with_name("flops-control.sla.json")
PLACEHOLDER = re.compile(r"\$\{([A-Z0-9_]+)\}")


def bundle(directory: Path, names: list[str]) -> str:
    """base64 of a tar.gz of ``names`` (relative to ``directory``), stored under their absolute paths."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in names:
            path = directory / name
            if not path.is_file():
                raise SystemExit(f"render: {path} is missing (flops setup production --dir {directory} ...?)")
            info = tar.gettarinfo(str(path), arcname=str(path).lstrip("/"))
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            # Only certificates are public: keys, env files, password files, the plugin's state are not.
            info.mode = 0o644 if name.endswith(".crt") else 0o600
            with path.open("rb") as handle:
                tar.addfile(info, handle)
    return base64.b64encode(buffer.getvalue()).decode()


def api_files(directory: Path) -> list[str]:
    """The API's files: the manager's identity, the tokens file and every customer's env file and certificate."""
    tokens_file = directory / "tokens.json"
    if not tokens_file.is_file():
        raise SystemExit(f"render: write {tokens_file} first (flops api's customers, see README.md)")
    names = ["ca.crt", "env/manager.env", "certs/manager.crt", "certs/manager.key", "agents.json", "tokens.json"]
    for name, entry in json.loads(tokens_file.read_text())["customers"].items():
        env_file = entry.get("env_file")
        if env_file:
            rel = (directory / env_file).resolve().relative_to(directory)
            names += [str(rel), f"certs/{name}.crt", f"certs/{name}.key"]
    return list(dict.fromkeys(names))


def env_names(path: Path) -> dict[str, str]:
    """``NAME=value`` lines of an env file."""
    lines = path.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.lstrip().startswith("#"))


def plugin_state(directory: Path) -> list[str]:
    """The dynamic-security plugin's state file, when the broker's config loads the plugin (relative to DIR)."""
    conf = (directory / "mosquitto.conf").read_text()
    found = re.findall(r"^\s*plugin_opt_config_file\s+(\S+)", conf, re.MULTILINE)
    names = []
    for path in map(Path, found):
        if not path.is_relative_to(directory):
            raise SystemExit(f"render: the plugin's state {path} is outside {directory}: the bundle cannot carry it")
        names.append(str(path.relative_to(directory)))
    return names


def oakestra_env_files(directory: Path, plugin_loaded: bool) -> list[str]:
    """The manager's env files besides its own for ``--deployer oakestra``, checked for what the actors need
    (``plugin_loaded``: the broker's config loads the dynamic-security plugin)."""
    oakestra = directory / "env" / "oakestra.env"
    if not oakestra.is_file():
        raise SystemExit(f"render: --oakestra needs {oakestra} (FLOPS_DEPLOYER=oakestra, FLOPS_OAKESTRA_URL, ...)")
    given = env_names(oakestra)
    if given.get("FLOPS_DEPLOYER") != "oakestra" or not given.get("FLOPS_OAKESTRA_URL"):
        raise SystemExit(f"render: {oakestra} must set FLOPS_DEPLOYER=oakestra and FLOPS_OAKESTRA_URL")
    names = ["env/oakestra.env"]
    if (directory / "env" / "oakestra-dynsec.env").is_file():
        if not plugin_loaded:
            raise SystemExit(
                "render: env/oakestra-dynsec.env exists but mosquitto.conf does not load the dynamic-security "
                "plugin: add the lines `python -m flops.oakestra.dynsec_files` printed"
            )
        names.append("env/oakestra-dynsec.env")
    elif not given.get("FLOPS_OAKESTRA_ACTOR_USERNAME"):
        # The broker refuses anonymous clients: actors need a login, their project's or a shared one.
        raise SystemExit(
            "render: actors on Oakestra need broker logins: run python -m flops.oakestra.dynsec_files "
            f"{directory} (per-project logins) or set FLOPS_OAKESTRA_ACTOR_USERNAME/_PASSWORD in {oakestra}"
        )
    return names


def values(
    directory: Path, image: str, cluster: str, node: str, node_agent: str, *, oakestra: bool = False
) -> dict[str, str]:
    setup = json.loads((directory / "setup.json").read_text())
    host = setup["host"]
    try:
        broker_ip = ipaddress.IPv4Address(host)
    except ValueError:
        broker_ip = None
    if broker_ip is None or broker_ip not in ipaddress.IPv4Network("10.30.0.0/16"):
        raise SystemExit(f"render: the broker's --host {host!r} must be its Oakestra round-robin IP (10.30.x.y)")
    if node_agent not in setup["agents"]:
        raise SystemExit(f"render: --node-agent {node_agent!r} is not an agent of {directory}")
    node_cert = [f"certs/{node_agent}-node.crt", f"certs/{node_agent}-node.key"]
    state = plugin_state(directory)
    broker_files = ["mosquitto.conf", "ca.crt", "broker.crt", "broker.key", "passwd", "acl", *state]
    manager_env = ["env/manager.env", *(oakestra_env_files(directory, bool(state)) if oakestra else [])]
    return {
        "FLOPS_CONTROL_IMAGE": image,
        "FLOPS_DIR": str(directory),
        "FLOPS_BROKER_RR_IP": str(broker_ip),
        "FLOPS_OAK_CLUSTER": cluster,
        "FLOPS_OAK_NODE": node,
        "FLOPS_NODE_AGENT": node_agent,
        # The entry point loads each of these, in order (absolute paths, space-separated).
        "FLOPS_MANAGER_ENV_FILES": " ".join(str(directory / name) for name in manager_env),
        "FLOPS_BUNDLE_BROKER": bundle(directory, broker_files),
        "FLOPS_BUNDLE_MANAGER": bundle(
            directory, [*manager_env, "ca.crt", "certs/manager.crt", "certs/manager.key", "agents.json"]
        ),
        "FLOPS_BUNDLE_REGISTRY": bundle(directory, node_cert),
        "FLOPS_BUNDLE_API": bundle(directory, [*api_files(directory), *node_cert]),
    }


def render(template: str, given: dict[str, str]) -> str:
    missing = sorted({m for m in PLACEHOLDER.findall(template) if m not in given})
    if missing:
        raise SystemExit(f"render: no value for {', '.join(missing)}")
    # Values go in as JSON string contents, so a quote or backslash cannot break the document.
    return PLACEHOLDER.sub(lambda m: json.dumps(given[m[1]])[1:-1], template)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True, help="the directory of flops setup production")
    parser.add_argument("--image", required=True, help="the control-plane image, as Oakestra workers pull it")
    parser.add_argument("--cluster", required=True, help="Oakestra cluster name for every service")
    parser.add_argument("--node", required=True, help="worker hostname for the registry and the API")
    parser.add_argument("--node-agent", required=True, help="the FLOps agent of that worker (its node certificate)")
    parser.add_argument(
        "--oakestra", action="store_true", help="the manager places FL actors as Oakestra services (env/oakestra.env)"
    )
    parser.add_argument("--template", type=Path, default=TEMPLATE)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    directory = args.dir.resolve()
    given = values(directory, args.image, args.cluster, args.node, args.node_agent, oakestra=args.oakestra)
    text = render(args.template.read_text(), given)
    json.loads(text)  # still one JSON document
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
