"""Shared pieces of the benchmarks: broker, machine facts, result files, raw paho clients, the fast workers.

Benchmarks are plain scripts (``python benchmarks/<name>.py [--quick]``). Each starts its own Mosquitto on a
free port (:class:`flops.broker.MosquittoBroker`), prints a table and appends one JSON line to
``benchmarks/results.jsonl``. Nothing here asserts on time: figures are reported, not tested.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import platform
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import paho.mqtt  # noqa: E402
import paho.mqtt.client as mqtt  # noqa: E402
import structlog  # noqa: E402

from flops import topics  # noqa: E402
from flops.broker import MosquittoBroker  # noqa: E402
from flops.settings import BrokerAddress  # noqa: E402

RESULTS = HERE / "results.jsonl"
AGENTS = ("bench-agent-0", "bench-agent-1", "bench-agent-2", "bench-agent-3")


# --- facts and files ---------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        out = subprocess.run(["/usr/sbin/mosquitto", "-h"], capture_output=True, text=True, timeout=5).stdout
        mosq = out.splitlines()[0].replace("mosquitto version ", "") if out else "?"
    except (OSError, subprocess.TimeoutExpired):
        mosq = "?"
    import sqlite3

    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "paho": paho.mqtt.__version__,
        "mosquitto": mosq,
        "sqlite": sqlite3.sqlite_version,
        "tmp_fs": _fs_type(tempfile.gettempdir()),
        # Other work on the machine skews every figure; recorded so runs can be compared fairly.
        "loadavg_1m": os.getloadavg()[0],
    }


def _fs_type(path: str) -> str:
    try:
        out = subprocess.run(["df", "-T", path], capture_output=True, text=True, timeout=5).stdout.splitlines()
        return out[1].split()[1]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


def record(name: str, quick: bool, results: dict[str, Any]) -> None:
    line = {
        "benchmark": name,
        "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "quick": quick,
        "machine": machine(),
        "git": _git_rev(),
        **results,
    }
    with RESULTS.open("a") as f:
        f.write(json.dumps(line) + "\n")
    print(f"\nappended to {RESULTS.relative_to(ROOT)}")


def _git_rev() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "flops"], capture_output=True, text=True
        )
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "?"


def table(rows: Iterable[Iterable[Any]], header: Iterable[str]) -> None:
    rows = [[_fmt(c) for c in r] for r in rows]
    header = list(header)
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


def quiet_logs(level: str = "info") -> None:
    """The manager's production log pipeline (JSON lines), rendered but written to /dev/null.

    The per-event log line costs real CPU; a benchmark that switched it off would flatter the manager.
    """
    devnull = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=devnull),
        cache_logger_on_first_use=True,
    )


def start_broker() -> MosquittoBroker:
    return MosquittoBroker()


def fake_commit(i: int) -> str:
    """A pinned, full commit sha per project: no git subprocess, and every project builds (no cache hit)."""
    return hashlib.sha1(f"bench-{i}".encode()).hexdigest()


def sla(i: int, rounds: int = 3, learners: int = 2, post: bool = True, tags: list[str] | None = None) -> dict:
    return {
        "customerID": "bench",
        "ml_repo_url": "https://example.invalid/bench.git",
        "ml_repo_commit": fake_commit(i),
        "ml_model_flavor": "sklearn",
        "training_configuration": {
            "data_tags": tags or ["digits"],
            "training_rounds": rounds,
            "min_available_clients": learners,
            "min_fit_clients": learners,
            "min_evaluate_clients": learners,
        },
        "post_training_steps": ["build_image_for_trained_model", "deploy_trained_model_image"] if post else [],
    }


def request_payload(i: int, **kw: Any) -> bytes:
    return json.dumps({"request_id": f"bench-req-{i}-{os.getpid()}", "sla": sla(i, **kw)}).encode()


def agent_status(agent_id: str) -> bytes:
    return json.dumps(
        {
            "agent_id": agent_id,
            "online": True,
            "roles": ["learner", "builder", "aggregator", "serve"],
            "data_tags": {"digits": 100},
            "ts": time.time(),
        }
    ).encode()


# --- a plain paho client -----------------------------------------------------------------------------


class Raw:
    """A bare paho 2.x MQTT 5 client (TCP_NODELAY), ``on_message(topic, payload, t_recv)`` on paho's thread."""

    def __init__(
        self,
        address: BrokerAddress,
        name: str,
        subscriptions: list[str] | None = None,
        on_message: Callable[[str, bytes, float], None] | None = None,
        max_inflight: int = 1000,
    ) -> None:
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"{name}-{os.getpid()}", protocol=mqtt.MQTTv5
        )
        # Our own window (paho's re-scans all unacked messages per PUBACK): at most ``max_inflight``
        # unacknowledged publishes, the rest wait in ``_backlog`` and go out as PUBACKs arrive.
        self.client.max_inflight_messages_set(0)
        self.client.max_queued_messages_set(0)
        self._window = max_inflight
        self._inflight = 0
        self._backlog: collections.deque[tuple[str, bytes, bool]] = collections.deque()
        # paho calls on_publish holding this (re-entrant) mutex and publish() takes it: sharing it as the
        # window lock keeps one lock order (a separate lock deadlocks against paho's).
        self._wlock = self.client._out_message_mutex
        self._handler = on_message
        self._subs = subscriptions or []
        self._ready = threading.Event()
        self._subacked = threading.Event()
        self.acked = 0
        self.client.on_socket_open = lambda c, u, s: s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._subacked.set()
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.connect(address.host, address.port, keepalive=60)
        self.client.loop_start()
        if not self._ready.wait(10):
            raise RuntimeError(f"{name}: no CONNACK")
        if self._subs and not self._subacked.wait(10):
            raise RuntimeError(f"{name}: no SUBACK")

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if self._subs:
            client.subscribe([(t, 1) for t in self._subs])
        self._ready.set()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        t = time.perf_counter()
        if self._handler is not None:
            self._handler(msg.topic, msg.payload, t)

    def _on_publish(self, *args: Any) -> None:
        with self._wlock:
            self.acked += 1
            self._inflight -= 1
            if self._backlog:
                self._send(*self._backlog.popleft())

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Publish QoS 1 now, or as soon as the in-flight window has room."""
        with self._wlock:
            if self._inflight >= self._window:
                self._backlog.append((topic, payload, retain))
            else:
                self._send(topic, payload, retain)

    def _send(self, topic: str, payload: bytes, retain: bool) -> None:
        self._inflight += 1
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise RuntimeError(f"publish failed: {mqtt.error_string(info.rc)}")

    def publish_wait(self, topic: str, payload: bytes, retain: bool = False) -> None:
        with self._wlock:
            self._inflight += 1
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def announce_agents(address: BrokerAddress, agents: Iterable[str] = AGENTS) -> None:
    c = Raw(address, "bench-announce")
    for agent_id in agents:
        c.publish_wait(topics.agent_status(agent_id), agent_status(agent_id), retain=True)
    c.close()


def report(cmd: dict[str, Any], kind: str, n: int, **fields: Any) -> tuple[str, bytes]:
    body = {
        "event_id": f"{cmd['command_id']}.{kind}.{n}",
        "project_id": cmd["project_id"],
        "source": f"bench/{cmd['agent_id']}",
        "command_id": cmd["command_id"],
        "kind": kind,
        **fields,
    }
    return topics.agent_reports(cmd["agent_id"]), json.dumps(body).encode()


def answers(cmd: dict[str, Any]) -> list[tuple[str, bytes]]:
    """What a healthy worker reports for a command (the same script as tests/support.FakeWorkers)."""
    kind, spec = cmd["kind"], cmd["spec"]
    if kind == "build":
        return [
            report(cmd, "build.started", 0),
            report(cmd, "build.succeeded", 1, artifact={"ref": f"env://{spec['cache_key']}", "commit": spec["commit"]}),
        ]
    if kind == "run_learner":
        return [report(cmd, "learner.ready", 0, agent_id=cmd["agent_id"], examples=100)]
    if kind == "run_aggregator":
        out = [report(cmd, "aggregator.started", 0, address=spec["address"])]
        for rnd in range(1, spec["rounds"] + 1):
            out.append(report(cmd, "round.completed", rnd, round=rnd, loss=1.0 / rnd, accuracy=0.5, examples=200))
        out.append(
            report(cmd, "training.succeeded", 99, best_round=spec["rounds"], loss=0.1, accuracy=0.9, model_ref="/m")
        )
        return out
    if kind == "build_model_image":
        return [report(cmd, "model.built", 0, image_ref="dir:///model")]
    if kind == "serve_model":
        return [report(cmd, "model.served", 0, url="http://127.0.0.1:9/")]
    return []  # stop_project: nothing to report


def fast_workers(
    host: str, port: int, n_projects: int, rounds: int, max_inflight: int, out: Any, first: int = 0
) -> None:
    """Child process: submit ``n_projects`` requests, answer every command at once, count finished projects.

    Unlike tests/support.FakeWorkers there is no publish_wait per report: reports are published from the
    receive callback (a benchmark client, not product code) with at most ``max_inflight`` unacknowledged
    QoS 1 messages (paho queues the rest).
    """
    address = BrokerAddress(host=host, port=port)
    finished: dict[str, str] = {}
    done = threading.Event()
    seen_cmds: set[str] = set()
    state: dict[str, Any] = {"commands": 0, "reports": 0, "first_finish": None, "last_finish": None}

    def on_message(topic: str, payload: bytes, t: float) -> None:
        if topic.endswith("/commands"):
            cmd = json.loads(payload)
            if cmd["command_id"] in seen_cmds:
                return
            seen_cmds.add(cmd["command_id"])
            state["commands"] += 1
            for rt, rp in answers(cmd):
                client.publish(rt, rp)
                state["reports"] += 1
        elif topic.endswith("/state"):
            st = json.loads(payload)
            if st.get("stage") == "finished" and st["project_id"] not in finished:
                finished[st["project_id"]] = f"{st.get('outcome')}: {st.get('reason')}"
                state["last_finish"] = time.time()
                if len(finished) >= n_projects:
                    done.set()

    client = Raw(
        address,
        "bench-workers",
        [f"{topics.PREFIX}/agents/+/commands", topics.ALL_PROJECT_STATES],
        on_message,
        max_inflight=max_inflight,
    )
    t0 = time.time()
    for i in range(first, first + n_projects):
        client.publish(topics.requests("bench"), request_payload(i, rounds=rounds))
    ok = done.wait(600)
    from collections import Counter

    outcomes = Counter(v if not v.startswith("completed") else "completed" for v in finished.values())
    out.put(
        {
            "ok": ok,
            "t_submit": t0,
            "t_done": time.time(),
            "finished": len(finished),
            "outcomes": dict(outcomes),
            **state,
        }
    )
    time.sleep(0.5)
    client.close()


def drain(q: queue.Queue) -> list[Any]:
    out = []
    while True:
        try:
            out.append(q.get_nowait())
        except queue.Empty:
            return out


def apply_proposed_fixes() -> list[str]:
    """Fixes proposed for files outside the benchmarks' remit, applied in this process only (--proposed).

    ``flops.lifecycle.Project`` is a dataclass with generated ``__eq__``; ``transitions.Machine.add_model``
    checks ``model not in self.models`` (a list) and ``remove_model`` does ``list.remove``, so every project
    created or finished compares field by field against every project in the machine: O(projects) deep
    comparisons per request. ``@dataclass(eq=False)`` (identity equality) removes it.
    """
    from flops.lifecycle import Project

    Project.__eq__ = object.__eq__  # type: ignore[method-assign,assignment]
    Project.__hash__ = object.__hash__  # type: ignore[method-assign,assignment]
    return ["lifecycle.Project: identity equality (dataclass eq=False)"]
