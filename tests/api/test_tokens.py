"""The tokens file: customers, their tokens and the broker identity the API takes for each (env files as
``flops setup production`` writes them); and ``flops api`` refusing to start without one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flops import setup
from flops.api.tokens import Tokens
from flops.errors import ConfigError
from flops.settings import BrokerAddress
from tests.support import cli

ALICE = "alice-token-" + "1" * 20
OPS = "ops-token-" + "2" * 20


def _setup_env(directory: Path, name: str) -> None:
    layout = setup.Layout(customers=("alice",), operators=("ops",))
    (directory / "env").mkdir(exist_ok=True)
    (directory / "env" / f"{name}.env").write_text(setup.env_file(directory, layout, name, f"{name}-password"))


def _write(path: Path, customers: dict[str, dict[str, object]]) -> Path:
    path.write_text(json.dumps({"customers": customers}))
    return path


def test_each_token_acts_with_its_customers_broker_identity(tmp_path: Path) -> None:
    _setup_env(tmp_path, "alice")
    _setup_env(tmp_path, "ops")
    tokens = Tokens.load(
        _write(
            tmp_path / "tokens.json",
            {
                "alice": {"token": ALICE, "env_file": "env/alice.env"},
                "ops": {
                    "token": OPS,
                    "admin": True,
                    "env_file": str(tmp_path / "env" / "ops.env"),
                    "password": "ops-login",
                },
                "dev": {"token": "dev-token-" + "3" * 20},
            },
        )
    )
    base = BrokerAddress(host="broker.example", port=8883, tls=True, username="api", password="api-password")
    tls = {"ca_file": "/ca.crt", "client_cert": "/api.crt", "client_key": "/api.key"}

    alice = tokens.find(ALICE)
    assert alice is not None and (alice.customer, alice.admin) == ("alice", False)
    address = alice.address(base)
    assert (address.host, address.username, address.password) == ("broker.example", "alice", "alice-password")
    assert alice.tls_files(tls) == {
        "ca_file": "/ca.crt",
        "client_cert": str(tmp_path.resolve() / "certs" / "alice.crt"),
        "client_key": str(tmp_path.resolve() / "certs" / "alice.key"),
    }
    ops = tokens.find(OPS)
    assert ops is not None and ops.admin and ops.address(base).username == "ops"
    # No env file (a development broker): the API's own broker settings.
    dev = tokens.find("dev-token-" + "3" * 20)
    assert dev is not None and dev.address(base) == base and dev.tls_files(tls) == tls
    assert tokens.find(ALICE + "x") is None and tokens.find("") is None
    assert "alice-password" not in repr(alice)
    # The oak CLI's login: only entries with a password, only with that password.
    assert tokens.login("ops", "ops-login") == OPS
    assert tokens.login("ops", "ops-login ") is None and tokens.login("alice", "") is None
    assert tokens.login("nobody", "ops-login") is None


@pytest.mark.parametrize(
    ("customers", "complaint"),
    [
        ({"alice": {"token": "short"}}, "customers.alice.token"),
        ({"alice": {"token": ALICE}, "bob": {"token": ALICE}}, "customers.bob.token is another customer's token"),
        (
            {"bob": {"token": ALICE, "env_file": "env/alice.env"}},
            "FLOPS_BROKER_USERNAME is 'alice', not the customer 'bob'",
        ),
        ({"alice": {"token": ALICE, "env_file": "env/missing.env"}}, "missing.env"),
        ({"alice": {"token": ALICE, "role": "admin"}}, "customers.alice.role"),
    ],
)
def test_a_bad_tokens_file_is_refused_naming_the_entry(
    tmp_path: Path, customers: dict[str, dict[str, object]], complaint: str
) -> None:
    _setup_env(tmp_path, "alice")
    with pytest.raises(ConfigError) as caught:
        Tokens.load(_write(tmp_path / "tokens.json", customers))
    assert complaint in str(caught.value)


def test_flops_api_does_not_start_without_a_tokens_file(broker: BrokerAddress, tmp_path: Path) -> None:
    result = cli(broker, "api", "--port", "0", data_dir=tmp_path)
    assert result.returncode == 78, result.stdout + result.stderr
    assert "FLOPS_API_TOKENS_FILE" in result.stderr
