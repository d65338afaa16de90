"""Who is asking: bearer tokens mapped to customers and their broker identities (``FLOPS_API_TOKENS_FILE``).

The file is JSON, one entry per customer (the customer name is its MQTT username, as in ``flops setup
production``)::

    {"customers": {
        "alice": {"token": "…at least 16 characters…", "env_file": "env/alice.env"},
        "ops":   {"token": "…", "admin": true, "env_file": "env/ops.env", "password": "…"}}}

``env_file`` (relative to the tokens file) is the identity's env file that ``flops setup production`` wrote:
its ``FLOPS_BROKER_USERNAME``/``PASSWORD``/``CLIENT_CERT``/``CLIENT_KEY`` are what the API connects with
when it acts for that customer, so the broker's ACL decides what the customer may touch. Without it the
API's own broker settings are used (development: an anonymous broker). ``admin`` allows the
administrators' endpoints (mock data, database reset). ``password`` lets the oak CLI log in as that customer
(``POST /api/auth/login``, what it asks Oakestra's system manager for a token), answered with the token.
Tokens and passwords are compared in constant time.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flops.errors import ConfigError
from flops.settings import BrokerAddress

_BROKER_KEYS = ("FLOPS_BROKER_USERNAME", "FLOPS_BROKER_PASSWORD", "FLOPS_BROKER_CLIENT_CERT", "FLOPS_BROKER_CLIENT_KEY")


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: str = Field(min_length=16)
    admin: bool = False
    env_file: Path | None = None
    password: str | None = Field(None, min_length=1)


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")

    customers: dict[str, _Entry]


@dataclass(frozen=True)
class Principal:
    """A customer as the API acts for it: its name, whether it is an administrator, its broker identity."""

    customer: str
    admin: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    client_cert: str | None = None
    client_key: str | None = None

    def address(self, base: BrokerAddress) -> BrokerAddress:
        """The broker address with this customer's credentials (the API's own ones when it has none)."""
        if self.username is None:
            return base
        return base.model_copy(update={"username": self.username, "password": self.password})

    def tls_files(self, base: dict[str, str | None]) -> dict[str, str | None]:
        """The API's broker TLS files with this customer's client certificate, when it has one."""
        if self.client_cert is None:
            return base
        return {**base, "client_cert": self.client_cert, "client_key": self.client_key}


class Tokens:
    def __init__(self, principals: dict[str, Principal], passwords: dict[str, tuple[str, str]] | None = None) -> None:
        self._principals = principals
        self._passwords = passwords or {}  # customer -> (password, token)

    @classmethod
    def load(cls, path: Path) -> Tokens:
        try:
            parsed = _File.model_validate_json(path.read_bytes())
        except OSError as exc:
            raise ConfigError(f"tokens file {path}: {exc.strerror}") from exc
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ConfigError(f"tokens file {path}: {where}: {first['msg']}") from exc
        seen: set[str] = set()
        principals: dict[str, Principal] = {}
        passwords: dict[str, tuple[str, str]] = {}
        for name, entry in parsed.customers.items():
            if entry.token in seen:
                raise ConfigError(f"tokens file {path}: customers.{name}.token is another customer's token too")
            seen.add(entry.token)
            principals[entry.token] = _principal(name, entry, path.parent)
            if entry.password is not None:
                passwords[name] = (entry.password, entry.token)
        return cls(principals, passwords)

    def __len__(self) -> int:
        return len(self._principals)

    def find(self, token: str) -> Principal | None:
        """The principal of ``token``, or None. Every entry is compared, in constant time each."""
        found = None
        for known, principal in self._principals.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                found = principal
        return found

    def login(self, username: str, password: str) -> str | None:
        """The token of ``username`` when ``password`` is its password (entries without one cannot log in)."""
        stored, token = self._passwords.get(username, ("", ""))
        matches = hmac.compare_digest(stored.encode(), password.encode())
        return token if stored and matches else None


def _principal(name: str, entry: _Entry, base: Path) -> Principal:
    if entry.env_file is None:
        return Principal(name, entry.admin)
    path = entry.env_file if entry.env_file.is_absolute() else base / entry.env_file
    values = read_env_file(path)
    username = values.get("FLOPS_BROKER_USERNAME")
    if username != name:
        raise ConfigError(f"{path}: FLOPS_BROKER_USERNAME is {username!r}, not the customer {name!r}")
    return Principal(
        name,
        entry.admin,
        username,
        values.get("FLOPS_BROKER_PASSWORD"),
        values.get("FLOPS_BROKER_CLIENT_CERT"),
        values.get("FLOPS_BROKER_CLIENT_KEY"),
    )


def read_env_file(path: Path) -> dict[str, str]:
    """The broker settings of an env file (``KEY=VALUE`` lines, ``#`` comments), as ``flops setup`` writes it."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"env file {path}: {exc.strerror}") from exc
    values: dict[str, str] = {}
    for line in lines:
        key, sep, value = line.strip().partition("=")
        if sep and key in _BROKER_KEYS:
            values[key] = value.strip().strip("'\"")
    return values
