"""Transition latency: worker report published -> transition committed -> retained state received.

The manager runs in this process (flops.manager.Manager, SQLiteStore in a temp dir) so its steps can be
timed from inside; the clients run in a child process (as real workers and watchers would, and so they do
not share the manager's GIL). A plain paho client publishes one worker report at a time and a second
plain paho client receives the project's retained state: the clock runs from just before the report's
publish() to the arrival (paho receive callback) of the state naming the new stage. Each project is moved
through four single-report transitions (build.succeeded -> learners, 2nd learner.ready -> aggregation,
training.succeeded -> post_training, model.served -> finished); the reports in between are published in
bulk and are not timed.

Baseline, same run, same broker, same two clients: a raw QoS 1 publish -> receive on a scratch topic,
one after every timed transition (interleaved, so both see the same machine load). Reported: p50/p99 of
both and their ratio, for synchronous=FULL (durable, the default) and NORMAL.

    python benchmarks/transition_latency.py [--quick] [--projects N] [--sync FULL,NORMAL]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import _common as c

from flops import topics
from flops.manager import Manager
from flops.settings import BrokerAddress, Settings
from flops.store_sqlite import SQLiteStore

PING = "bench/ping"


class Probe:
    """Timestamps of the manager's steps for the message in flight (one at a time when timed)."""

    def __init__(self, manager: Manager) -> None:
        self.t: dict[str, float] = {}
        self.log: list[dict[str, float]] = []
        bus, store = manager.bus, manager.store
        on_message, handle, publish, batch = bus._on_message, manager._handle, manager._publish, store.batch
        probe = self

        def on_message_(*a: Any) -> None:
            probe.t = {"recv": time.perf_counter()}
            on_message(*a)

        def handle_(item: Any) -> Any:
            probe.t.setdefault("handle", time.perf_counter())
            out = handle(item)
            probe.t["handled"] = time.perf_counter()
            return out

        def publish_(items: Any) -> None:
            probe.t.setdefault("committed", time.perf_counter())
            publish(items)
            probe.t.setdefault("published", time.perf_counter())
            st = probe.steps()
            if st is not None:
                probe.log.append({**st, "recv": probe.t["recv"], "published": probe.t["published"]})
            probe.t = {}

        bus._client.on_message = on_message_
        manager._handle = handle_  # type: ignore[method-assign]
        manager._publish = publish_  # type: ignore[method-assign]
        del batch

    def within(self, t0: float, t1: float) -> dict[str, float] | None:
        """The manager's steps for the message received between t0 and t1 (perf_counter is system-wide)."""
        for st in reversed(self.log):
            if t0 <= st["recv"] <= t1 and st["published"] <= t1:
                return st
        return None

    def steps(self) -> dict[str, float] | None:
        t = self.t
        if not all(k in t for k in ("recv", "handle", "handled", "committed", "published")):
            return None
        return {
            "queue": t["handle"] - t["recv"],
            "handle": t["handled"] - t["handle"],
            "commit": t["committed"] - t["handled"],
            "publish": t["published"] - t["committed"],
        }


class Observer:
    """Receives states, commands and pings; lets the driver wait for one specific arrival."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stage: dict[str, str] = {}
        self.last_state_at = 0.0
        self.commands: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
        self.waiting: tuple[str, str] | None = None
        self.arrived = threading.Event()
        self.t_arrived = 0.0
        self.ping_seq = -1
        self.changed = threading.Condition(self.lock)

    def on_message(self, topic: str, payload: bytes, t: float) -> None:
        if topic == PING:
            if int(payload) == self.ping_seq:
                self.t_arrived = t
                self.arrived.set()
            return
        if topic.endswith("/state"):
            st = json.loads(payload)
            pid, stage = st["project_id"], st["stage"]
            with self.lock:
                self.stage[pid] = stage
                self.last_state_at = time.monotonic()
                if self.waiting == (pid, stage):
                    self.t_arrived = t
                    self.waiting = None
                    self.arrived.set()
                self.changed.notify_all()
        elif topic.endswith("/commands"):
            cmd = json.loads(payload)
            with self.lock:
                seen = self.commands[cmd["project_id"]][cmd["kind"]]
                if all(x["command_id"] != cmd["command_id"] for x in seen):
                    seen.append(cmd)
                self.changed.notify_all()

    def wait_for(self, predicate: Any, timeout: float = 60.0, what: str = "") -> None:
        with self.lock:
            if not self.changed.wait_for(predicate, timeout):
                raise RuntimeError(f"timed out waiting for {what}")

    def settle(self, quiet_s: float = 0.3) -> None:
        """Wait until no state arrived for ``quiet_s`` (bulk, untimed reports are all handled)."""
        while time.monotonic() - self.last_state_at < quiet_s:
            time.sleep(0.05)


def run(projects: int, sync: str) -> dict[str, Any]:
    """Manager here; the report publisher and the state subscriber in a child process (as in production)."""
    broker = c.start_broker()
    tmp = Path(tempfile.mkdtemp(prefix="flops-bench-lat-"))
    try:
        c.announce_agents(broker.address)
        settings = Settings(
            data_dir=tmp, broker_url=broker.address.url, aggregator_ports=(20000, 40000), sqlite_synchronous=sync
        )
        manager = Manager(settings, SQLiteStore(tmp / "manager.sqlite3", sync), broker.address, client_id="bench-mgr")
        manager.start()
        probe = Probe(manager)
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        proc = ctx.Process(target=drive, args=(broker.address.host, broker.address.port, projects, out), daemon=True)
        proc.start()
        d = out.get(timeout=900)
        proc.join(10)
        manager.stop()
        if "error" in d:
            raise RuntimeError(d["error"])
        steps = []
        for t0, t1 in d["windows"]:
            st = probe.within(t0, t1)
            if st is not None:
                steps.append(
                    {
                        "publish_to_manager": st["recv"] - t0,
                        **{k: st[k] for k in ("queue", "handle", "commit", "publish")},
                        "state_to_subscriber": t1 - st["published"],
                        "total": t1 - t0,
                    }
                )
        ms = [x * 1e3 for x in d["flops_s"]]
        raw = [x * 1e3 for x in d["raw_s"]]
        return {
            "synchronous": sync,
            "transitions": len(ms),
            "flops_p50_ms": round(c.pct(ms, 50), 3),
            "flops_p99_ms": round(c.pct(ms, 99), 3),
            "raw_p50_ms": round(c.pct(raw, 50), 3),
            "raw_p99_ms": round(c.pct(raw, 99), 3),
            "ratio_p50": round(c.pct(ms, 50) / c.pct(raw, 50), 2),
            "ratio_p99": round(c.pct(ms, 99) / c.pct(raw, 99), 2),
            # Where the time goes (p50 of each step, ms): broker hop in, manager queue, engine, COMMIT,
            # outbox publish (the state is its last item), broker hop out to the subscriber.
            "steps_matched": len(steps),
            "steps_p50_ms": {k: round(c.pct([x[k] * 1e3 for x in steps], 50), 3) for k in (steps[0] if steps else {})},
            "by_edge_p50_ms": {k: round(c.pct([x * 1e3 for x in v], 50), 3) for k, v in d["by_edge"].items()},
        }
    finally:
        broker.stop()


def drive(host: str, port: int, projects: int, out: Any) -> None:
    try:
        out.put(_drive(BrokerAddress(host=host, port=port), projects))
    except Exception as exc:  # reported to the parent, which raises
        out.put({"error": f"{type(exc).__name__}: {exc}"})


def _drive(address: BrokerAddress, projects: int) -> dict[str, Any]:
    obs = Observer()
    sub = c.Raw(
        address, "bench-sub", [topics.ALL_PROJECT_STATES, f"{topics.PREFIX}/agents/+/commands", PING], obs.on_message
    )
    pub = c.Raw(address, "bench-pub")
    # Create the projects (untimed) and wait for their build commands.
    for i in range(projects):
        pub.publish(topics.requests("bench"), c.request_payload(i, rounds=1))
    obs.wait_for(lambda: sum(1 for p in obs.commands.values() if p.get("build")) >= projects, 120, "build commands")
    pids = sorted(p for p, k in obs.commands.items() if k.get("build"))[:projects]
    obs.settle()

    flops_s: list[float] = []
    raw_s: list[float] = []
    windows: list[tuple[float, float]] = []
    by_edge: dict[str, list[float]] = defaultdict(list)
    ping = [0]

    def timed(pid: str, topic: str, payload: bytes, dest: str, edge: str) -> None:
        with obs.lock:
            obs.waiting = (pid, dest)
            obs.arrived.clear()
        t0 = time.perf_counter()
        pub.publish(topic, payload)
        if not obs.arrived.wait(30):
            raise RuntimeError(f"{pid}: no state {dest} within 30 s")
        flops_s.append(obs.t_arrived - t0)
        windows.append((t0, obs.t_arrived))
        by_edge[edge].append(obs.t_arrived - t0)
        # Interleaved baseline: one raw QoS 1 publish -> receive, same clients, same broker.
        ping[0] += 1
        obs.ping_seq = ping[0]
        obs.arrived.clear()
        t0 = time.perf_counter()
        pub.publish(PING, str(ping[0]).encode())
        if not obs.arrived.wait(30):
            raise RuntimeError("ping lost")
        raw_s.append(obs.t_arrived - t0)

    def cmds(pid: str, kind: str) -> list[dict[str, Any]]:
        return obs.commands[pid][kind]

    # 1. builder -> learners
    for pid in pids:
        t, p = c.report(cmds(pid, "build")[0], "build.succeeded", 1, artifact={"ref": "env://x", "commit": "y"})
        timed(pid, t, p, "learners", "build.succeeded: builder->learners")
    obs.wait_for(lambda: all(len(cmds(p, "run_learner")) >= 2 for p in pids), 60, "run_learner commands")
    for pid in pids:  # first learner ready: untimed, no transition
        lc = cmds(pid, "run_learner")[0]
        pub.publish(*c.report(lc, "learner.ready", 0, agent_id=lc["agent_id"], examples=100))
    obs.settle()
    # 2. learners -> aggregation
    for pid in pids:
        lc = cmds(pid, "run_learner")[1]
        t, p = c.report(lc, "learner.ready", 0, agent_id=lc["agent_id"], examples=100)
        timed(pid, t, p, "aggregation", "learner.ready: learners->aggregation")
    obs.wait_for(lambda: all(cmds(p, "run_aggregator") for p in pids), 60, "run_aggregator commands")
    for pid in pids:  # aggregator.started + one round: untimed
        ac = cmds(pid, "run_aggregator")[0]
        pub.publish(*c.report(ac, "aggregator.started", 0, address=ac["spec"]["address"]))
        pub.publish(*c.report(ac, "round.completed", 1, round=1, loss=0.5, accuracy=0.5, examples=200))
    obs.settle()
    # 3. aggregation -> post_training
    for pid in pids:
        ac = cmds(pid, "run_aggregator")[0]
        t, p = c.report(ac, "training.succeeded", 9, best_round=1, loss=0.1, accuracy=0.9, model_ref="/m")
        timed(pid, t, p, "post_training", "training.succeeded: aggregation->post_training")
    obs.wait_for(lambda: all(cmds(p, "build_model_image") for p in pids), 60, "build_model_image commands")
    for pid in pids:  # model.built: untimed, sends serve_model
        pub.publish(*c.report(cmds(pid, "build_model_image")[0], "model.built", 0, image_ref="dir:///m"))
    obs.wait_for(lambda: all(cmds(p, "serve_model") for p in pids), 60, "serve_model commands")
    obs.settle()
    # 4. post_training -> finished
    for pid in pids:
        t, p = c.report(cmds(pid, "serve_model")[0], "model.served", 0, url="http://127.0.0.1:9/")
        timed(pid, t, p, "finished", "model.served: post_training->finished")
    pub.close()
    sub.close()
    return {"flops_s": flops_s, "raw_s": raw_s, "windows": windows, "by_edge": dict(by_edge)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100 projects (400 transitions)")
    ap.add_argument("--projects", type=int, help="default 500 (2,000 transitions)")
    ap.add_argument("--sync", default="FULL,NORMAL")
    ap.add_argument("--log-level", default="info")
    ap.add_argument("--proposed", action="store_true", help="apply the fixes proposed outside benchmarks/")
    args = ap.parse_args()
    projects = args.projects or (100 if args.quick else 500)
    c.quiet_logs(args.log_level)
    proposed = c.apply_proposed_fixes() if args.proposed else []
    runs = [run(projects, sync) for sync in args.sync.split(",")]
    print(f"\ntransition latency: report published -> retained state received ({projects} projects x 4 edges)")
    print(f"proposed fixes applied in-process: {proposed or 'none'}\n")
    c.table(
        [
            [
                r["synchronous"],
                r["transitions"],
                r["flops_p50_ms"],
                r["flops_p99_ms"],
                r["raw_p50_ms"],
                r["raw_p99_ms"],
                r["ratio_p50"],
                r["ratio_p99"],
            ]
            for r in runs
        ],
        ["sqlite sync", "n", "flops p50 ms", "flops p99 ms", "raw p50 ms", "raw p99 ms", "p50 ratio", "p99 ratio"],
    )
    print("\np50 by edge (ms):")
    c.table([[r["synchronous"], k, v] for r in runs for k, v in r["by_edge_p50_ms"].items()], ["sync", "edge", "p50"])
    print("\nwhere the time goes, p50 of each step (ms):")
    keys = ["publish_to_manager", "queue", "handle", "commit", "publish", "state_to_subscriber", "total"]
    c.table([[r["synchronous"], *[r["steps_p50_ms"].get(k, "") for k in keys]] for r in runs], ["sync", *keys])
    print("\ntarget: p50 ratio <= 3")
    c.record(
        "transition_latency",
        args.quick,
        {"projects": projects, "runs": runs, "target_ratio_p50": 3, "proposed_fixes": proposed},
    )


if __name__ == "__main__":
    main()
