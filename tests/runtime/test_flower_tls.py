"""Flower over TLS with SuperNode authentication: real SuperLink, SuperNodes and rounds (flops.runtime.flower_tls)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from flops.ports import free_port
from flops.runtime.flower_env import dial_address
from flops.runtime.flower_tls import ServerTls, new_supernode_key, superlink_args, supernode_args
from tests.certs import fleet_certificates
from tests.runtime.test_training import DIGITS_REPO, TAG, Worker, _wait_no_processes, data_servers

__all__ = ["data_servers"]  # the fixture, shared with test_training


def _aggregator(tmp_path: Path, address: str, certs: dict[str, Path], keys: list[str], *, clients: int) -> list[str]:
    keys_file = tmp_path / "supernode_keys.txt"
    keys_file.write_text("".join(f"{key}\n" for key in keys))
    return [
        "--repo", str(DIGITS_REPO), "--rounds", "2", "--strategy", "fedavg",
        "--min-available-clients", str(clients), "--min-fit-clients", str(clients),
        "--min-evaluate-clients", str(clients),
        "--address", address, "--model-out", str(tmp_path / "model"), "--client-wait-timeout", "120",
        "--tls-ca-file", str(certs["ca"]), "--tls-cert-file", str(certs["cert"]), "--tls-key-file", str(certs["key"]),
        "--supernode-keys", str(keys_file), "--work-dir", str(tmp_path / "aggregator"),
    ]  # fmt: skip


def _learner(address: str, location: str, work: Path, *extra: str) -> list[str]:
    return [
        "--repo", str(DIGITS_REPO), "--aggregator", address, "--data-server", location, "--data-tags", TAG,
        "--work-dir", str(work), *extra,
    ]  # fmt: skip


def _rounds(aggregator: Worker) -> tuple[list[dict], str, dict]:
    completed = []
    while True:
        kind, payload = aggregator.next_report(120)
        if kind != "round.completed":
            return completed, kind, payload
        completed.append(payload)


# --- flags ---------------------------------------------------------------------------------------------------


def test_flags_are_insecure_only_withoutfleet_certificates(tmp_path: Path) -> None:
    certs = fleet_certificates(tmp_path)
    assert superlink_args(ServerTls(None, None, None)) == ["--insecure"]
    tls = superlink_args(ServerTls(certs["ca"], certs["cert"], certs["key"]))
    assert "--insecure" not in tls and "--enable-supernode-auth" in tls
    assert tls[tls.index("--ssl-certfile") + 1] == str(certs["cert"])
    assert supernode_args(None, None) == ["--insecure"]
    private, public = new_supernode_key(tmp_path / "learner")
    assert supernode_args(certs["ca"], private) == [
        "--root-certificates", str(certs["ca"]), "--auth-supernode-private-key", str(private),
    ]  # fmt: skip
    assert public.startswith("ecdsa-sha2-nistp384 ") and private.stat().st_mode & 0o077 == 0
    with pytest.raises(ValueError, match="together"):
        ServerTls(certs["ca"], None, None)


def test_dial_address_maps_wildcards_to_loopback() -> None:
    assert dial_address("0.0.0.0:9") == "127.0.0.1:9"
    assert dial_address("[::]:9") == "[::1]:9"
    assert dial_address("10.0.0.5:9") == "10.0.0.5:9"


# --- real rounds ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_training_over_tls_with_authenticated_supernodes(data_servers: list[str], tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    certs = fleet_certificates(tmp_path / "certs")
    address = f"127.0.0.1:{free_port()}"
    # As in a project: the learners come up first and report their public keys in learner.ready ...
    learners = [
        Worker(
            "flops.runtime.learner",
            _learner(address, location, tmp_path / f"learner{i}", "--tls-ca-file", str(certs["ca"])),
            marker,
            tmp_path / f"learner{i}.log",
        )
        for i, location in enumerate(data_servers)
    ]
    aggregator = None
    try:
        keys = []
        for learner in learners:
            kind, payload = learner.next_report(120)
            assert kind == "learner.ready", payload
            assert payload["public_key"].startswith("ecdsa-sha2-nistp384 ")
            keys.append(payload["public_key"])
        # ... and the aggregator registers exactly those keys.
        aggregator = Worker(
            "flops.runtime.aggregator",
            _aggregator(tmp_path, address, certs, keys, clients=2),
            marker,
            tmp_path / "agg.log",
        )
        assert aggregator.next_report(60) == ("aggregator.started", {"address": address})
        completed, kind, payload = _rounds(aggregator)
        assert kind == "training.succeeded", payload
        assert [r["round"] for r in completed] == [1, 2]
        assert payload["accuracy"] >= 0.85
        assert aggregator.proc.wait(timeout=30) == 0
        superlink_log = (tmp_path / "aggregator" / "superlink.log").read_text()
        assert "Option `--insecure` was set" not in superlink_log
        assert "SuperNode authentication is disabled" not in superlink_log
    finally:
        for worker in (*learners, *([aggregator] if aggregator else [])):
            worker.stop()
    assert _wait_no_processes(marker) == []


@pytest.mark.timeout(300)
@pytest.mark.parametrize("data_servers", [3], indirect=True)
def test_unregistered_and_plaintext_supernodes_cannot_join(data_servers: list[str], tmp_path: Path) -> None:
    """Only the registered learner trains: one whose key the aggregator was not given is refused activation,
    one dialling in plaintext never gets a connection; the round runs with the registered learner alone."""
    marker = uuid.uuid4().hex
    certs = fleet_certificates(tmp_path / "certs")
    address = f"127.0.0.1:{free_port()}"
    ca = ("--tls-ca-file", str(certs["ca"]))
    short = ("--connect-timeout", "20")
    registered = Worker(
        "flops.runtime.learner", _learner(address, data_servers[0], tmp_path / "l0", *ca), marker, tmp_path / "l0.log"
    )
    intruder = Worker(
        "flops.runtime.learner",
        _learner(address, data_servers[1], tmp_path / "l1", *ca, *short),
        marker,
        tmp_path / "l1.log",
    )
    plaintext = Worker(
        "flops.runtime.learner",
        _learner(address, data_servers[2], tmp_path / "l2", *short),
        marker,
        tmp_path / "l2.log",
    )
    aggregator = None
    try:
        kind, payload = registered.next_report(120)
        assert kind == "learner.ready", payload
        key = payload["public_key"]
        assert intruder.next_report(120)[0] == "learner.ready"
        kind, payload = plaintext.next_report(120)
        assert kind == "learner.ready" and payload.get("public_key") is None, payload
        aggregator = Worker(
            "flops.runtime.aggregator",
            _aggregator(tmp_path, address, certs, [key], clients=1),
            marker,
            tmp_path / "agg.log",
        )
        assert aggregator.next_report(60)[0] == "aggregator.started"
        kind, payload = intruder.next_report(60)
        assert kind == "learner.failed", payload
        assert "Failed to activate SuperNode" in payload["reason"], payload["reason"]
        kind, payload = plaintext.next_report(60)
        assert kind == "learner.failed", payload
        completed, kind, payload = _rounds(aggregator)
        assert kind == "training.succeeded", payload
        assert [r["round"] for r in completed] == [1, 2]
        assert "SuperNode ID" not in (tmp_path / "l1.log").read_text()
        assert "SuperNode ID" not in (tmp_path / "l2.log").read_text()
    finally:
        for worker in (registered, intruder, plaintext, *([aggregator] if aggregator else [])):
            worker.stop()
    assert _wait_no_processes(marker) == []
