"""deploy/README.md followed step by step on one machine: `flops setup production`, Mosquitto started with the
generated config (its files handed to the mosquitto user, as the README says), the manager and three agents
started from nothing but their env files, digits pushed with the nodes' admin tokens, and alice's project
submitted and watched with the CLI. Everything runs in production mode: TLS to the broker, passwords, the
ACL, Flower over TLS with SuperNode authentication, Flight tokens. The base case must complete."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from flops.broker import free_port, wait_for_port
from flops.demo import EXAMPLE_SLA, example_repo
from tests.prod_support import env_of
from tests.support import REPO_ROOT, wait_until

AGENTS = ("node-1", "node-2", "node-3")


def flops(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flops.cli", *args],
        env={**os.environ, "FLOPS_LOG_FORMAT": "json", **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
    )


def background(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "flops.cli", *args],
            env={**os.environ, "FLOPS_LOG_FORMAT": "json", **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            start_new_session=True,
        )


@pytest.fixture(scope="module")
def walkthrough() -> Iterator[Path]:
    # A world-readable place: Mosquitto reads its files as the mosquitto user (README step 2).
    root = Path(tempfile.mkdtemp(prefix="flops-prod-"))
    root.chmod(0o755)
    directory = root / "flops"
    port = free_port()
    made = flops(
        {},
        *("setup", "production", "--dir", str(directory), "--port", str(port)),
        *("--agents", ",".join(AGENTS), "--customers", "alice", "--operators", "ops"),
    )
    assert made.returncode == 0, made.stdout + made.stderr
    processes: list[subprocess.Popen[bytes]] = []
    try:
        broker_files = ["mosquitto.conf", "ca.crt", "broker.crt", "broker.key", "passwd", "acl", "broker-data"]
        for name in broker_files:
            shutil.chown(directory / name, "mosquitto", "mosquitto")
        (directory / "broker-data").mkdir(exist_ok=True)
        shutil.chown(directory / "broker-data", "mosquitto", "mosquitto")
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        with (root / "mosquitto.log").open("wb") as out:
            broker = subprocess.Popen([mosquitto, "-c", str(directory / "mosquitto.conf")], stdout=out, stderr=out)
        processes.append(broker)
        wait_for_port("127.0.0.1", port, 10, broker)  # type: ignore[arg-type]
        manager_env = {**env_of(directory, "manager"), "FLOPS_DATA_DIR": str(root / "manager")}
        processes.append(background(manager_env, root / "manager.log", "manager"))
        for name in AGENTS:
            args = ["agent", "--id", name, "--data-dir", str(root / name)]
            processes.append(background(env_of(directory, name), root / f"{name}.log", *args))
        yield root
    finally:
        for proc in reversed(processes):
            proc.terminate()
        for proc in processes:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(root, ignore_errors=True)


def test_the_base_case_completes_in_production_mode(walkthrough: Path) -> None:
    root = walkthrough
    directory = root / "flops"
    ops, alice = env_of(directory, "ops"), env_of(directory, "alice")

    def online() -> bool:
        listed = flops(ops, "agents", "--json")
        assert listed.returncode == 0, listed.stderr
        return sorted(a["agent_id"] for a in json.loads(listed.stdout) if a["online"]) == list(AGENTS)

    wait_until(online, 90, "the three agents online")
    # Data: one IID partition per agent, pushed with each node's admin token (README step 7).
    pushed = flops(
        ops,
        *("data", "mock", "--dataset", "digits", "--tag", "digits"),
        *[a for name in AGENTS for a in ("--agent-dir", str(root / name))],
    )
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    # Alice's project: the demo's request, without customerID (filled with her user name).
    body = json.loads(EXAMPLE_SLA.read_text())
    body.pop("customerID")
    body["ml_repo_url"] = example_repo(root)
    sla = root / "alice.json"
    sla.write_text(json.dumps(body))
    submitted = flops(alice, "project", "submit", str(sla))
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    project_id = submitted.stdout.split()[-1]
    watched = flops(alice, "project", "watch", project_id, timeout=600)
    assert watched.returncode == 0, watched.stdout[-3000:] + watched.stderr[-3000:]
    status = json.loads(flops(alice, "project", "status", project_id, "--json").stdout)
    assert status["outcome"] == "completed" and status["customer"] == "alice"
    # The served model answers its customer's token only, and malformed input is a 400, not a 500.
    url, token = status["model_url"], status["model_token"]
    assert url and token
    assert _post(url, b'{"inputs": [[0.0]]}', None) == 401
    assert _post(url, b'{"inputs": ' + b"[" * 2000 + b"]" * 2000 + b"}", token) == 400
    assert _post(url, json.dumps({"inputs": [[0.0] * 64]}).encode(), token) == 200
    # Production mode really was on: Flower ran over TLS with SuperNode authentication.
    superlinks = [p for name in AGENTS for p in (root / name).rglob("run_aggregator.log")]
    assert superlinks
    text = "\n".join(p.read_text(errors="replace") for p in superlinks)
    assert "--insecure" not in text and "--enable-supernode-auth" in text, text[-2000:]


def _post(url: str, body: bytes, token: str | None) -> int:
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    try:
        with urllib.request.urlopen(
            urllib.request.Request(f"{url.rstrip('/')}/invocations", body, headers), timeout=30
        ):
            return 200
    except urllib.error.HTTPError as exc:
        return exc.code
