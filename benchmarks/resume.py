"""Resume after SIGKILL: 1,000 in-flight projects, `flops manager` killed -9 and started again.

1. A `flops manager` child process (SQLite, synchronous=FULL) gets 1,000 projects from a simulated worker
   that answers commands only up to a stage chosen per project, so they rest spread over preparation,
   builder, learners, aggregation and post_training.
2. The manager is killed with SIGKILL and started again. Measured from the restart's Popen:
   - ``online``: the retained ``flops/v1/manager/status`` {"online": true} arrives (published after every
     unfinished project was put back into the machine: boot happens before connect);
   - ``all probes``: a cancel sent to every project right after ``online`` has been answered (a reply with
     the project id, i.e. the project was in the rebuilt machine and the cancel transition committed).
3. Baseline in the same run: the same command started on an empty store (interpreter + imports + connect),
   so the cost of the 1,000 projects is the difference.

    python benchmarks/resume.py [--quick] [--projects N]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import _common as c

from flops import topics

HOLDS = ("preparation", "builder", "learners", "aggregation", "post_training")


class Watcher:
    def __init__(self, address: Any) -> None:
        self.lock = threading.Condition()
        self.online_at: float | None = None
        self.stage: dict[str, str] = {}
        self.replies: dict[str, dict[str, Any]] = {}
        self.client = c.Raw(
            address,
            "bench-resume-watch",
            [topics.manager_status(), topics.ALL_PROJECT_STATES, f"{topics.PREFIX}/customers/+/requests/+/reply"],
            self.on_message,
            max_inflight=2000,
        )

    def on_message(self, topic: str, payload: bytes, t: float) -> None:
        with self.lock:
            if topic == topics.manager_status():
                if payload and json.loads(payload).get("online") and self.online_at is None:
                    self.online_at = t
            elif topic.endswith("/state"):
                st = json.loads(payload)
                self.stage[st["project_id"]] = st["stage"]
            elif topic.endswith("/reply"):
                r = json.loads(payload)
                self.replies[r["request_id"]] = r
            self.lock.notify_all()

    def wait(self, predicate: Any, timeout: float, what: str) -> None:
        with self.lock:
            if not self.lock.wait_for(predicate, timeout):
                raise RuntimeError(f"timed out waiting for {what}")


def start_manager(address: Any, data_dir: Path, n: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "FLOPS_BROKER_URL": address.url,
        "FLOPS_DATA_DIR": str(data_dir),
        "FLOPS_LOG_FORMAT": "json",
        "FLOPS_AGGREGATOR_PORTS": "[20000, 40000]",
    }
    log = (data_dir / f"manager-{n}.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "flops.cli", "manager"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=c.ROOT
    )


def timed_start(address: Any, data_dir: Path, n: int) -> tuple[subprocess.Popen[bytes], Watcher, float, float]:
    """Start the manager; return (process, watcher, t0, seconds until the live online status)."""
    w = Watcher(address)
    with w.lock:
        w.online_at = None  # ignore the retained status delivered on subscribe
    time.sleep(0.2)
    with w.lock:
        w.online_at = None
    t0 = time.perf_counter()
    proc = start_manager(address, data_dir, n)
    w.wait(lambda: w.online_at is not None, 60, "manager online")
    return proc, w, t0, w.online_at - t0  # type: ignore[operator]


def populate(address: Any, projects: int) -> dict[str, str]:
    """Submit ``projects`` requests; answer commands only up to each project's hold stage."""
    hold_of: dict[str, str] = {}
    req_hold = {f"res-{i}-{os.getpid()}": HOLDS[i % len(HOLDS)] for i in range(projects)}
    commit_hold = {c.fake_commit(i): HOLDS[i % len(HOLDS)] for i in range(projects)}
    w = Watcher(address)
    seen: set[str] = set()
    lock = threading.Lock()

    def on_command(topic: str, payload: bytes, t: float) -> None:
        cmd = json.loads(payload)
        with lock:
            if cmd["command_id"] in seen:
                return
            seen.add(cmd["command_id"])
        # Every command but serve_model names the project's pinned commit (the build spec, or the artifact
        # built from it); serve_model is only ever reached by post_training-held projects.
        spec = cmd["spec"]
        hold = commit_hold.get(spec.get("commit") or spec.get("artifact", {}).get("commit"), "post_training")
        out = c.answers(cmd)
        kind = cmd["kind"]
        if hold == "builder" and kind == "build":
            out = out[:1]  # build.started only
        elif hold == "learners" and kind == "run_learner":
            out = out if cmd["spec"]["index"] == 0 else []  # one of two learners ready
        elif hold == "aggregation" and kind == "run_aggregator":
            out = out[:2]  # aggregator.started + round 1
        elif hold == "post_training" and kind == "serve_model":
            out = []
        for topic_, payload_ in out:
            worker.publish(topic_, payload_)

    worker = c.Raw(address, "bench-resume-workers", [f"{topics.PREFIX}/agents/+/commands"], on_command, 2000)
    for i in range(projects):
        req_id = f"res-{i}-{os.getpid()}"
        s = c.sla(i, rounds=3, tags=["nowhere"] if req_hold[req_id] == "preparation" else None)
        worker.publish(topics.requests("bench"), json.dumps({"request_id": req_id, "sla": s}).encode())
    w.wait(lambda: len(w.replies) >= projects, 120, "replies")
    with w.lock:
        for req_id, r in w.replies.items():
            hold_of[r["project_id"]] = req_hold[req_id]
    w.wait(lambda: all(w.stage.get(p) == h for p, h in hold_of.items()), 120, "projects at their stages")
    time.sleep(1.0)  # let the last reports of held stages (round 1, build.started) be handled
    worker.close()
    w.client.close()
    return hold_of


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="200 projects")
    ap.add_argument("--projects", type=int)
    args = ap.parse_args()
    projects = args.projects or (200 if args.quick else 1000)
    broker = c.start_broker()
    tmp = Path(tempfile.mkdtemp(prefix="flops-bench-resume-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        c.announce_agents(broker.address)
        # Baseline: an empty store, same command, same broker.
        empty = tmp / "empty"
        empty.mkdir()
        proc, w, _, base_online = timed_start(broker.address, empty, 0)
        procs.append(proc)
        w.client.close()
        proc.terminate()
        proc.wait(10)

        data = tmp / "data"
        data.mkdir()
        proc, w, _, _ = timed_start(broker.address, data, 1)
        procs.append(proc)
        w.client.close()
        hold_of = populate(broker.address, projects)
        spread = Counter(hold_of.values())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)

        proc, w, t0, online_s = timed_start(broker.address, data, 2)
        procs.append(proc)
        t_online = time.perf_counter()
        cancels = {f"probe-{pid}": pid for pid in hold_of}
        for req_id, pid in cancels.items():
            w.client.publish(
                topics.project_cancel("bench", pid), json.dumps({"request_id": req_id, "reason": "probe"}).encode()
            )
        w.wait(lambda: all(r in w.replies for r in cancels), 120, "probe replies")
        t_all = time.perf_counter()
        answered = sum(1 for r, pid in cancels.items() if w.replies[r].get("project_id") == pid)
        w.wait(lambda: all(w.stage.get(p) == "finished" for p in hold_of), 60, "cancelled states")
        proc.terminate()
        proc.wait(10)
        w.client.close()
        result = {
            "projects": projects,
            "spread": dict(spread),
            "empty_store_start_to_online_s": round(base_online, 3),
            "start_to_online_s": round(online_s, 3),
            "online_to_all_probes_s": round(t_all - t_online, 3),
            "start_to_all_probes_s": round(t_all - t0, 3),
            "probes_answered_by_machine": answered,
            "resume_cost_over_empty_start_s": round(online_s - base_online, 3),
            "target_s": 2.0,
        }
        print(f"\nresume after SIGKILL: {projects} in-flight projects {dict(spread)}\n")
        c.table(
            [
                ["empty store: start -> online (baseline)", result["empty_store_start_to_online_s"], ""],
                ["start -> online (all machines rebuilt)", result["start_to_online_s"], "<= 2"],
                ["online -> every project answered a probe", result["online_to_all_probes_s"], ""],
                ["start -> every project answered", result["start_to_all_probes_s"], "<= 2"],
                ["probes answered by the machine", f"{answered}/{projects}", ""],
            ],
            ["step", "seconds", "target"],
        )
        c.record("resume", args.quick, result)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
        broker.stop()


if __name__ == "__main__":
    main()
