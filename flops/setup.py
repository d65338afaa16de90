"""Production in one command: the files ``flops setup production`` writes.

A CA, the broker's certificate, one identity per MQTT username (the manager, each agent, customer and
operator) with a password, a client certificate and an env file (``env/<name>.env``; agents also get a
certificate for their own servers), Mosquitto's config (TLS listener, anonymous refused), its password file
and ACL (explicit ``user`` blocks, no patterns), the manager's ``agents.json`` and ``setup.json`` (who
exists, for ``--add-*``). Functions here compute file contents; :func:`write` puts them on disk and the
CLI only wires flags to them. Passwords are hashed by ``mosquitto_passwd`` (shipped with Mosquitto).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import sh
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from flops.agent import ROLES
from flops.errors import ConfigError

MANAGER = "manager"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8883
CA_DAYS = 3650
LEAF_DAYS = 825
SECRET = 0o600
PUBLIC = 0o644
# An MQTT username that is also one topic segment and one passwd/ACL token: no wildcards, separators,
# spaces or colons.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252}[A-Za-z0-9])?")


class SetupRefused(ConfigError):
    """Flags that cannot make a setup; ``errors`` are (field, message) pairs, nothing was written."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{f}: {m}" for f, m in errors))
        self.errors = errors


@dataclass(frozen=True)
class AgentSpec:
    roles: tuple[str, ...] = ROLES
    host: str = DEFAULT_HOST  # the address peers reach the node's own servers at (its certificate's SAN)


@dataclass(frozen=True)
class Layout:
    """Who exists: the broker's address and every identity (saved as ``setup.json``, no secrets)."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    agents: Mapping[str, AgentSpec] = field(default_factory=dict)
    customers: tuple[str, ...] = ()
    operators: tuple[str, ...] = ()

    def identities(self) -> list[str]:
        return [MANAGER, *self.agents, *self.customers, *self.operators]

    def kind(self, name: str) -> str:
        if name == MANAGER:
            return "manager"
        if name in self.agents:
            return "agent"
        return "customer" if name in self.customers else "operator"

    def to_json(self) -> str:
        agents = {n: {"roles": list(a.roles), "host": a.host} for n, a in self.agents.items()}
        data = {"host": self.host, "port": self.port, "agents": agents}
        return json.dumps({**data, "customers": list(self.customers), "operators": list(self.operators)}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> Layout:
        data = json.loads(text)
        agents = {n: AgentSpec(tuple(a["roles"]), a["host"]) for n, a in data["agents"].items()}
        return cls(data["host"], int(data["port"]), agents, tuple(data["customers"]), tuple(data["operators"]))

    def extended(self, agents: Mapping[str, AgentSpec], customers: Iterable[str], operators: Iterable[str]) -> Layout:
        return Layout(
            self.host,
            self.port,
            {**self.agents, **agents},
            (*self.customers, *customers),
            (*self.operators, *operators),
        )


@dataclass(frozen=True)
class File:
    content: bytes
    mode: int = PUBLIC


# --- checks -----------------------------------------------------------------------------------------


def name_error(name: str) -> str | None:
    """Why ``name`` cannot be an identity (MQTT username, topic segment, passwd and ACL token), or None."""
    if not _NAME.fullmatch(name):
        return f"{name!r} is not topic-safe: 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
    return None


def host_error(host: str) -> str | None:
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    return None if _HOST.fullmatch(host) else f"{host!r} is neither an IP address nor a host name"


def check(layout: Layout, *, existing: Iterable[str] = ()) -> list[tuple[str, str]]:
    """Field-level errors: unsafe or colliding names (with each other, the manager or ``existing``), unknown
    roles, bad hosts and ports."""
    errors: list[tuple[str, str]] = []
    seen = {n: "existing setup" for n in existing}
    seen[MANAGER] = "the manager"
    groups = (("agents", list(layout.agents)), ("customers", layout.customers), ("operators", layout.operators))
    for group, names in groups:
        for i, name in enumerate(names):
            where = f"{group}[{i}]"
            if (problem := name_error(name)) is not None:
                errors.append((where, problem))
            elif name in seen:
                errors.append((where, f"{name!r} collides with {seen[name]}"))
            else:
                seen[name] = f"{group}[{i}]"
    for name, spec in layout.agents.items():
        if not spec.roles:
            errors.append((f"agent_roles[{name}]", "at least one role"))
        if unknown := sorted(set(spec.roles) - set(ROLES)):
            errors.append((f"agent_roles[{name}]", f"unknown roles {unknown} (choose from {', '.join(ROLES)})"))
        if (problem := host_error(spec.host)) is not None:
            errors.append((f"agent_host[{name}]", problem))
    if (problem := host_error(layout.host)) is not None:
        errors.append(("host", problem))
    if not 0 < layout.port < 65536:
        errors.append(("port", f"{layout.port} is not a TCP port"))
    return errors


def assignments(
    option: str, values: Iterable[str], known: Iterable[str]
) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """``["node-1=10.0.0.7"]`` -> ``{"node-1": "10.0.0.7"}``, with errors for malformed or unknown names."""
    out: dict[str, str] = {}
    errors: list[tuple[str, str]] = []
    known = set(known)
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not rest:
            errors.append((option, f"{value!r}: expected NAME=VALUE"))
        elif name not in known:
            errors.append((f"{option}[{name}]", f"{name!r} is not an agent of this setup"))
        else:
            out[name] = rest
    return out, errors


def agent_specs(
    names: list[str], hosts: Iterable[str] = (), roles: Iterable[str] = ()
) -> tuple[dict[str, AgentSpec], list[tuple[str, str]]]:
    """Agents from ``--agents`` plus ``--agent-host NAME=ADDR`` and ``--agent-roles NAME=ROLE,ROLE``."""
    errors = [(f"agents[{i}]", f"{n!r} is given twice") for i, n in enumerate(names) if n in names[:i]]
    host_of, bad_hosts = assignments("agent_host", hosts, names)
    roles_of, bad_roles = assignments("agent_roles", roles, names)
    specs = {
        n: AgentSpec(
            tuple(r.strip() for r in roles_of[n].split(",") if r.strip()) if n in roles_of else ROLES,
            host_of.get(n, DEFAULT_HOST),
        )
        for n in names
    }
    return specs, errors + bad_hosts + bad_roles


# --- certificates ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Authority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return _key_pem(self.key)

    @classmethod
    def load(cls, cert_pem: bytes, key_pem: bytes) -> Authority:
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError("ca.key is not an EC key written by flops setup")
        return cls(x509.load_pem_x509_certificate(cert_pem), key)


def new_authority(common_name: str = "FLOps CA", now: datetime.datetime | None = None) -> Authority:
    now = now or datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return Authority(cert, key)


def issue(
    ca: Authority,
    common_name: str,
    *,
    hosts: Iterable[str] = (),
    server: bool = False,
    client: bool = False,
    now: datetime.datetime | None = None,
) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) for ``common_name`` signed by ``ca``; ``hosts`` become its SANs."""
    now = now or datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] * server + [ExtendedKeyUsageOID.CLIENT_AUTH] * client
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    sans = [_san(h) for h in hosts]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not cert_sign,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


# --- broker files -----------------------------------------------------------------------------------


def acl(layout: Layout) -> str:
    """Mosquitto's ACL: one ``user`` block per identity (no ``pattern`` lines, so no start-up warnings)."""
    lines = [
        "# FLOps ACL written by `flops setup production`: one block per MQTT username.",
        "",
        f"user {MANAGER}",
        "topic read flops/v1/customers/+/requests",
        "topic read flops/v1/customers/+/projects/+/cancel",
        "topic write flops/v1/customers/+/requests/+/reply",
        "topic write flops/v1/customers/+/projects/+/state",
        "topic write flops/v1/customers/+/projects/+/events",
        "topic read flops/v1/agents/+/status",
        "topic read flops/v1/agents/+/reports",
        "topic read flops/v1/agents/+/receipts",
        "topic write flops/v1/agents/+/commands",
        "topic write flops/v1/agents/+/acks",
        "topic readwrite flops/v1/manager/status",
        "topic readwrite flops/v1/errors",
        f"topic readwrite flops/v1/clients/{MANAGER}/#",
    ]
    for a in layout.agents:
        lines += [
            "",
            f"user {a}",
            f"topic readwrite flops/v1/agents/{a}/status",
            f"topic read flops/v1/agents/{a}/commands",
            f"topic write flops/v1/agents/{a}/reports",
            f"topic write flops/v1/agents/{a}/receipts",
            f"topic read flops/v1/agents/{a}/acks",
            f"topic readwrite flops/v1/clients/{a}/#",
        ]
    for c in layout.customers:
        lines += [
            "",
            f"user {c}",
            f"topic write flops/v1/customers/{c}/requests",
            f"topic write flops/v1/customers/{c}/projects/+/cancel",
            f"topic read flops/v1/customers/{c}/requests/+/reply",
            f"topic read flops/v1/customers/{c}/projects/#",
            f"topic readwrite flops/v1/clients/{c}/#",
        ]
    for o in layout.operators:
        lines += [
            "",
            f"user {o}",
            "topic read flops/v1/#",
            "topic write flops/v1/customers/+/projects/+/cancel",
            f"topic readwrite flops/v1/clients/{o}/#",
        ]
    return "\n".join(lines) + "\n"


def mosquitto_conf(directory: Path, port: int) -> str:
    """A TLS-only broker: passwords are the credential; client certificates are accepted, not required."""
    d = directory.resolve()
    return f"""# FLOps broker written by `flops setup production`: mosquitto -c {d / "mosquitto.conf"}
# Mosquitto started as root drops to the `mosquitto` user before reading these files: chown them to it.
per_listener_settings false
allow_anonymous false
password_file {d / "passwd"}
acl_file {d / "acl"}

listener {port}
protocol mqtt
cafile {d / "ca.crt"}
certfile {d / "broker.crt"}
keyfile {d / "broker.key"}
require_certificate false
tls_version tlsv1.2

set_tcp_nodelay true
max_inflight_messages 0
max_queued_messages 100000
max_packet_size 1048576

# Persistent sessions keep the manager's QoS 1 messages while it is down.
persistence true
persistence_location {d / "broker-data"}/
autosave_interval 30
persistent_client_expiration 7d

log_dest stderr
log_type error
log_type warning
log_type notice
connection_messages true
"""


def agents_json(layout: Layout) -> str:
    """The manager's provisioning file (``FLOPS_AGENTS_FILE``): which agent ids exist with which roles."""
    return json.dumps({"agents": {n: {"roles": list(a.roles)} for n, a in layout.agents.items()}}, indent=2) + "\n"


def env_file(directory: Path, layout: Layout, name: str, password: str) -> str:
    """One identity's ``FLOPS_*`` settings (absolute paths into ``directory``)."""
    d = directory.resolve()
    kind = layout.kind(name)
    lines = [
        f"# FLOps {kind} {name!r}, written by `flops setup production`. Secret: keep it mode 600.",
        "# Load with `set -a; . THIS_FILE; set +a` or systemd's EnvironmentFile=.",
        f"FLOPS_BROKER_URL=mqtts://{_url_host(layout.host)}:{layout.port}",
        f"FLOPS_BROKER_USERNAME={name}",
        f"FLOPS_BROKER_PASSWORD={password}",
        f"FLOPS_BROKER_CA_FILE={d / 'ca.crt'}",
        f"FLOPS_BROKER_CLIENT_CERT={d / 'certs' / f'{name}.crt'}",
        f"FLOPS_BROKER_CLIENT_KEY={d / 'certs' / f'{name}.key'}",
        "# The CA the nodes' own servers (data server, Flower SuperLink) are checked against.",
        f"FLOPS_TLS_CA_FILE={d / 'ca.crt'}",
    ]
    if kind == "agent":
        spec = layout.agents[name]
        lines += [
            "# This node's certificate for its own servers (data server, Flower SuperLink, model server).",
            f"FLOPS_TLS_CERT_FILE={d / 'certs' / f'{name}-node.crt'}",
            f"FLOPS_TLS_KEY_FILE={d / 'certs' / f'{name}-node.key'}",
            f"# flops agent --id {name} --host {spec.host} --roles {','.join(spec.roles)}"
            f" --data-dir /var/lib/flops/{name}",
        ]
    if kind == "manager":
        lines += [f"FLOPS_AGENTS_FILE={d / 'agents.json'}", "# FLOPS_DATA_DIR=/var/lib/flops"]
    return "\n".join(lines) + "\n"


def _url_host(host: str) -> str:
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host


def hash_passwords(existing: str, passwords: Mapping[str, str]) -> str:
    """Mosquitto's password file: ``existing`` lines kept, ``passwords`` added (hashed by mosquitto_passwd)."""
    binary = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    if not Path(binary).exists():
        raise ConfigError("mosquitto_passwd not found (install mosquitto)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "passwd"
        path.write_text(existing)
        command = sh.Command(binary)
        for user, password in passwords.items():
            flags = ["-c"] if not path.read_text().strip() else []
            try:
                command(*flags, "-b", str(path), user, password, _timeout=30)
            except sh.ErrorReturnCode as exc:
                raise ConfigError(f"mosquitto_passwd failed for {user}: {exc.stderr.decode(errors='replace')}") from exc
        return path.read_text()


# --- plans ------------------------------------------------------------------------------------------


def identity_files(directory: Path, layout: Layout, ca: Authority, name: str, password: str) -> dict[str, File]:
    """An identity's client certificate, (for agents) node certificate, and env file."""
    cert, key = issue(ca, name, client=True)
    files = {f"certs/{name}.crt": File(cert), f"certs/{name}.key": File(key, SECRET)}
    if name in layout.agents:
        host = layout.agents[name].host
        # Peers dial the agent's host; the aggregator's own flwr CLI and Flower's processes dial loopback.
        hosts = list(dict.fromkeys([host, "127.0.0.1"]))
        cert, key = issue(ca, name, hosts=hosts, server=True, client=True)
        files |= {f"certs/{name}-node.crt": File(cert), f"certs/{name}-node.key": File(key, SECRET)}
    files[f"env/{name}.env"] = File(env_file(directory, layout, name, password).encode(), SECRET)
    return files


def shared_files(layout: Layout, passwd: str) -> dict[str, File]:
    """What changes with every identity added: password file, ACL, agents.json, setup.json."""
    return {
        "passwd": File(passwd.encode(), SECRET),
        "acl": File(acl(layout).encode()),
        "agents.json": File(agents_json(layout).encode()),
        "setup.json": File(layout.to_json().encode() + b"\n"),
    }


def production(directory: Path, layout: Layout) -> dict[str, File]:
    """Every file of a fresh setup; :class:`SetupRefused` for bad names or a directory already set up."""
    errors = check(layout)
    if (directory / "setup.json").exists():
        errors.append(("dir", f"{directory} already holds a setup: extend it with --add-agent/--add-customer"))
    if errors:
        raise SetupRefused(errors)
    ca = new_authority()
    broker_cert, broker_key = issue(ca, layout.host, hosts=[layout.host], server=True)
    files = {
        "ca.crt": File(ca.cert_pem()),
        "ca.key": File(ca.key_pem(), SECRET),
        "broker.crt": File(broker_cert),
        "broker.key": File(broker_key, SECRET),
        "mosquitto.conf": File(mosquitto_conf(directory, layout.port).encode()),
    }
    passwords = {name: secrets.token_urlsafe(24) for name in layout.identities()}
    for name, password in passwords.items():
        files |= identity_files(directory, layout, ca, name, password)
    return files | shared_files(layout, hash_passwords("", passwords))


def extend(
    directory: Path,
    *,
    agents: Mapping[str, AgentSpec] | None = None,
    customers: Iterable[str] = (),
    operators: Iterable[str] = (),
) -> dict[str, File]:
    """The files that change when identities join an existing setup: the new identities' files and the
    regenerated password file (existing hashes kept), ACL, agents.json and setup.json. The CA, the broker's
    certificate and every existing identity's password stay."""
    try:
        current = Layout.from_json((directory / "setup.json").read_text())
        ca = Authority.load((directory / "ca.crt").read_bytes(), (directory / "ca.key").read_bytes())
        existing_passwd = (directory / "passwd").read_text()
    except (OSError, ValueError, KeyError) as exc:
        raise SetupRefused([("dir", f"{directory} holds no setup to extend ({exc})")]) from None
    agents = dict(agents or {})
    added = Layout(current.host, current.port, agents, tuple(customers), tuple(operators))
    errors = check(added, existing=current.identities())
    if not added.identities()[1:]:
        errors.append(("add", "nothing to add"))
    if errors:
        raise SetupRefused(errors)
    layout = current.extended(agents, added.customers, added.operators)
    passwords = {name: secrets.token_urlsafe(24) for name in added.identities()[1:]}
    files: dict[str, File] = {}
    for name, password in passwords.items():
        files |= identity_files(directory, layout, ca, name, password)
    return files | shared_files(layout, hash_passwords(existing_passwd, passwords))


def write(directory: Path, files: Mapping[str, File]) -> None:
    """Write ``files`` under ``directory`` with their modes (each replaced atomically)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "broker-data").mkdir(exist_ok=True)
    for rel, spec in files.items():
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700 if rel.startswith("env/") else 0o755)
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, spec.mode)
        with os.fdopen(fd, "wb") as out:
            out.write(spec.content)
        os.chmod(tmp, spec.mode)
        os.replace(tmp, path)
